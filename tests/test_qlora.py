"""NF4 (QLoRA) base weights: bitsandbytes' storage read directly (ops/nf4.py), the torch path
exact against ``bitsandbytes.functional.dequantize_4bit``, the Triton decode in the GEMM core's
K loop (interpreter) against float64 of the dequantized weight, and the public op."""

import pytest
import torch

from helpers import interpreting, rel_err, triton_dtypes
from lora_kernels import reference
from lora_kernels.ops import nf4, quant_tiles
from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

# (N, K): odd K with blocks straddling rows; 305 blocks > 256 (several nested absmax2 entries).
SHAPES = [(19, 33), (300, 65)]


def linear4bit(n, k, dtype, nested, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=nested)
    return layer.to(dtype).to("cpu")  # quantizes on the move (Params4bit)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_exact_against_bitsandbytes(nested, dtype, shape, monkeypatch):
    layer = linear4bit(*shape, dtype, nested)
    w = nf4.from_params4bit(layer.weight)
    assert w.nested == nested and w.dtype == dtype and w.shape == shape
    want = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(nf4.dequantize(w), want)
    n = shape[0]
    tiles = [nf4.dequantize_rows(w, a, min(n, a + 7)) for a in range(0, n, 7)]
    assert torch.equal(torch.cat(tiles), want)


def _inputs(m, n, k, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype)
    return rnd(m, k), rnd(n), rnd(r, k, sc=0.3), rnd(n, r, sc=0.3), rnd(m, n)


def _want(x, W, b, a, bb, s, p, seed, dy):
    """float64 forward and (dx, db, da, dB) of the reference with the dequantized W frozen."""
    d = lambda t: t.detach().double().requires_grad_(True)
    x64, b64, a64, bb64 = d(x), d(b), d(a), d(bb)
    y = reference.lora_linear(x64, W.double(), b64, a64, bb64, s, p, seed)
    y.backward(dy.double())
    return y, x64.grad, b64.grad, a64.grad, bb64.grad


def _check(backend, nested, dtype, shape, p, tol, monkeypatch=None):
    n, k = shape
    m, r, s = 7, 5, 0.5
    layer = linear4bit(n, k, dtype, nested)
    w = nf4.from_params4bit(layer.weight)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x, b, a, bb, dy = _inputs(m, n, k, r, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, a, bb)]
    y = lora_linear_nf4(leaves[0], layer.weight, leaves[1], leaves[2], leaves[3], scaling=s,
                        dropout_p=p, backend=backend, dropout_seed=99)
    y.backward(dy)
    want = _want(x, W, b, a, bb, s, p, 99, dy)
    assert rel_err(y, want[0]) <= tol
    for t, g in zip(leaves, want[1:]):
        assert rel_err(t.grad, g) <= tol


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_against_float64(nested, dtype, monkeypatch):
    monkeypatch.setattr(quant_tiles, "ROWS_PER_TILE", 8)  # several tiles on the small shapes
    # bf16: dx is summed over the row tiles in bf16 (one rounding per tile of 8 rows here).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape, p in ((SHAPES[0], 0.0), (SHAPES[1], 0.25)):
        _check("torch", nested, dtype, shape, p, tol)


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
def test_triton_nf4_op_interpreter(nested, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    _check("triton", nested, dtype, SHAPES[0], 0.0, tol)
    _check("triton", nested, dtype, (37, 129), 0.3, tol)


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
def test_triton_nf4_kernel_modes_and_dx(nested, aligned):
    """Both low-rank modes of the forward and the dX GEMM read the same 4-bit bytes (the Wᵀ
    view's flat indices), against float64 of bitsandbytes' dequantized W. ``aligned``: K a
    multiple of 64, where the forward loads one scale per tile column."""
    from lora_kernels.triton import quant_lora as T
    n, k = ((21, 128) if aligned else (300, 65)) if nested else ((19, 128) if aligned else (19, 33))
    layer = linear4bit(n, k, torch.float32, nested)
    w = nf4.from_params4bit(layer.weight)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    x, b, a, bb, dy = _inputs(3, n, k, 5, torch.float32)
    for mode in (1, 2):
        y, xa = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=mode)
        low = 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
        want = x.double() @ W.t() + b.double() + low
        assert rel_err(y, want) <= 1e-5
    dx, db, da, dbb = T.quant_lora_bwd(dy, x, w, a, bb, xa, 0.5, 0.3, 11,
                                       (True, False, False, True))
    want_dx = dy.double() @ W + reference.apply_dropout(
        0.5 * (dy.double() @ bb.double()) @ a.double(), 11, 0.3)
    assert rel_err(dx, want_dx) <= 1e-5 and db is None and da is None
    assert rel_err(dbb, 0.5 * dy.double().t() @ xa.double()) <= 1e-5


def test_bad_inputs_name_the_argument():
    layer = linear4bit(19, 33, torch.float32, False)
    x, b, a, bb, _ = _inputs(4, 19, 33, 5, torch.float32)
    with pytest.raises(TypeError, match="weight"):
        lora_linear_nf4(x, torch.randn(19, 33), b, a, bb)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear_nf4(x, layer.weight, b, a[:, :5], bb)
    with pytest.raises(ValueError, match="x"):
        lora_linear_nf4(x[:, :5], layer.weight, b, a, bb)
    with pytest.raises(TypeError, match="x must be"):
        lora_linear_nf4(x.double(), layer.weight, b, a, bb)
    with pytest.raises(ValueError, match="quant_type"):
        fp4 = bnb.nn.Linear4bit(33, 19, bias=False, quant_type="fp4").to("cpu")
        nf4.from_params4bit(fp4.weight)


def test_nf4_specs_and_register_budget():
    """The weight axis is in the spec list; NF4 combinations the loader cannot serve are refused
    by name; the NF4 pruner keeps the decoded tile within its register budget (the budget
    that compiled spill-free for sm_90a in bench/sass_report.py)."""
    from lora_kernels.triton import configs as C
    from lora_kernels.triton.gemm import spec as SP
    from lora_kernels.triton.gemm.formats import prune_packed
    specs = SP.legal_specs()
    assert {s.weight for s in specs} == set(SP.WEIGHT)
    for bad in (dict(schedule="persistent"), dict(schedule="persistent", store="tma"),
                dict(col_scale="vector")):
        with pytest.raises(ValueError, match="4-bit"):
            SP.GemmSpec(weight="nf4", **bad)
    # the multi-adapter GEMM over a quantized W (tests/test_quant_multi_lora.py)
    assert SP.GemmSpec(weight="nf4", rows="gathered", lowrank="per_slot") in specs
    assert SP.GemmSpec(weight="nf4_nested", lowrank="seeded").constexprs()["WEIGHT"] == 2
    prune = prune_packed(C.prune_dropout)
    assert prune(C.GEMM_LARGE, {}, WEIGHT=0) == C.GEMM_LARGE
    for weight, dropout, cap in ((1, False, 32), (1, True, 16), (2, False, 16)):
        kept = prune(C.GEMM_LARGE, {}, WEIGHT=weight, DROPOUT=dropout)
        assert kept
        for c in kept:
            threads = 32 * c.num_warps
            assert c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= cap * threads
            assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * threads


# The pair decode (formats._nf4_rows): K0 even and unaligned (one scale gather per byte), K0 a
# multiple of 64 (one scale per row and 64-chunk), tiles whose contiguous axis is shorter than
# a block (SUB = C) and longer (C = 128: two chunks, NB = 2), ragged K slabs (c_lim from k_ok).
BIG_TILES = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SPLIT_K=1, WARP_SPEC=False)


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape", [(21, 66), (19, 256), (130, 192)])
@pytest.mark.parametrize("config", [None, BIG_TILES])
def test_triton_nf4_pair_decode(nested, dtype, shape, config):
    """Forward (both low-rank modes) and dX (dropout) against float64 of bitsandbytes'
    dequantized W, in the storage dtype (fp32 / fp16): bit-exact decodes give errors at the
    accumulation level only."""
    from lora_kernels.triton import quant_lora as T
    from lora_kernels.triton.gemm.formats import QFLAG_ALIGNED, QFLAG_PAIRS
    n, k = shape
    layer = linear4bit(n, k, dtype, nested, seed=k)
    w = nf4.from_params4bit(layer.weight)
    flags = T.packed(w).layout_flags()
    assert flags == int(QFLAG_PAIRS) | (int(QFLAG_ALIGNED) if k % 64 == 0 else 0)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for m in (3, 37):  # the split-K decode path and the tiles path
        x, b, a, bb, dy = _inputs(m, n, k, 5, dtype, seed=m)
        for mode in (1, 2):
            y, xa = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=mode, config=config)
            low = 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
            assert rel_err(y, x.double() @ W.t() + b.double() + low) <= tol
        dx, _, _, _ = T.quant_lora_bwd(dy, x, w, a, bb, xa, 0.5, 0.3, 5,
                                       (True, False, False, False), config=config)
        want_dx = dy.double() @ W + reference.apply_dropout(
            0.5 * (dy.double() @ bb.double()) @ a.double(), 5, 0.3)
        assert rel_err(dx, want_dx) <= tol


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
@pytest.mark.parametrize("nested", [False, True])
def test_triton_nf4_pair_tile_is_dequantize(nested):
    """The decoded tiles themselves, read back through an identity GEMM (x = I, no LoRA),
    equal ``dequantize_4bit`` bit for bit, fp32 storage (the identity makes the GEMM exact)."""
    from lora_kernels.triton import quant_lora as T
    from lora_kernels.triton.fused_gemm import fused_gemm
    n, k = 70, 192
    layer = linear4bit(n, k, torch.float32, nested, seed=3)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    pw = T.packed(nf4.from_params4bit(layer.weight))
    for config in (None, BIG_TILES):
        y = torch.empty(k, n)
        fused_gemm(torch.eye(k), pw, y, config=config, small_m_max=0)
        assert torch.equal(y, W.t())
        dx = torch.empty(n, k)
        fused_gemm(torch.eye(n), pw.t(), dx, config=config, small_m_max=0)
        assert torch.equal(dx, W)
