"""The slab route for weight-only FP8 e4m3 bases (lora_kernels/triton/nf4_slabs.py, issue #16):
W decoded once per bounded slab (``code·scale`` in fp32, then the compute dtype), then the dense
fused GEMM per slab. Interpreter runs (fp32 / fp16): the slabs bit-exact against
``ops.fp8.dequantize_rows`` (every one of the 256 codes included), the op's forward and
gradients through the route against float64 of the dequantized W on odd shapes (several slabs,
the last ragged), bias or not, dropout in training; the M threshold and ``route=``; no N×K
tensor in a training step; the first dX slab making dyb and dB; the fp8 x fp8 forward
(``act_quant``) never takes the route."""

import pytest
import torch

from helpers import (DecodeSpy, check_slab_dx_first_slab, check_slab_probe, check_slab_route_op,
                     interpreting, rel_err, slab_inputs, triton_dtypes)
from lora_kernels.ops import fp8, lora_linear_fp8

needs_interpreter = pytest.mark.skipif(not interpreting(),
                                       reason="the interpreter runs the Triton kernels on CPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitude: the per-row scale matters
    rows = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n)[:, None]
    return fp8.quantize_fp8(rows)


def _all_codes_weight(n, k, seed=0):
    """Every byte 0..255 (NaN codes 0x7f / 0xff, subnormals, ±0 included), shuffled, with
    random positive scales."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(n * k, dtype=torch.int64) % 256
    codes = codes[torch.randperm(n * k, generator=g)].to(torch.uint8).reshape(n, k)
    scale = torch.rand(n, generator=g) * 3.0 + 1e-3
    return fp8.FP8Weight(codes=codes, scale=scale)


def _same(got, want):
    """Bit-for-bit equal, NaN where NaN (payloads aside)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


@needs_interpreter
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape", [(21, 65), (37, 192)])
def test_decoded_fp8_slab_is_dequantize_rows(dtype, shape):
    """Row slabs, column slabs, masked and whole-tile (unmasked) decode forms equal
    ``dequantize_rows`` bit for bit in the compute dtype; random and all-256-code weights."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton.quant_lora import packed
    n, k = shape
    for w in (_weight(n, k, seed=k), _all_codes_weight(n, k, seed=n)):
        W = fp8.dequantize_rows(w, 0, n, dtype)
        pw = packed(w)
        ws = torch.full((n, k), float("nan"), dtype=dtype)
        # (0, 16, 0, 64): whole interpreter tiles (the EVEN form)
        for n0, n1, c0, c1 in ((0, n, 0, k), (3, n - 2, 0, k), (0, n, 64, k), (5, 17, 0, 64),
                               (0, 16, 0, 64)):
            got = S.decode_slab(pw, ws, n0, n1, c0, c1)[: n1 - n0, : c1 - c0]
            assert _same(got, W[n0:n1, c0:c1]), (n0, n1, c0, c1)


@needs_interpreter
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
def test_fp8_slab_hw_cvt_form_matches(dtype):
    """The ``HW_CVT`` form (the hardware e4m3 conversion, what sm_89+ runs) gives the same
    values as ``dequantize_rows``, masked and whole tiles. Finite codes only here: the
    interpreter's float8e4nv reads 0x7f / 0xff as ±480, not NaN (the GPU test
    test_fp8_gpu.py::test_fp8_slab_decode_on_gpu checks all 256 codes on the hardware)."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton.quant_lora import packed
    n, k = 21, 130
    w = _all_codes_weight(n, k, seed=3)
    codes = w.codes.clone()
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # the largest finite magnitude, sign kept
    w = fp8.FP8Weight(codes=codes, scale=w.scale)
    W = fp8.dequantize_rows(w, 0, n, dtype)
    ws = torch.empty(n, k, dtype=dtype)
    for n0, n1, c0, c1 in ((0, n, 0, k), (0, 16, 64, 128)):
        got = S.decode_slab(packed(w), ws, n0, n1, c0, c1, hw_cvt=True)[: n1 - n0, : c1 - c0]
        assert torch.equal(got, W[n0:n1, c0:c1]), (n0, n1, c0, c1)


@needs_interpreter
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape,p,bias", [((150, 200), 0.0, True), ((130, 65), 0.3, False)])
def test_fp8_slab_route_op_against_float64(dtype, shape, p, bias, monkeypatch):
    """The public op with the threshold at 1 and a small workspace budget (3 row slabs, the
    last ragged; 2–4 column slabs): y and the grads of x, bias, lora_a, lora_b against float64
    of the dequantized W, dropout in training included."""
    n, k = shape
    w = _weight(n, k, seed=n)
    check_slab_route_op(monkeypatch, lora_linear_fp8, w, fp8.dequantize(w, dtype).double(), dtype,
                        p, bias, TOL[dtype])


@needs_interpreter
def test_fp8_route_threshold_and_route_argument(monkeypatch):
    """FP8 below ``min_rows()``: the in-mainloop kernels (no slab decode); at or above it:
    the slabs, with the same y; ``route=`` forces either; the fp8 x fp8 forward never takes
    the route (its GEMM multiplies the codes themselves)."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton import quant_lora as T
    n, k = 40, 128
    w = _weight(n, k)
    x, b, a, bb, _ = slab_inputs(10, n, k, 3, torch.float32)
    monkeypatch.setattr(S, "SLAB_BYTES", 16 * k * 4)
    assert S.use_slabs(S.SLAB_MIN_ROWS, T.packed(w))
    assert not S.use_slabs(S.SLAB_MIN_ROWS - 1, T.packed(w))
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "10")
    outs = {}
    for m, want_slabs in ((9, False), (10, True)):
        spy = DecodeSpy(monkeypatch, n)
        y, _ = T.quant_lora_fwd(x[:m], w, b, a, bb, 0.5, 0.0, 0)
        assert (spy.fwd > 0) == want_slabs
        outs[m] = y
    spy = DecodeSpy(monkeypatch, n)
    y_slab, _ = T.quant_lora_fwd(x[:9], w, b, a, bb, 0.5, 0.0, 0, route="slabs")
    y_main, _ = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, route="mainloop")
    assert spy.fwd > 0
    assert rel_err(y_slab, outs[9].double()) <= 1e-6
    assert rel_err(y_main, outs[10].double()) <= 1e-6
    spy = DecodeSpy(monkeypatch, n)
    T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, "e4m3_per_token")
    assert spy.fwd == 0
    with pytest.raises(ValueError, match="route"):
        T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, route="fast")


@needs_interpreter
def test_fp8_slab_step_makes_no_whole_weight(monkeypatch):
    """A training step (forward and backward of the Triton backend functions, dropout on) on
    the FP8 slab route never makes a floating-point tensor as big as N×K (the codes are N×K
    bytes themselves; the custom op would hide its body from the probe)."""
    n, k = 129, 130  # N·K = 16770, larger than x [33, 130] and y [33, 129]
    w = _weight(n, k, seed=4)
    check_slab_probe(monkeypatch, w, n, k)


@needs_interpreter
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp8_slab_dx_first_slab_makes_dyb_and_db(p, monkeypatch):
    """The first FP8 dX slab's GEMM makes dyb and dB itself (helpers.check_slab_dx_first_slab)."""
    w = _weight(130, 150, seed=7)
    check_slab_dx_first_slab(monkeypatch, w, fp8.dequantize(w, torch.float32).double(), p)
