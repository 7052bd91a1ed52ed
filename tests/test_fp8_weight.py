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
from lora_kernels.triton.gemm.formats import QFLAG_HW_CVT, e4m3_as_f16, e4m3_to_f32, fp8_tile

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


@triton.jit
def _as_f16_kernel(codes, out, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out + i, e4m3_as_f16(tl.load(codes + i)))


def test_e4m3_as_f16_is_the_code_times_2_to_minus_8_for_all_256_codes():
    """The K loop's decode (formats.e4m3_as_f16): fp16 bits = code·2⁻⁸ exactly, subnormals and
    ±0 included; the two NaN codes (which quantize_fp8 never writes) come out as ±1.875."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256, dtype=torch.float16)
    _as_f16_kernel[(1,)](codes, out, BLOCK=256)
    want = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    got = out.float() * 256.0
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert got[nan].tolist() == [480.0, -480.0]


@triton.jit
def _tile_kernel(codes, scale, out, N0, K0, stride_wn, stride_wk, k, col0,
                 SCALE_ALONG_N: tl.constexpr, QROUND: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    rk = (k + tl.arange(0, BLOCK_K)).to(tl.int64)
    rn = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_lim = N0 if SCALE_ALONG_N else K0
    k_lim = K0 if SCALE_ALONG_N else N0
    col_ok, k_ok = rn < n_lim, rk < k_lim
    w_ptrs = codes + rn[None, :] * stride_wn + rk[:, None] * stride_wk
    wq = (scale, scale, scale, 0.0, stride_wn, stride_wk)
    byte = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0)
    w = fp8_tile(byte, wq, col0, k, col_ok, k_ok, SCALE_ALONG_N, QROUND, BLOCK_K, BLOCK_N)
    tl.store(out + tl.arange(0, BLOCK_K)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], w)


@pytest.mark.parametrize("hw", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_fp8_tile_is_code_times_scale_bit_for_bit(transposed, hw):
    """One K-step tile of the forward's Wᵀ (scale along N) and of dX's W view (scale along K),
    ragged at both edges, against float8 → fp32 times the row scale (one fp32 rounding): the
    2⁻⁸ / 2⁸ split of the integer decode changes no bit; ``hw``: the sm_89+ conversion's form
    (QFLAG_HW_CVT; the interpreter emulates float8) gives the same bits."""
    qround = int(QFLAG_HW_CVT) if hw else 0
    g = torch.Generator().manual_seed(3)
    n0, k0 = 21, 37
    w = fp8.quantize_fp8(torch.randn(n0, k0, generator=g) * 3.0)
    codes = w.codes.contiguous().view(torch.uint8).reshape(-1)
    full = w.codes.float() * w.scale.float()[:, None]           # [n0, k0] fp32
    bk, bn = 16, 32
    for k, col0 in ((16, 0), (0, 16)):
        out = torch.full((bk, bn), float("nan"))
        if transposed:  # tile rows = W rows k.., columns = W columns col0..
            _tile_kernel[(1,)](codes, w.scale.float(), out, n0, k0, 1, k0, k, col0,
                               SCALE_ALONG_N=False, QROUND=qround, BLOCK_K=bk, BLOCK_N=bn)
            want = torch.zeros(bk, bn)
            blk = full[k:k + bk, col0:col0 + bn]
        else:           # tile rows = W columns k.., columns = W rows col0..
            _tile_kernel[(1,)](codes, w.scale.float(), out, n0, k0, k0, 1, k, col0,
                               SCALE_ALONG_N=True, QROUND=qround, BLOCK_K=bk, BLOCK_N=bn)
            want = torch.zeros(bk, bn)
            blk = full.t()[k:k + bk, col0:col0 + bn]
        want[:blk.shape[0], :blk.shape[1]] = blk
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("hw", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape", [(19, 33), (40, 17)])
def test_fp8_fused_forward_and_dx(dtype, shape, hw, monkeypatch):
    """Forward (seeded and in-loop modes) and dX (dropout, dB, dA) over an FP8 W; ``hw``: the
    launcher told the device converts e4m3 in hardware (what sm_89+ launches take)."""
    from lora_kernels.triton import fused_gemm
    from lora_kernels.triton import quant_lora as T
    monkeypatch.setattr(fused_gemm, "hw_cvt_ok", lambda t: hw)
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
