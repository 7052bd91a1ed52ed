"""Per-token FP8 e4m3 activation quantization fused with the LoRA shrink (issue #16, the
fp8×fp8 path's first kernel): one program per ``BLOCK_M`` rows of ``x [M, K]`` produces

* ``row_scale[m] = max_k |x[m, k]| / 448`` (fp32; 1 for an all-zero row),
* ``codes[m, k] = e4m3(x[m, k] / row_scale[m])`` — round to nearest even, saturated to ±448,
  subnormals kept (``m·2⁻⁹``), as uint8 bytes (bit-identical to torch's
  ``(x / s).clamp(-448, 448).to(torch.float8_e4m3fn)``),
* ``xa = x·Aᵀ`` ``[M, r]`` in x's dtype (the LoRA shrink, from the unquantized x: the low-rank
  term keeps x's precision) from the same K tiles as the row maximum.

Pass 1 over K reads x (HBM) for the maximum and the shrink; pass 2 re-reads the program's
``BLOCK_M × K`` slab (16 × 4096 × 2 B = 128 KiB, from L2) to encode. The encode is integer
arithmetic on the fp32 bits (no float8 type: the interpreter runs it, and it is the reference
for every GPU), the division ``tl.math.div_rn`` (correctly rounded, as torch's; plain ``/`` is
the approximate ``div.full.f32`` on NVIDIA GPUs). On sm_89+ (``HW_CVT``) the encode is the
hardware ``cvt.rn.satfinite.e4m3x2.f32`` instead (one instruction per two elements, the same
RNE + saturation to ±448): the sm_90a kernel shrinks from 1072 to 720 SASS instructions
(≈ 22 fewer per element), which keeps this pass near its HBM time (x read once, codes written
once: ≈ 96 MiB at M = 8192, K = 4096) instead of ALU-bound. tests/test_fp8_gpu.py checks it
bit for bit against torch on the device.

Consumer: the GEMM core's fp8 x fp8 form (spec weight ``fp8_act``, triton/quant_lora.py
``fp8_act_fwd``), whose epilogue applies ``row_scale[m]·col_scale[n]`` and adds ``s·xa·Bᵀ``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.triton.device import dot_precision, hw_cvt_ok, on_device

__all__ = ["e4m3_from_f32", "quantize_rows_e4m3", "hw_cvt_ok", "E4M3_MAX"]

E4M3_MAX = 448.0


@triton.jit
def e4m3_from_f32(v):
    """fp32 → e4m3fn code (int32 0..255): RNE, saturated to ±448 (0x7e / 0xfe), NaN → 0x7f,
    subnormals ``round(|v|·2⁹)`` (8 carries into the smallest normal, code 0x08)."""
    nan = v != v  # before the clamp: tl.minimum/maximum need not propagate NaN
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    # normal: drop 20 of fp32's 23 mantissa bits with round-half-even, rebias 127 → 7
    rounded = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    normal = rounded - ((127 - 7) << 3)
    # subnormal (|v| < 2⁻⁶): |v|·512 is exact and < 8; round half to even by hand
    f = tl.abs(v) * 512.0
    i = tl.floor(f)
    frac = f - i
    ii = i.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((ii & 1) == 1))
    sub = ii + up.to(tl.int32)
    mag = tl.where(a < (121 << 23), sub, normal)   # 121 = 127 − 6: 2⁻⁶, the smallest normal
    mag = tl.where(nan, 0x7F, mag)
    return (sign << 7) | mag


@triton.jit
def _quant_shrink_kernel(x_ptr, a_ptr, codes_ptr, scale_ptr, xa_ptr, M, K, R,
                         stride_xm, stride_ak, stride_ar, stride_cm, stride_um,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
                         HW_CVT: tl.constexpr = False):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rm64 = rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + (k + rk)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
        if HAS_LORA:
            at = tl.load(a_ptr + (k + rk)[:, None] * stride_ak + rr[None, :] * stride_ar,
                         mask=k_ok[:, None] & (rr < R)[None, :], other=0.0)
            xa = tl.dot(x, at, xa, input_precision=PRECISION)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)),
                     1.0)
    tl.store(scale_ptr + rm64, scale, mask=m_ok)
    if HAS_LORA:
        tl.store(xa_ptr + rm64[:, None] * stride_um + rr[None, :],
                 xa.to(xa_ptr.dtype.element_ty), mask=m_ok[:, None] & (rr < R)[None, :])
    for k in range(0, K, BLOCK_K):
        ok = m_ok[:, None] & ((k + rk) < K)[None, :]
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + (k + rk)[None, :], mask=ok, other=0.0)
        q = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], x.shape))
        if HW_CVT:
            code = q.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        else:
            code = e4m3_from_f32(q).to(tl.uint8)
        tl.store(codes_ptr + rm64[:, None] * stride_cm + (k + rk)[None, :], code, mask=ok)


def quantize_rows_e4m3(x: torch.Tensor, lora_a: torch.Tensor = None, *, block_m: int = 16,
                       block_k: int = 128, hw_cvt: bool = None):
    """``(codes uint8 [M, K], row_scale fp32 [M], xa [M, r] or None)`` for ``x [M, K]``
    (unit inner stride) and optional ``lora_a [r, K]`` (r ≤ 64). View ``codes`` as
    ``torch.float8_e4m3fn`` for torch. ``hw_cvt``: force the encode (None: the hardware
    conversion where :func:`hw_cvt_ok`, the integer one elsewhere; same codes)."""
    assert x.dim() == 2 and x.stride(1) == 1
    M, K = x.shape
    codes = torch.empty(M, K, dtype=torch.uint8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    has_lora = lora_a is not None and lora_a.shape[0] > 0
    R = lora_a.shape[0] if has_lora else 0
    assert R <= 64
    xa = torch.empty(M, R, dtype=x.dtype, device=x.device) if has_lora else None
    la = lora_a.t() if has_lora else x  # [K, r] view
    block_r = max(16, triton.next_power_of_2(R))
    prec = dot_precision(x.dtype)
    with on_device(x):
        if M:
            _quant_shrink_kernel[(triton.cdiv(M, block_m),)](
                x, la, codes, scale, xa if has_lora else scale, M, K, R, x.stride(0),
                la.stride(0) if has_lora else 0, la.stride(1) if has_lora else 0,
                codes.stride(0), xa.stride(0) if has_lora else 0, BLOCK_M=block_m,
                BLOCK_K=block_k, BLOCK_R=block_r, HAS_LORA=has_lora, PRECISION=prec,
                HW_CVT=hw_cvt_ok(x) if hw_cvt is None else bool(hw_cvt))
    return codes, scale, xa
