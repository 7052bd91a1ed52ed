"""FP8 e4m3 weights (per-output-channel scale) in the GEMM core: the kernel's integer decode of
all 256 codes bit for bit against torch's float8_e4m3fn, and the fused forward / dX against
float64 of the dequantized weight (interpreter: codes travel as bytes)."""

import pytest
import torch
import triton
import triton.language as tl

from helpers import interpreting, rel_err, triton_dtypes
from lora_kernels import reference
from lora_kernels.ops import fp8
from lora_kernels.triton.gemm.formats import e4m3_to_f32

pytestmark = pytest.mark.skipif(not interpreting(), reason="Triton kernels: interpreter on CPU")


@triton.jit
def _decode_kernel(codes, out, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out + i, e4m3_to_f32(tl.load(codes + i)))


def test_e4m3_decode_bit_exact_for_all_256_codes():
    """The GEMM loader's decode (formats.e4m3_to_f32) on the integer codes 0..255."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256, dtype=torch.float32)
    _decode_kernel[(1,)](codes, out, BLOCK=256)
    want = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert nan.sum() == 2 and torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))  # ±0 too


@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape", [(19, 33), (40, 17)])
def test_fp8_fused_forward_and_dx(dtype, shape):
    from lora_kernels.triton import quant_lora as T
    n, k = shape
    g = torch.Generator().manual_seed(0)
    w = fp8.quantize_fp8(torch.randn(n, k, generator=g) * 0.2)
    W = fp8.dequantize(w, torch.float64)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype)
    x, b, a, bb, dy = rnd(5, k), rnd(n), rnd(4, k, sc=0.3), rnd(n, 4, sc=0.3), rnd(5, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for mode in (1, 2):
        y, xa = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=mode)
        # the kernel rounds code·scale to the MMA dtype: the reference sees the same W
        Wr = fp8.dequantize(w, dtype).double()
        low = 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
        want = x.double() @ Wr.t() + b.double() + low
        assert rel_err(y, want) <= tol
    assert rel_err(W.to(dtype), fp8.dequantize(w, dtype)) == 0.0
    dx, db, da, dbb = T.quant_lora_bwd(dy, x, w, a, bb, xa, 0.5, 0.3, 7, (True, True, True, True))
    want_dx = dy.double() @ fp8.dequantize(w, dtype).double() + reference.apply_dropout(
        0.5 * (dy.double() @ bb.double()) @ a.double(), 7, 0.3)
    assert rel_err(dx, want_dx) <= tol
    assert rel_err(db, dy.double().sum(0)) <= tol
    assert rel_err(dbb, 0.5 * dy.double().t() @ xa.double()) <= tol


def test_quantize_fp8_rejects_bad_input():
    with pytest.raises(ValueError, match="weight"):
        fp8.quantize_fp8(torch.randn(3))
    with pytest.raises(ValueError, match="weight"):
        fp8.quantize_fp8(torch.ones(3, 4, dtype=torch.int32))
