"""lora_linear_fp8 (FP8 e4m3 base, per-row scale) and the FP8 modules: the op on both backends
against float64 of the dequantized weight (Triton under the interpreter, fp32 / fp16), gradients,
dropout agreement across backends, no N×K tensor on the torch path, validation, fullgraph
compile, and FP8Linear / quantize_linears_fp8 / inject_lora_fp8 / the compressed-tensors layout."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import interpreting, rel_err, triton_dtypes
from lora_kernels.nn import (FP8Linear, FP8LoRALinear, inject_lora_fp8,
                             quantize_linears_fp8)
from lora_kernels.ops import fp8, lora_linear_fp8, quant_tiles

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _case(dtype, m=7, n=19, k=33, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = fp8.quantize_fp8(torch.randn(n, k, generator=g) * 0.2)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype)
    x, b, a, bb = rnd(m, k), rnd(n), rnd(r, k, sc=0.3), rnd(n, r, sc=0.3)
    return w, x, b, a, bb


def _want(w, x, b, a, bb, s):
    """float64 of the weight the backends multiply (code·scale rounded to x's dtype)."""
    W = fp8.dequantize(w, x.dtype).double()
    return x.double() @ W.t() + b.double() + s * (x.double() @ a.double().t()) @ bb.double().t()


def _backends():
    return ["torch"] + (["triton"] if interpreting() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grads_against_float64(backend, dtype):
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("CPU fp16 matmul: covered on the Triton backend")
    w, x, b, a, bb = _case(dtype)
    x, b, a, bb = (t.clone().requires_grad_(True) for t in (x, b, a, bb))
    y = lora_linear_fp8(x, w, b, a, bb, scaling=0.5, backend=backend)
    assert y.dtype == dtype and y.shape == (7, 19)
    assert rel_err(y, _want(w, x, b, a, bb, 0.5)) <= TOL[dtype]
    dy = torch.randn(7, 19, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    W = fp8.dequantize(w, dtype).double()
    d, A, B = dy.double(), a.double(), bb.double()
    xa = x.double() @ A.t()
    assert rel_err(x.grad, d @ W + 0.5 * (d @ B) @ A) <= TOL[dtype]
    assert rel_err(b.grad, d.sum(0)) <= TOL[dtype]
    assert rel_err(a.grad, 0.5 * (d @ B).t() @ x.double()) <= TOL[dtype]
    assert rel_err(bb.grad, 0.5 * d.t() @ xa) <= TOL[dtype]


@pytest.mark.skipif(not interpreting(), reason="Triton kernels: interpreter on CPU")
def test_dropout_same_mask_on_both_backends():
    w, x, b, a, bb = _case(torch.float32, m=5, n=11, k=17, r=3, seed=2)
    outs = {}
    for be in ("torch", "triton"):
        xs, As = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        y = lora_linear_fp8(xs, w, b, As, bb, scaling=2.0, dropout_p=0.4, dropout_seed=99,
                            backend=be)
        y.square().sum().backward()
        outs[be] = (y, xs.grad, As.grad)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert rel_err(got, want.double()) <= 1e-5
    # eval: no dropout, equals the float64 formula
    y = lora_linear_fp8(x, w, b, a, bb, scaling=2.0, dropout_p=0.4, training=False,
                        backend="torch")
    assert rel_err(y, _want(w, x, b, a, bb, 2.0)) <= 1e-5


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            # dequantized values only (the codes' own uint8 / float8 views are N×K bytes), by
            # storage (an expanded 0-d placeholder is N×K elements of one value)
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_torch_path_never_makes_the_whole_weight(monkeypatch):
    monkeypatch.setattr(quant_tiles, "ROWS_PER_TILE", 8)
    w, x, b, a, bb = _case(torch.float32, m=3, n=40, k=64)
    with _Largest() as mode:  # the backend functions (the custom op hides its body from a mode)
        y, xa = quant_tiles.lora_fwd(x, w, b, a, bb, 1.0, 0.0, 0)
        quant_tiles.lora_bwd(torch.ones_like(y), x, w, a, bb, xa, 1.0, 0.0, 0, (True,) * 4)
    assert 8 * 64 <= mode.largest < 40 * 64
    assert rel_err(y, _want(w, x, b, a, bb, 1.0)) <= 1e-5


def test_validation_names_the_argument():
    w, x, b, a, bb = _case(torch.float32)
    with pytest.raises(TypeError, match="weight"):
        lora_linear_fp8(x, fp8.dequantize(w), b, a, bb)
    with pytest.raises(TypeError, match="weight.codes"):
        lora_linear_fp8(x, fp8.FP8Weight(codes=fp8.dequantize(w), scale=w.scale), b, a, bb)
    with pytest.raises(ValueError, match="weight.scale"):
        lora_linear_fp8(x, fp8.FP8Weight(codes=w.codes, scale=w.scale[:3]), b, a, bb)
    with pytest.raises(TypeError, match="x"):
        lora_linear_fp8(x.double(), w, b, a, bb)
    with pytest.raises(ValueError, match="x"):
        lora_linear_fp8(x[:, :5], w, b, a, bb)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear_fp8(x, w, b, a, bb[:, :2])
    with pytest.raises(ValueError, match="bias"):
        lora_linear_fp8(x, w, b[:4], a, bb)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_fp8(x, w, b, a, bb, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        lora_linear_fp8(x, w, b, a, bb, backend="nope")


def test_scale_n1_accepted_and_3d_x_and_empty_batch():
    w, x, b, a, bb = _case(torch.float32)
    w1 = fp8.FP8Weight(codes=w.codes, scale=w.scale[:, None].clone())
    y = lora_linear_fp8(x.reshape(7, 1, 33), w1, b, a, bb, backend="torch")
    assert y.shape == (7, 1, 19)
    assert rel_err(y.reshape(7, 19), _want(w, x, b, a, bb, 1.0)) <= 1e-5
    assert lora_linear_fp8(x[:0], w, b, a, bb, backend="torch").shape == (0, 19)


def test_compile_fullgraph():
    from test_compile import _check_fwd_bwd
    w, *_ = _case(torch.float32, n=11, k=13)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, 13) * 0.3)
            self.b = nn.Parameter(torch.randn(11, 3) * 0.3)
            self.bias = nn.Parameter(torch.randn(11))

        def forward(self, x):
            return lora_linear_fp8(x, w, self.bias, self.a, self.b, scaling=0.5, backend="torch")
    _check_fwd_bwd(M(), torch.randn(2, 7, 13))


def test_fp8_linear_from_linear_and_compressed_tensors():
    lin = nn.Linear(33, 19)
    q = FP8Linear.from_linear(lin, backend="torch")
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (19,)
    x = torch.randn(4, 33)
    want = x.double() @ fp8.dequantize(q.fp8_weight, torch.float64).t() + lin.bias.double()
    assert rel_err(q(x), want) <= 1e-5
    # the per-row quantization is within e4m3's half-ulp (2⁻⁴ relative) of the original
    assert rel_err(fp8.dequantize(q.fp8_weight), lin.weight.detach().double()) <= 0.04
    ct = FP8Linear.from_compressed_tensors(q.weight, q.weight_scale[:, None], lin.bias,
                                           backend="torch")
    assert torch.equal(ct(x), q(x))
    per_tensor = FP8Linear.from_compressed_tensors(q.weight, torch.tensor([0.01]))
    assert torch.equal(per_tensor.weight_scale, torch.full((19,), 0.01))
    with pytest.raises(ValueError, match="weight.scale"):
        FP8Linear.from_compressed_tensors(q.weight, torch.ones(5))
    with pytest.raises(TypeError, match="linear"):
        FP8Linear.from_linear(q)


def test_quantize_model_then_lora_trains_only_lora():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    ref = [m.weight.detach().clone() for m in (model[0], model[2])]
    quantize_linears_fp8(model, skip=["2"], backend="torch")
    assert isinstance(model[0], FP8Linear) and type(model[2]) is nn.Linear
    inject_lora_fp8(model, ["0"], r=4, lora_alpha=8)
    lora = model[0]
    assert isinstance(lora, FP8LoRALinear) and lora.scaling == 2.0
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(5, 16)
    model(x).square().sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
    assert not any(p.requires_grad for p in lora.base_layer.parameters())
    h = (x.double() @ fp8.dequantize(lora.base_layer.fp8_weight, torch.float64).t()
         + lora.base_layer.bias.double()
         + 2.0 * (x.double() @ lora.lora_A.weight.double().t()) @ lora.lora_B.weight.double().t())
    assert rel_err(lora(x), h) <= 1e-5
    assert rel_err(model[2].weight, ref[1]) == 0.0
    sd = model.state_dict()
    assert "0.lora_A.weight" in sd and "0.base_layer.weight" in sd
    with pytest.raises(ValueError, match="target_modules"):
        inject_lora_fp8(model, ["nothing"], r=2)
    with pytest.raises(TypeError, match="skip"):
        quantize_linears_fp8(model, skip=3)


def test_from_torchao_per_row_float8_weight():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_
    lin = nn.Linear(64, 24)
    model = nn.Sequential(lin)
    quantize_(model, Float8WeightOnlyConfig())
    q = FP8Linear.from_torchao(model[0], backend="torch")
    x = torch.randn(5, 64)
    want = x.double() @ model[0].weight.dequantize().double().t() + model[0].bias.double()
    assert rel_err(q(x), want) <= 1e-5, torchao.__version__
    with pytest.raises(TypeError, match="weight"):
        fp8.from_torchao(torch.randn(3, 3))


@pytest.mark.parametrize("backend", _backends())
def test_fp8_linear_passes_dx_through_a_frozen_base(backend):
    """An FP8Linear inside a trained network (rank 0: no LoRA term) still gives x its grad."""
    q = FP8Linear.from_linear(nn.Linear(33, 19), backend=backend)
    x = torch.randn(6, 33).requires_grad_(True)
    dy = torch.randn(6, 19)
    q(x).backward(dy)
    W = fp8.dequantize(q.fp8_weight, torch.float64)
    assert rel_err(x.grad, dy.double() @ W) <= 1e-5
