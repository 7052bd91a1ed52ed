"""NF4 and FP8 (weight-only e4m3) at compute-bound M: decode W once, slab by slab, into a
bounded workspace in the compute dtype, then run the bf16/fp16 fused GEMM (the persistent
TMA/wgmma one on Hopper) on it.

Why (issue #16): the in-mainloop decode (gemm/formats.py through the K loop) decodes every
4-bit element once per BLOCK_M row tile — 64 times at M = 8192 — and its K loop issues 21.3
SASS instructions per decoded element on sm_90a against 0.0625 clk of wgmma per element at
BLOCK_M = 128: ≈ 2.7× the bf16 GEMM (notes/nf4perf.md). Decoding each element once costs
N·K·(½ byte read + 2 bytes written) ≈ 42 MB at K = N = 4096 (≈ 10 µs on an H200) and leaves
the GEMM itself exactly the dense one (notes/nf4big.md has the arithmetic). FP8 (issue #16,
notes/fp8slabs.md): the in-mainloop e4m3 decode runs once per 128-row M tile through pointer
loads (no TMA for W); a slab costs N·K·(1 + 2) bytes once and the GEMM is again the dense one.

* forward: for row slabs ``n0:n1`` of W, :func:`decode_slab` writes ``W[n0:n1, :]`` to the
  workspace, then ``fused_gemm`` writes ``y[:, n0:n1]`` (a column view of y) with its fused
  LoRA term: the first slab makes ``xa`` (in-loop / panel-shared, or the shrink before it with
  dropout), the others seed from it with ``lora_b[n0:n1]`` and ``bias[n0:n1]``;
* dX: for column slabs ``k0:k1`` of W (multiples of 64, so NF4 blocks stay whole and the
  packed-mask bytes and TMA bases stay aligned), the workspace holds ``W[:, k0:k1]`` and the
  fused GEMM writes ``dX[:, k0:k1]`` seeded by ``(dY·B)·A[:, k0:k1]`` (at large M the first
  slab's GEMM makes ``dY·B`` and dB itself, panel-shared, as the dense dX does); with dropout the mask
  is read from packed bits drawn once for the whole ``[M, K]`` grid (each slab reads its
  columns: a slab's own Philox redraw would number columns from 0).

Chunking dX along K (rather than along N with accumulation) writes every dX element once, in
one rounding, with its masked low-rank term in the same epilogue: no fp32 accumulator, no
read-modify-write of dX, the same result as the single-GEMM dX.

The workspace is one ``torch.empty`` per call (CUDA-graph and torch.compile safe, no host
sync: the slab plan is shape arithmetic), at most ``SLAB_BYTES`` (more only where the SMs
would otherwise idle, never more than half of W: :func:`plan`), reused by every slab (launches
on one stream are ordered). Never an N×K tensor: a plan that cannot cut W in two or more slabs
returns None and the op keeps the in-mainloop kernels.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton import configs as C
from lora_kernels.triton.dropout import dropout_keep_packed
from lora_kernels.triton.fp8_act_quant import hw_cvt_ok
from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.gemm.formats import (PackedWeight, e4m3_to_f32, nf4_row_pairs,
                                              nf4_tile)
from lora_kernels.triton.gemm.modes import (LoraMode, WEIGHT_FP8_E4M3, WEIGHT_NF4,
                                            WEIGHT_NF4_NESTED)
from lora_kernels.triton.lowrank import shrink

__all__ = ["SLAB_MIN_ROWS", "SLAB_BYTES", "min_rows", "plan", "use_slabs", "decode_slab",
           "slab_fwd", "slab_dx"]

# M from which the op decodes once into slabs (below: the in-mainloop kernels). At K = N =
# 4096 on an H100 an in-mainloop 128x128 tile issues 128·4096·21.3 SASS / 128 per clock =
# 47.6 µs, the slab route costs the decode (≈ 12.5 µs, bandwidth) + 2 launches per slab + the
# dense GEMM on slabs that must still fill the SMs (17.9 µs a tile): M = 512: in-mainloop one
# wave ≈ 48 µs, slabs ≈ 53 µs; M = 1024: two waves ≈ 95 µs against 53 µs (PREDICTION,
# notes/nf4big.md). Env LORA_KERNELS_NF4_SLAB_MIN_M overrides it (tests: both routes on
# small shapes). FP8 takes the same threshold. Its in-mainloop K loop issued 42 SASS per
# element per row tile in session 5 (break-even M ≈ 256, notes/fp8slabs.md); since session 6
# it is 6.3 with the sm_89+ cvt, under the MMA time by the roofline model at every M (M = 8192:
# in-mainloop 1.08× the bf16 GEMM, slabs 1.09×, both PREDICTIONS), so where FP8 should switch
# is for a GPU run to say (bench column fp8_mainloop beside fp8_ours).
SLAB_MIN_ROWS = 1024
# Workspace budget: 16 MiB = 2048 rows of W at K = 4096 in bf16, under a third of the 50 MB
# L2 of an H100/H200 where it stays between the decode and the GEMM that reads it (with the x
# row panels the GEMM streams beside it). 8 MiB (session 5) cut a 4096² W in 4 slabs a pass:
# 16 launches and 8 tail waves per training step where 2 slabs take 8 and 4 (roofline: NF4
# fwd+bwd 646.9 → 632 µs on an H100, PREDICTION); never more than half of W (plan()).
SLAB_BYTES = 16 << 20
# Slab edges: rows of W (forward) in multiples of 128 (a BLOCK_N, no ragged tile per slab)
# once a slab holds that many, else of 8 (16-byte TMA bases of y[:, n0:]); columns of W (dX)
# in multiples of the NF4 block.
ROW_GRANULE, ROW_GRANULE_MIN, COL_GRANULE = 128, 8, 64
# Decode tile: 64 rows x 128 columns per program, 4 warps (64 values per thread). Static
# sm_90a SASS per decoded element (bench/sass_report.py, bf16, plain / nested, spill-free):
# through formats.nf4_tile (nibble interleave by join + reshape, masked) 64x128/4 20.5 / 21.0;
# with the word store (WORDS) 12.6 / 12.9, and unmasked whole tiles (EVEN) 10.25 / 10.5
# (80 registers; 32x128/4 11.3, 64x256/4 9.4 at 167 registers). What is left is about one
# LDS (the table gather), FMUL, F2F and PRMT per element plus the nibble LOP3s.
# FP8 at the same tile: 5.25 SASS per element with the sm_89+ hardware e4m3 conversion (54
# registers), 21.4 with the integer assembly (70).
DECODE_ROWS, DECODE_COLS, DECODE_WARPS = 64, 128, 4
_INTERPRET_TILE = (16, 64)


def min_rows() -> int:
    """The route threshold (``SLAB_MIN_ROWS``, or the env override)."""
    env = os.environ.get("LORA_KERNELS_NF4_SLAB_MIN_M")
    if not env:
        return SLAB_MIN_ROWS
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"LORA_KERNELS_NF4_SLAB_MIN_M must be an integer row count, got "
                         f"{env!r}") from None


def _round_down(v: int, g: int) -> int:
    return max(g, v // g * g)


def _round_up(v: int, g: int) -> int:
    return -(-v // g) * g


def plan(M: int, rows: int, cols: int, elem: int, sms: int, granule: int,
         min_granule: int) -> Optional[int]:
    """Slab width along the cut axis of W (``rows`` of them, each ``cols`` elements of
    ``elem`` bytes), or None if W cannot be cut in two. The budget gives
    ``SLAB_BYTES / (cols·elem)``; on a GPU (``sms`` > 0) a slab is widened until its GEMM has
    about one wave of 128x128 tiles (at M = 1024 a 1024-row slab would give 64 tiles for 132
    SMs); never past half of W, so the workspace is always less than N·K."""
    fit = SLAB_BYTES // max(1, cols * elem)
    g = granule if fit >= granule else min_granule
    width = _round_down(fit, g)
    if sms:
        row_tiles = -(-M // 128)
        width = max(width, _round_up(-(-sms // row_tiles) * 128, g))
    width = min(width, _round_up(-(-rows // 2), min_granule))
    return width if width < rows else None


def use_slabs(M: int, w, threshold: Optional[int] = None) -> bool:
    """Whether a call with ``M`` rows of x takes the slab route: NF4 or weight-only FP8 e4m3
    (the fp8 x fp8 ``act_quant`` forward never comes here) and ``M ≥ threshold`` (default
    :func:`min_rows`, one threshold for both formats)."""
    return (isinstance(w, PackedWeight) and w.weight in _SLAB_WEIGHTS
            and M >= (min_rows() if threshold is None else threshold))


_SLAB_WEIGHTS = (int(WEIGHT_NF4), int(WEIGHT_NF4_NESTED), int(WEIGHT_FP8_E4M3))


@triton.jit
def _decode_slab_kernel(codes_ptr, out_ptr, absmax_ptr, absmax2_ptr, lut_ptr, offset,
                        n0, n1, c0, c1, K0, stride_om,
                        WEIGHT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                        QROUND: tl.constexpr, WORDS: tl.constexpr, OUT_BF16: tl.constexpr,
                        EVEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        HW_CVT: tl.constexpr = False):
    """``out[i, j] = W[n0 + i, c0 + j]`` for the ``[n1 − n0, c1 − c0]`` block of the NF4 W
    ``[N0, K0]``, decoded by the GEMM core's own code (gemm/formats.py) on rows of W, so the
    slab is bit-identical to what the in-mainloop kernels feed the MMA (rounded to the
    storage dtype, then out's dtype).

    ``WORDS`` (K0 even, c0 even, a 16-bit out): ``out_ptr`` is the int32 view of the slab and
    each byte's two elements are stored as one word (even column in the low half), with no
    nibble interleave (the static counts are at DECODE_ROWS). ``EVEN``: whole tiles inside
    W, no masks. Otherwise
    ``formats.nf4_tile`` on the Wᵀ view (strides ``(1, K0)``: its tile rows are rows of W).

    FP8 e4m3 (``WEIGHT == WEIGHT_FP8_E4M3``; ``absmax_ptr``: the fp32 scale per row of W):
    ``formats.e4m3_to_f32(code) · scale[row]`` in fp32, then out's dtype — the same product of
    the same two fp32 values as the core's ``fp8_tile`` (and ``ops.fp8.dequantize_rows``),
    with the scale loaded once per row instead of per element (no ``flat // K0``). ``HW_CVT``
    (sm_89+): the code to fp32 by the hardware e4m3 conversion (exact: every e4m3 value is
    an fp16 and an fp32; NaN stays NaN) instead of the integer assembly — static sm_90a
    64x128/4: 21.4 → 5.25 SASS per element, 70 → 54 registers (bench/sass_report.py)."""
    row0 = n0 + tl.program_id(0) * BLOCK_R
    col0 = c0 + tl.program_id(1) * BLOCK_C
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n1
    wq = (absmax_ptr, absmax2_ptr, lut_ptr, offset, 1, K0)
    out_rows = (rows - n0).to(tl.int64)[:, None] * stride_om
    if WEIGHT == WEIGHT_FP8_E4M3:
        cols = col0 + tl.arange(0, BLOCK_C)
        src = codes_ptr + rows.to(tl.int64)[:, None] * K0 + cols[None, :]
        dst = out_ptr + out_rows + (cols - c0)[None, :]
        if EVEN:
            scale = tl.load(absmax_ptr + rows)
            byte = tl.load(src)
        else:
            ok = row_ok[:, None] & (cols < c1)[None, :]
            scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
            byte = tl.load(src, mask=ok, other=0)
        if HW_CVT:
            q = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            q = e4m3_to_f32(byte)
        w = (q * scale[:, None]).to(out_ptr.dtype.element_ty)
        if EVEN:
            tl.store(dst, w)
        else:
            tl.store(dst, w, mask=ok)
    elif WORDS:
        even, odd = nf4_row_pairs(codes_ptr, wq, row0, row_ok, col0, WEIGHT, QBLOCK, QBLOCK2,
                                  QROUND, BLOCK_R, BLOCK_C, not EVEN)
        dt: tl.constexpr = tl.bfloat16 if OUT_BF16 else tl.float16
        word = ((even.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                | (odd.to(dt).to(tl.int16, bitcast=True).to(tl.int32) << 16))
        wcols = (col0 - c0) // 2 + tl.arange(0, BLOCK_C // 2)
        if EVEN:
            tl.store(out_ptr + out_rows + wcols[None, :], word)
        else:
            tl.store(out_ptr + out_rows + wcols[None, :], word,
                     mask=row_ok[:, None] & ((c0 + 2 * wcols) < c1)[None, :])
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c1
        w = nf4_tile(codes_ptr, wq, col0, row0, col_ok, row_ok, WEIGHT, QBLOCK, QBLOCK2,
                     QROUND, False, BLOCK_R, BLOCK_C)
        tl.store(out_ptr + out_rows + (cols - c0)[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def decode_slab(w: PackedWeight, out: torch.Tensor, n0: int, n1: int, c0: int, c1: int,
                hw_cvt: Optional[bool] = None):
    """``out[:n1-n0, :c1-c0] = W[n0:n1, c0:c1]`` in out's dtype (out row-major, unit inner
    stride). ``w``: the NF4 or FP8 PackedWeight of the *forward* view (not ``.t()``).
    ``hw_cvt`` (FP8): force the e4m3 conversion (None: the hardware one on sm_89+, the
    integer one elsewhere; the same values)."""
    assert not w.transposed and out.stride(1) == 1
    K0 = w.base_shape[1]
    br, bc = _INTERPRET_TILE if C.interpreting() else (DECODE_ROWS, DECODE_COLS)
    la = w.launch_args()
    words = (w.weight != int(WEIGHT_FP8_E4M3) and out.dtype in (torch.float16, torch.bfloat16)
             and K0 % 2 == 0 and c0 % 2 == 0 and (c1 - c0) % 2 == 0 and out.stride(0) % 2 == 0)
    dst, stride = (out.view(torch.int32), out.stride(0) // 2) if words else (out, out.stride(0))
    grid = (triton.cdiv(n1 - n0, br), triton.cdiv(c1 - c0, bc))
    _decode_slab_kernel[grid](
        w.codes, dst, w.absmax, w.absmax2 if w.absmax2 is not None else w.absmax, w.lut,
        float(w.offset), n0, n1, c0, c1, K0, stride, WEIGHT=la["WEIGHT"],
        QBLOCK=la["QBLOCK"], QBLOCK2=la["QBLOCK2"], QROUND=la["QROUND"], WORDS=words,
        OUT_BF16=out.dtype == torch.bfloat16,
        EVEN=(n1 - n0) % br == 0 and (c1 - c0) % bc == 0 and c1 <= K0,
        BLOCK_R=br, BLOCK_C=bc, num_warps=DECODE_WARPS,
        HW_CVT=w.weight == int(WEIGHT_FP8_E4M3) and (hw_cvt_ok(out) if hw_cvt is None
                                                     else bool(hw_cvt)))
    return out


def _sms(device) -> int:
    return C.num_sms(device) if device.type == "cuda" else 0


def fwd_plan(M: int, w: PackedWeight, elem: int, device) -> Optional[int]:
    N, K = w.shape
    return plan(M, N, K, elem, _sms(device), ROW_GRANULE, ROW_GRANULE_MIN)


def dx_plan(M: int, w: PackedWeight, elem: int, device) -> Optional[int]:
    N, K = w.shape
    return plan(M, K, N, elem, _sms(device), COL_GRANULE, COL_GRANULE)


def slab_fwd(x, w: PackedWeight, bias, lora_a, lora_b, scaling, dropout_p, seed, first_mode,
             small_m_max, config=None):
    """``(y, xa)`` through row slabs, or None if W cannot be cut (the caller keeps the
    in-mainloop kernels). ``first_mode``: the LoRA mode the whole-W GEMM would take
    (``lora_linear.forward_mode``): IN_LOOP / PANEL make xa in the first slab's GEMM, SEEDED
    (dropout, large r) makes it with the shrink before the first slab."""
    M, K = x.shape
    N = w.shape[0]
    r = lora_a.shape[0]
    width = fwd_plan(M, w, x.element_size(), x.device)
    if width is None:
        return None
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    xa = torch.empty(M, r, dtype=x.dtype, device=x.device)
    ws = torch.empty(width, K, dtype=x.dtype, device=x.device)
    if r == 0:
        xa.zero_()
    elif first_mode == LoraMode.SEEDED:
        shrink(x, lora_a, xa, dropout_p, seed)
    for n0 in range(0, N, width):
        n1 = min(N, n0 + width)
        slab = decode_slab(w, ws, n0, n1, 0, K)[: n1 - n0]
        kw = dict(bias=None if bias is None else bias[n0:n1], small_m_max=small_m_max,
                  config=config)
        if r == 0:
            fused_gemm(x, slab, y[:, n0:n1], **kw)
        elif n0 == 0 and first_mode != LoraMode.SEEDED:
            fused_gemm(x, slab, y[:, n0:n1], lora=LoraMode(first_mode), u=xa, la=lora_a,
                       lb=lora_b[n0:n1], scaling=scaling, **kw)
        else:
            fused_gemm(x, slab, y[:, n0:n1], lora=LoraMode.SEEDED, u=xa, lb=lora_b[n0:n1],
                       scaling=scaling, **kw)
    return y, xa


def slab_dx(dy, w: PackedWeight, lora_a, lora_b, dyb, scaling, dropout_p, seed, small_m_max,
            config=None, keep_bits=None, panel=False, xa=None, db_out=None):
    """``dX = dY·W + mask∘(s·dyb·A)/(1−p)`` through column slabs, or None if W cannot be cut.
    ``dyb [M, r]``: ``dY·B`` (None when r = 0); with ``panel`` it is *written* by the first
    slab's GEMM (the panel-shared low-rank mode, a = dY over all of N: the same as the
    whole-W dX GEMM makes it, lora_linear.py), which then also writes ``db_out = s·dYᵀ·xa``
    from the dY tiles its shares load, so dY is read for dyb and dB by no other kernel; the
    later slabs seed from dyb. ``keep_bits``: the packed mask of x's ``[M, K]`` grid (drawn
    here from the seed when dropout is on and none is given)."""
    M, N = dy.shape
    K = w.shape[1]
    r = lora_a.shape[0]
    width = dx_plan(M, w, dy.element_size(), dy.device)
    if width is None:
        return None
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    ws = torch.empty(N, width, dtype=dy.dtype, device=dy.device)
    drop = dropout_p > 0.0 and r > 0
    if drop and keep_bits is None:
        keep_bits = dropout_keep_packed(seed, M, K, dropout_p, dy.device)
    for k0 in range(0, K, width):
        k1 = min(K, k0 + width)
        slab = decode_slab(w, ws, 0, N, k0, k1)[:, : k1 - k0]
        kw = dict(small_m_max=small_m_max, config=config)
        if r == 0:
            fused_gemm(dy, slab.t(), dx[:, k0:k1], **kw)
            continue
        bits = keep_bits[:, k0 // 8: (k1 + 7) // 8].contiguous() if drop else None
        low = dict(u=dyb, lb=lora_a[:, k0:k1].t(), scaling=scaling, dropout_p=dropout_p,
                   seed=seed, keep_bits=bits)
        if panel and k0 == 0:
            fused_gemm(dy, slab.t(), dx[:, k0:k1], lora=LoraMode.PANEL, la=lora_b.t(),
                       db_out=db_out, db_u=xa if db_out is not None else None, **low, **kw)
        else:
            fused_gemm(dy, slab.t(), dx[:, k0:k1], lora=LoraMode.SEEDED, **low, **kw)
    return dx
