"""The single-adapter op through its public entry on the torch backend (CPU): numerics against
the float64 oracle, autograd (gradcheck), bad input. Triton kernels are tested in
test_triton_lora_linear.py; opcheck of every registered op in test_compile.py."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import TOL, randn, rel_err

F64 = torch.float64


def _inputs(M, K, N, r, dtype=torch.float32, bias=True, grad=True):
    x = randn(M, K, dtype=dtype, requires_grad=grad)
    W = randn(N, K, dtype=dtype, scale=K ** -0.5)
    b = randn(N, dtype=dtype) if bias else None
    A = randn(r, K, dtype=dtype, scale=K ** -0.5, requires_grad=grad)
    B = randn(N, r, dtype=dtype, requires_grad=grad)
    return x, W, b, A, B


@pytest.mark.parametrize("M,K,N,r", [(1, 37, 19, 1), (7, 45, 33, 8), (33, 64, 17, 13), (5, 16, 70, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_and_grads_match_reference(M, K, N, r, bias, dropout_p):
    x, W, b, A, B = _inputs(M, K, N, r, bias=bias)
    y = lk.lora_linear(x, W, b, A, B, scaling=0.75, dropout_p=dropout_p, dropout_seed=99,
                       backend="torch")
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    x64, A64, B64 = d(x), d(A), d(B)
    y64 = ref.lora_linear(x64, d(W), d(b), A64, B64, 0.75, dropout_p, 99)
    assert rel_err(y, y64) <= TOL[torch.float32]
    dy = randn(M, N)
    g = torch.autograd.grad(y, (x, A, B), dy)
    g64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
    for got, want in zip(g, g64):
        assert rel_err(got, want) <= TOL[torch.float32]


def test_weight_and_bias_grads_when_they_require_grad():
    x, W, b, A, B = _inputs(6, 20, 12, 4)
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = lk.lora_linear(x, W, b, A, B, backend="torch")
    dy = randn(6, 12)
    g = torch.autograd.grad(y, (W, b), dy)
    W64, b64 = W.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = ref.lora_linear(x.detach().double(), W64, b64, A.detach().double(), B.detach().double())
    g64 = torch.autograd.grad(y64, (W64, b64), dy.double())
    for got, want in zip(g, g64):
        assert rel_err(got, want) <= TOL[torch.float32]


def test_frozen_weight_gets_no_grad_work():
    x, W, b, A, B = _inputs(4, 8, 6, 2)
    y = lk.lora_linear(x, W, b, A, B, backend="torch")
    y.sum().backward()
    assert W.grad is None and x.grad is not None and A.grad is not None


def test_gradcheck_float64():
    x, W, b, A, B = _inputs(5, 7, 6, 3, dtype=F64)
    W.requires_grad_(True)
    b.requires_grad_(True)
    fn = lambda x, W, b, A, B: lk.lora_linear(x, W, b, A, B, scaling=1.3, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))
    fn_drop = lambda x, A, B: lk.lora_linear(x, W, b, A, B, scaling=0.9, dropout_p=0.4,
                                              dropout_seed=3, backend="torch")
    assert torch.autograd.gradcheck(fn_drop, (x, A, B))


def test_3d_and_non_contiguous_input():
    x, W, b, A, B = _inputs(6, 24, 10, 4, grad=False)
    x3 = randn(2, 3, 48)[..., ::2]  # non-contiguous [2, 3, 24]
    y = lk.lora_linear(x3, W, b, A, B, backend="torch")
    assert y.shape == (2, 3, 10)
    expect = ref.lora_linear(x3.double(), W.double(), b.double(), A.double(), B.double())
    assert rel_err(y, expect) <= TOL[torch.float32]


def test_mixed_dtype_adapters_keep_their_dtype():
    x = randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    W = randn(8, 16, dtype=torch.bfloat16)
    A = randn(2, 16, requires_grad=True)  # fp32 adapters with a bf16 base: PEFT's default
    B = randn(8, 2, requires_grad=True)
    y = lk.lora_linear(x, W, None, A, B, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    expect = ref.lora_linear(x.detach().double(), W.double(), None, A.detach().double(), B.detach().double())
    assert rel_err(y, expect) <= TOL[torch.bfloat16]


def test_dropout_seed_reproducible_and_eval_disables_it():
    x, W, b, A, B = _inputs(8, 12, 6, 3, grad=False)
    y1 = lk.lora_linear(x, W, b, A, B, dropout_p=0.5, dropout_seed=5, backend="torch")
    y2 = lk.lora_linear(x, W, b, A, B, dropout_p=0.5, dropout_seed=5, backend="torch")
    y3 = lk.lora_linear(x, W, b, A, B, dropout_p=0.5, dropout_seed=6, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    y_eval = lk.lora_linear(x, W, b, A, B, dropout_p=0.5, training=False, backend="torch")
    assert torch.equal(y_eval, lk.lora_linear(x, W, b, A, B, backend="torch"))
    torch.manual_seed(1)
    a = lk.lora_linear(x, W, b, A, B, dropout_p=0.5, backend="torch")
    torch.manual_seed(1)
    assert torch.equal(a, lk.lora_linear(x, W, b, A, B, dropout_p=0.5, backend="torch"))


def test_empty_batch():
    x = torch.empty(0, 9, requires_grad=True)
    _, W, b, A, B = _inputs(1, 9, 5, 2)
    y = lk.lora_linear(x, W, b, A, B, backend="torch")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 9) and torch.equal(A.grad, torch.zeros_like(A))


def test_nan_propagates_only_to_its_row():
    x, W, b, A, B = _inputs(4, 8, 6, 2, grad=False)
    x[2, 3] = float("nan")
    y = lk.lora_linear(x, W, b, A, B, backend="torch")
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3]]).any()


# ---------------------------------------------------------------------------- bad input
def _good():
    x, W, b, A, B = _inputs(3, 8, 5, 2, grad=False)
    return dict(x=x, weight=W, bias=b, lora_a=A, lora_b=B)


@pytest.mark.parametrize("field,value,exc,needle", [
    ("x", [[1.0]], TypeError, "x"),
    ("x", torch.ones(3, 8, dtype=torch.int64), TypeError, "x"),
    ("x", torch.ones(3, 9), ValueError, "x"),
    ("x", torch.tensor(1.0), ValueError, "x"),
    ("weight", torch.ones(5, 8, 1), ValueError, "weight"),
    ("weight", torch.ones(5, 8, dtype=torch.float16), TypeError, "weight"),
    ("bias", torch.ones(4), ValueError, "bias"),
    ("lora_a", torch.ones(2, 7), ValueError, "lora_a"),
    ("lora_b", torch.ones(5, 3), ValueError, "lora_b"),
    ("lora_b", torch.ones(4, 2), ValueError, "lora_b"),
    ("lora_a", torch.ones(2, 8, dtype=torch.int32), TypeError, "lora_a"),
])
def test_bad_tensors_raise_naming_the_argument(field, value, exc, needle):
    kw = _good()
    kw[field] = value
    with pytest.raises(exc, match=needle):
        lk.lora_linear(**kw, backend="torch")


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(training="yes"), TypeError, "training"),
    (dict(backend="fastest"), ValueError, "backend"),
])
def test_bad_scalars_raise(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        lk.lora_linear(**_good(), **kw)


def test_meta_device_mismatch_is_named():
    kw = _good()
    kw["lora_b"] = torch.ones(5, 2, device="meta")
    with pytest.raises(ValueError, match="lora_b"):
        lk.lora_linear(**kw, backend="torch")


def test_cuda_backend_on_cpu_explains_itself():
    with pytest.raises(lk.BackendUnavailableError, match="CUDA"):
        lk.lora_linear(**_good(), backend="cuda")
