"""The NF4 decode GEMV (lora_kernels/triton/nf4_gemv.py, M ≤ GEMV_MAX_ROWS) under the CPU
interpreter, against float64 of ``bitsandbytes.functional.dequantize_4bit``, and the NF4 op's
routing to it. GPU checks (bf16, K = 4096) are in tests/test_gpu_quant_weights.py."""

import pytest
import torch

from helpers import interpreting, nf4_linear, rel_err, triton_dtypes
from lora_kernels.ops import nf4
from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

pytestmark = pytest.mark.skipif(not interpreting(),
                                reason="the interpreter runs the Triton kernels on CPU")



def _rnd(g, *shape, dtype, sc=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * sc).to(dtype)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
# (2, 32, 256): whole tiles and slabs in the interpreter's config (EVEN: unmasked loads)
@pytest.mark.parametrize("M,N,K", [(1, 19, 128), (3, 33, 320), (8, 40, 256), (2, 1, 64),
                                   (2, 32, 256)])
@pytest.mark.parametrize("bias,lora", [(True, "seeded"), (False, None), (True, None),
                                       (False, "in_kernel")])
def test_gemv_against_dequantized_float64(nested, dtype, M, N, K, bias, lora):
    """Odd N, M = 1..8, K a multiple of 64 over 1..5 blocks (ragged last slab), nested or not,
    bias and the LoRA term off, given xa (seeded) or xa = x·Aᵀ made in the kernel; fp32
    storage and fp16 (the storage rounding of W is the only difference from dequantize_4bit,
    see the kernel's docstring)."""
    from lora_kernels.triton.nf4_gemv import GEMV_MAX_ROWS, gemv_supported, nf4_gemv
    from lora_kernels.triton.quant_lora import packed_nf4
    layer = nf4_linear(N, K, dtype, nested, seed=K + M)
    w = nf4.from_params4bit(layer.weight)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    pw = packed_nf4(w)
    # the layout is the GEMV's (routing sends M ≤ 2 / 4 here; the kernel takes M ≤ 8)
    assert gemv_supported(pw, 1) and M <= GEMV_MAX_ROWS
    g = torch.Generator().manual_seed(M * 100 + N)
    x, b = _rnd(g, M, K, dtype=dtype), _rnd(g, N, dtype=dtype)
    u, lb = _rnd(g, M, 5, dtype=dtype), _rnd(g, N, 5, dtype=dtype, sc=0.3)
    la = _rnd(g, 5, K, dtype=dtype, sc=0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    y = torch.full((M, N), float("nan"), dtype=dtype)
    for cfg in (None, dict(BLOCK_M=triton_block_m(M), BLOCK_N=8, CHUNKS=1, SPLIT_K=4,
                           num_warps=1, DECODE=0)):  # the launcher's choice, the pair tables
        if lora == "in_kernel":
            u = torch.full((M, 5), float("nan"), dtype=dtype)
        nf4_gemv(x, pw, y, b if bias else None, u if lora else None, lb if lora else None,
                 0.7, la=la if lora == "in_kernel" else None, config=cfg)
        want = x.double() @ W.t()
        if bias:
            want = want + b.double()
        if lora == "in_kernel":
            xa = x.double() @ la.double().t()
            assert rel_err(u, xa) <= tol
            want = want + 0.7 * xa @ lb.double().t()
        elif lora:
            want = want + 0.7 * u.double() @ lb.double().t()
        assert rel_err(y, want) <= tol


def triton_block_m(m):
    return 1 << max(m - 1, 0).bit_length()


def test_gemv_takes_only_what_it_supports():
    """Routed: M ≤ 2 (plain) / 4 (nested), the forward's W, K % 64 == 0; beyond that the GEMM
    core's 16-row tensor-core tile decodes fewer instructions per element (nf4_gemv.py)."""
    from lora_kernels.triton.nf4_gemv import GEMV_MAX_ROWS, gemv_max_rows, gemv_supported
    from lora_kernels.triton.quant_lora import packed_nf4
    for nested, bound in ((False, 2), (True, 4)):
        pw = packed_nf4(nf4.from_params4bit(nf4_linear(8, 128, torch.float32, nested).weight))
        assert gemv_max_rows(pw) == bound <= GEMV_MAX_ROWS
        assert gemv_supported(pw, 1) and gemv_supported(pw, bound)
        assert not gemv_supported(pw, bound + 1) and not gemv_supported(pw, 0)
        assert not gemv_supported(pw.t(), 1)  # the dX view stays on the GEMM core
    odd = packed_nf4(nf4.from_params4bit(nf4_linear(8, 96, torch.float32, False).weight))
    assert not gemv_supported(odd, 1)  # K % 64 != 0: blocks straddle rows


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_routes_decode_rows_to_the_gemv(nested, M, p, monkeypatch):
    """lora_linear_nf4 (triton) sends M ≤ gemv_max_rows, K % 64 == 0 to nf4_gemv (p = 0: one
    launch, x·Aᵀ in the kernel; p > 0: after the dropout shrink) and anything else to the
    fused GEMM; forward and grads (dB reads the returned xa) match float64 either way."""
    from lora_kernels.triton import nf4_gemv as G
    from lora_kernels.triton import quant_lora as Q
    calls = []
    real = Q.nf4_gemv
    monkeypatch.setattr(Q, "nf4_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    N, K, r = 37, 192, 5
    layer = nf4_linear(N, K, torch.float32, nested, seed=M)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    g = torch.Generator().manual_seed(M)
    x, b = _rnd(g, M, K, dtype=torch.float32), _rnd(g, N, dtype=torch.float32)
    a, bb = _rnd(g, r, K, dtype=torch.float32, sc=0.3), _rnd(g, N, r, dtype=torch.float32, sc=0.3)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, a, bb)]
    y = lora_linear_nf4(leaves[0], layer.weight, leaves[1], leaves[2], leaves[3], scaling=0.5,
                        dropout_p=p, backend="triton", dropout_seed=3)
    assert len(calls) == (1 if M <= G.gemv_max_rows(Q.packed(nf4.from_params4bit(layer.weight)))
                          else 0)
    from lora_kernels import reference
    d = lambda t: t.detach().double().requires_grad_(True)
    x64, b64, a64, bb64 = d(x), d(b), d(a), d(bb)
    want = reference.lora_linear(x64, W, b64, a64, bb64, 0.5, p, 3)
    assert rel_err(y, want) <= 1e-5
    dy = _rnd(g, M, N, dtype=torch.float32)
    y.backward(dy)
    want.backward(dy.double())
    for t, ref in zip(leaves, (x64, b64, a64, bb64)):
        assert rel_err(t.grad, ref.grad) <= 1e-5


def test_gemv_leaves_its_inputs_and_tickets_unchanged():
    """Two launches give equal bits (the tickets are back at zero after each), and the inputs
    are not written."""
    from lora_kernels.triton.nf4_gemv import nf4_gemv
    from lora_kernels.triton.quant_lora import packed_nf4
    w = nf4.from_params4bit(nf4_linear(21, 128, torch.float32, True).weight)
    pw = packed_nf4(w)
    g = torch.Generator().manual_seed(5)
    x, b = _rnd(g, 2, 128, dtype=torch.float32), _rnd(g, 21, dtype=torch.float32)
    u, lb = _rnd(g, 2, 3, dtype=torch.float32), _rnd(g, 21, 3, dtype=torch.float32)
    before = [t.clone() for t in (x, b, u, lb, w.codes, w.absmax)]
    y1 = nf4_gemv(x, pw, torch.empty(2, 21), b, u, lb, 0.5)
    y2 = nf4_gemv(x, pw, torch.empty(2, 21), b, u, lb, 0.5)
    assert torch.equal(y1, y2)
    la = _rnd(g, 3, 128, dtype=torch.float32)
    xa1, xa2 = torch.empty(2, 3), torch.empty(2, 3)
    y1 = nf4_gemv(x, pw, torch.empty(2, 21), b, xa1, lb, 0.5, la=la)
    y2 = nf4_gemv(x, pw, torch.empty(2, 21), b, xa2, lb, 0.5, la=la)
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    for t, t0 in zip((x, b, u, lb, w.codes, w.absmax), before):
        assert torch.equal(t, t0)


def test_gemv_path_under_torch_compile():
    """The decode rows (M = 1, the GEMV with its own shrink) through torch.compile(fullgraph)
    of the NF4 custom op with backend "triton": the same bits as eager, and grads. (The op is
    called directly: the public entry's backend check imports modules, which dynamo refuses
    to trace for an explicit backend on CPU — outside this path.)"""
    from lora_kernels.ops.lora_linear_nf4 import op_args
    from lora_kernels.triton import quant_lora as Q
    layer = nf4_linear(24, 128, torch.float32, False, seed=9)
    g = torch.Generator().manual_seed(9)
    a = _rnd(g, 4, 128, dtype=torch.float32, sc=0.3).requires_grad_(True)
    bb = _rnd(g, 24, 4, dtype=torch.float32, sc=0.3).requires_grad_(True)
    x = _rnd(g, 1, 128, dtype=torch.float32)
    w = nf4.from_params4bit(layer.weight)  # the storage, as a compiled model holds it
    assert Q.gemv_supported(Q.packed(w), 1)

    def f(x):
        return torch.ops.lora_kernels.lora_linear_nf4(
            *op_args(x, w, None, a, bb, 0.5, 0.0, None, "triton"))[0]
    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    ga = a.grad.clone()
    a.grad = None
    ref = f(x)
    ref.sum().backward()
    assert torch.equal(y, ref) and torch.equal(ga, a.grad)


@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
def test_gemv_takes_a_misaligned_x(dtype):
    """A contiguous x starting mid-word (a flat buffer's tail) is copied before the word view,
    not read wrongly."""
    from lora_kernels.triton.nf4_gemv import nf4_gemv
    from lora_kernels.triton.quant_lora import packed_nf4
    layer = nf4_linear(9, 64, dtype, False, seed=4)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    g = torch.Generator().manual_seed(4)
    x = _rnd(g, 2 * 64 + 1, dtype=dtype)[1:].view(2, 64)
    assert x.is_contiguous() and x.data_ptr() % 8
    y = nf4_gemv(x, packed_nf4(nf4.from_params4bit(layer.weight)), torch.empty(2, 9, dtype=dtype))
    assert rel_err(y, x.double() @ W.t()) <= (1e-5 if dtype == torch.float32 else 2e-3)
