"""The NF4 decode GEMV (M ≤ 8 rows of x): ``y = x·Wᵀ + b + s·xa·Bᵀ`` over bitsandbytes'
packed NF4 storage on CUDA cores, no tl.dot.

At decode shapes the GEMM core's 16-row tl.dot tile spends its time decoding W into the MMA
layout (28.8 SASS instructions per weight element at M = 1, notes/nf4perf.md). Here each weight
element costs ~6 instructions at M = 1 (notes/nf4gemv.md has the counts of every variant):

* the codes are read as 32-bit words ``[BLOCK_N rows, CHUNKS blocks, QBLOCK/8]`` (16-byte
  vector loads), and x as words holding one ``(x[2j], x[2j+1])`` pair each, so the four bytes
  of a code word meet their four x pairs in the same thread without a layout conversion;
* the decode is a table lookup with ``tl.gather`` (through shared memory): the 16 NF4 values
  per nibble (``DECODE_NIBBLES``, the default) or 256-entry pair tables per byte
  (``DECODE_PAIRS``: fewer instructions, but shared-memory bank conflicts);
* per (row, word) one FFMA chain ``Σ hi·x_even + lo·x_odd``; the block scale is factored out:
  summed over one 64-element block in fp32, times the block's absmax once per (row, block);
* split-K: ``SPLIT_K`` programs per column tile publish fp32 partials ``[SPLIT_K, M, N]`` and
  the one that takes the tile's last ticket sums them in slab order (deterministic, no data
  atomics; gemm/schedule.py), adds the bias and the LoRA term, stores y, resets the ticket.

Numerics: fp32 throughout. bitsandbytes rounds ``code·absmax`` to the storage dtype before
the product; here ``absmax·Σ code·x`` is exact in real arithmetic, so against
``dequantize_4bit`` the result differs by the storage rounding of W (none for fp32 storage,
≤ 2⁻⁹ relative per element for bf16) — inside the dtype tolerances of DESIGN.md.

Layout requirements (the launcher checks them, the op routes other weights to the GEMM core):
row-major ``W [N, K]`` with ``K % QBLOCK == 0`` (blocks never straddle rows; K even), x
contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton.device import interpreting, num_sms
from lora_kernels.triton.gemm.formats import _block_scale
from lora_kernels.triton.gemm.modes import (LORA_IN_LOOP, LORA_SEEDED, LoraMode, WEIGHT_NF4,
                                            WEIGHT_NF4_NESTED)
from lora_kernels.triton.gemm.schedule import split_k_publish, split_k_sum

__all__ = ["nf4_gemv", "gemv_supported", "gemv_max_rows", "gemv_config", "fuses_shrink",
           "GEMV_MAX_ROWS", "GEMV_ROUTE_ROWS"]


DECODE_PAIRS: tl.constexpr = tl.constexpr(0)    # 256-entry (hi, lo) tables indexed by the byte
# (fewer instructions, but bank conflicts on the table: see gemv_config)
DECODE_NIBBLES: tl.constexpr = tl.constexpr(1)  # the 16-entry table, indexed per nibble


@triton.jit
def _pair_tables(lut_ptr):
    """The 256-entry pair tables of one byte's two codes: (high nibble, low nibble) values."""
    code = tl.load(lut_ptr + tl.arange(0, 16))
    b = tl.arange(0, 256)
    return tl.gather(code, b >> 4, 0), tl.gather(code, b & 15, 0)


# How x reaches the kernel: as words holding one (x[2j], x[2j+1]) pair each, so the pairs
# arrive in one vector load matching the code bytes (strided element loads of x were one
# LDG.U16 per element in the sm_90a K loop).
X_BF16: tl.constexpr = tl.constexpr(0)   # int32 words, bf16 pair (low half = x[2j])
X_FP16: tl.constexpr = tl.constexpr(1)   # int32 words, fp16 pair
X_FP32: tl.constexpr = tl.constexpr(2)   # int64 words, fp32 pair


@triton.jit
def _x_pairs(xw_ptr, offs, ok, XKIND: tl.constexpr, EVEN: tl.constexpr):
    """fp32 ``(x[2j], x[2j+1])`` from the pair words at ``offs`` (little-endian: the even
    element in the low half)."""
    if EVEN:
        w = tl.load(xw_ptr + offs)
    else:
        w = tl.load(xw_ptr + offs, mask=ok, other=0)
    if XKIND == X_FP32:
        lo = (w & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
        hi = (w >> 32).to(tl.int32)
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)
    if XKIND == X_BF16:  # bf16 → fp32 is the 16 bits shifted into the high half
        return ((w << 16).to(tl.float32, bitcast=True),
                (w & -65536).to(tl.float32, bitcast=True))
    lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _lookup_pairs(hi_tab, lo_tab, byte):
    """The two codes of each byte of ``byte`` (any shape) from the 256-entry pair tables."""
    flat = tl.reshape(byte, (byte.numel,))
    return (tl.reshape(tl.gather(hi_tab, flat, 0), byte.shape),
            tl.reshape(tl.gather(lo_tab, flat, 0), byte.shape))


@triton.jit
def _lookup_nibbles(code16, hi, lo):
    """The codes of the nibbles ``hi``, ``lo`` from the 16-entry table."""
    return (tl.reshape(tl.gather(code16, tl.reshape(hi, (hi.numel,)), 0), hi.shape),
            tl.reshape(tl.gather(code16, tl.reshape(lo, (lo.numel,)), 0), lo.shape))


@triton.jit
def _expand(u, lb_ptr, rn64, n_ok, r0, R, stride_lbn, BLOCK_R: tl.constexpr):
    """``u·B[:, r0 : r0+BLOCK_R]ᵀ`` ``[BLOCK_M, BLOCK_N]`` for an fp32 ``u [BLOCK_M, BLOCK_R]``
    on CUDA cores."""
    rr = r0 + tl.arange(0, BLOCK_R)
    b = tl.load(lb_ptr + rn64[:, None] * stride_lbn + rr[None, :],
                mask=n_ok[:, None] & (rr < R)[None, :], other=0.0).to(tl.float32)
    return tl.sum(u[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _seeded_term(u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um, stride_lbn,
                 BLOCK_R: tl.constexpr):
    """``u·Bᵀ`` with ``u [M, R]`` given (the shrink's xa), BLOCK_R ranks per pass."""
    rr = tl.arange(0, BLOCK_R)
    term = tl.zeros((rm64.shape[0], rn64.shape[0]), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        u = tl.load(u_ptr + rm64[:, None] * stride_um + (r0 + rr)[None, :],
                    mask=m_ok[:, None] & ((r0 + rr) < R)[None, :], other=0.0).to(tl.float32)
        term += _expand(u, lb_ptr, rn64, n_ok, r0, R, stride_lbn, BLOCK_R)
    return term


@triton.jit
def _shrink_slab(x_ptr, la_ptr, rm64, m_ok, k_lo, k_hi, R, stride_xm, stride_lar,
                 BLOCK_R: tl.constexpr, BLOCK_KS: tl.constexpr):
    """This program's K-slab share of ``x·Aᵀ`` ``[BLOCK_M, BLOCK_R]`` fp32 (R ≤ BLOCK_R). Every
    column tile computes it again (A's slab is read from L2), so the tile that finishes a
    column has all shares without waiting for another tile: ``BLOCK_M·R·slab`` FMAs per
    program, a few % of its decode work at r = 16."""
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_KS)
    acc = tl.zeros((rm64.shape[0], BLOCK_R, BLOCK_KS), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_KS):
        kk = k + rk
        k_ok = kk < k_hi
        xv = tl.load(x_ptr + rm64[:, None] * stride_xm + kk[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        av = tl.load(la_ptr + rr[:, None] * stride_lar + kk[None, :],
                     mask=(rr < R)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += xv[:, None, :] * av[None, :, :]
    return tl.sum(acc, axis=2)


@triton.jit
def nf4_gemv_kernel(xw_ptr, x_ptr, codes_ptr, absmax_ptr, absmax2_ptr, lut_ptr, offset, y_ptr,
                    bias_ptr, u_ptr, la_ptr, lb_ptr, ws_ptr, wsu_ptr, cnt_ptr, scaling, M, N, K,
                    R, stride_xw, stride_x, stride_ym, stride_um, stride_lar, stride_lbn,
                    WEIGHT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_KS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                    SPLIT_K: tl.constexpr, XKIND: tl.constexpr,
                    DECODE: tl.constexpr, EVEN: tl.constexpr):
    """Program ``(n tile, K slab, m tile)``: ``BLOCK_N`` rows of W over ``CHUNKS`` QBLOCKs per
    step of its K slab, for ``BLOCK_M`` rows of x (each thread uses a decoded code for all
    of them)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF: tl.constexpr = QBLOCK // 2
    rn64 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok = rn64 < N
    m_ok = rm64 < M
    blocks = K // QBLOCK                                   # per row of W
    per_split = tl.cdiv(tl.cdiv(blocks, SPLIT_K), CHUNKS) * CHUNKS
    b_lo = pid_k * per_split
    b_hi = tl.minimum(blocks, b_lo + per_split)
    if DECODE == DECODE_PAIRS:
        hi_tab, lo_tab = _pair_tables(lut_ptr)
    else:
        code16 = tl.load(lut_ptr + tl.arange(0, 16))
    ch = tl.arange(0, CHUNKS)
    QW: tl.constexpr = HALF // 4                           # 32-bit code words per block
    qq = tl.arange(0, QW)
    # code word q of block b of row n: n·K/8 + b·QW + q (K % QBLOCK == 0, so a block's words
    # start 16-byte aligned: one vector load per 4 words)
    row_word = rn64 * (K // 8)
    # The (row, block) partials stay in the reduction's own layout until after the loop (one
    # layout conversion per program instead of one per step).
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, CHUNKS), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    for b0 in range(b_lo, b_hi, CHUNKS):
        blk = b0 + ch                                      # [CHUNKS] block within the row
        c_ok = blk < b_hi
        ok = n_ok[:, None, None] & c_ok[None, :, None]
        widx = row_word[:, None, None] + (blk[:, None] * QW + qq[None, :])[None, :, :]
        widx = tl.max_contiguous(tl.multiple_of(widx, [1, 1, QW]), [1, 1, QW])
        if EVEN:  # no ragged rows, slabs or x rows: unmasked loads (fewer predicates per step)
            words = tl.load(codes_ptr + widx)                         # [BLOCK_N, CHUNKS, QW]
        else:
            words = tl.load(codes_ptr + widx, mask=ok, other=0)
        # x pair word of code byte i of word q: block·HALF + 4q + i
        xoff = rm64[:, None, None] * stride_xw + (blk[:, None] * HALF + 4 * qq[None, :])[None, :, :]
        x_ok = m_ok[:, None, None] & c_ok[None, :, None] & (qq >= 0)[None, None, :]
        if BLOCK_M == 1:
            xoff = xoff.reshape(CHUNKS, QW)
            x_ok = x_ok.reshape(CHUNKS, QW)
        for i in tl.static_range(4):
            if DECODE == DECODE_PAIRS:
                q_hi, q_lo = _lookup_pairs(hi_tab, lo_tab, (words >> (8 * i)) & 255)
            else:
                q_hi, q_lo = _lookup_nibbles(code16, (words >> (8 * i + 4)) & 15,
                                             (words >> (8 * i)) & 15)
            xe, xo = _x_pairs(xw_ptr, xoff + i, x_ok, XKIND, EVEN)    # [BLOCK_M, CHUNKS, QW]
            # one FFMA chain per (row, word): + hi·xe + lo·xo, byte after byte. M = 1 stays
            # 3-D: a 4-D t (even [1, N, C, Q]) made Triton convert every decoded tile into
            # another layout through shared memory.
            if BLOCK_M == 1:
                if i == 0:
                    t = q_hi * xe
                else:
                    t = t + q_hi * xe
                t = t + q_lo * xo                                     # [BLOCK_N, CHUNKS, QW]
            else:
                if i == 0:
                    t = q_hi[None, :, :, :] * xe[:, None, :, :]
                else:
                    t = t + q_hi[None, :, :, :] * xe[:, None, :, :]
                t = t + q_lo[None, :, :, :] * xo[:, None, :, :]
        scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset,
                             rn64[:, None] * blocks + blk[None, :], n_ok[:, None] & c_ok[None, :],
                             WEIGHT, QBLOCK2)              # [BLOCK_N, CHUNKS]
        if BLOCK_M == 1:
            acc2 += tl.sum(t, axis=2) * scale
        else:
            acc3 += tl.sum(t, axis=3) * scale[None, :, :]
    if BLOCK_M == 1:
        acc3 = acc2[None, :, :]
    acc = tl.sum(acc3, axis=2)
    tile = pid_m * tl.num_programs(0) + pid_n
    if LORA == LORA_IN_LOOP:
        # this slab's x·Aᵀ share, stored before the ticket (split_k_publish's barrier + acq_rel
        # ticket publish it with the output partial); [tiles, SPLIT_K, BLOCK_M, BLOCK_R] fp32
        u_part = _shrink_slab(x_ptr, la_ptr, rm64, m_ok, b_lo * QBLOCK, b_hi * QBLOCK, R,
                              stride_x, stride_lar, BLOCK_R, BLOCK_KS)
        u_tile = (tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :])
        tl.store(wsu_ptr + (tile * SPLIT_K + pid_k) * (BLOCK_M * BLOCK_R) + u_tile, u_part)
    last = split_k_publish(acc, ws_ptr, cnt_ptr, tile, pid_k, rm64, rn64, m_ok, n_ok, M, N,
                           SPLIT_K)
    if last:
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LORA == LORA_SEEDED:
            out = _seeded_term(u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um, stride_lbn,
                               BLOCK_R) * scaling
        elif LORA == LORA_IN_LOOP:
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # slab order: every column tile sums the same bits
                u += tl.load(wsu_ptr + (tile * SPLIT_K + s) * (BLOCK_M * BLOCK_R) + u_tile,
                             cache_modifier=".cg")
            out = _expand(u, lb_ptr, rn64, n_ok, 0, R, stride_lbn, BLOCK_R) * scaling
            if pid_n == 0:  # xa for the backward, once per row tile
                rr = tl.arange(0, BLOCK_R)
                tl.store(u_ptr + rm64[:, None] * stride_um + rr[None, :],
                         u.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & (rr < R)[None, :])
        out = split_k_sum(out, ws_ptr, rm64, rn64, m_ok, n_ok, M, N, SPLIT_K)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :],
                 out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        tl.atomic_xchg(cnt_ptr + tile, 0)  # the ticket is back at zero for the next launch


def gemv_supported(pw, M: int) -> bool:
    """Whether :func:`nf4_gemv` takes this call: an NF4 W in its forward (not the dX Wᵀ view),
    K a multiple of the absmax block (blocks never straddle rows), 1 ≤ M ≤
    :func:`gemv_max_rows` (2 plain, 4 nested: beyond, the GEMM core's tensor-core tile)."""
    if pw.weight not in (int(WEIGHT_NF4), int(WEIGHT_NF4_NESTED)) or pw.transposed:
        return False
    K = pw.base_shape[1]
    return (1 <= M <= gemv_max_rows(pw) and K % pw.qblock == 0 and pw.qblock % 8 == 0
            and pw.codes.numel() % 4 == 0 and pw.codes.data_ptr() % 16 == 0)


# Static sm_90a counts of the K loop (bench/sass_report.py form "nf4 gemv", bf16, K = N = 4096,
# nibble decode, notes/nf4gemv.md), SASS instructions per decoded weight element of a launch:
#   M = 1: 4.69 (BLOCK_N 256, CHUNKS 2, 168 regs)   M = 2: 8.23 (256)   M = 4: 13.1 (128)
#   M = 8: 21.0 (128, 168 regs)   M = 16: 39 (BLOCK_M 16); nested 5.2 / 8.5 / 13.3 / 21.3.
# The kernel takes M ≤ GEMV_MAX_ROWS. Which M it is *routed* (gemv_max_rows) comes from the
# GEMM core's 16-row split-K tl.dot tile at any M ≤ 16 (sass_report's "K loop / W elem", the
# in-loop x·Aᵀ form the decode takes): 28.8 when this bound was set, 9.9 plain (16x32x128) and
# 14.9 nested (16x32x64) since session 6's decode-tile fixes. So the GEMV keeps M ≤ 2 plain
# (8.23 + 1.2 outside its loop against 9.9) and M ≤ 4 nested (13.3 against 14.9).
GEMV_MAX_ROWS = 8
GEMV_ROUTE_ROWS = {int(WEIGHT_NF4): 2, int(WEIGHT_NF4_NESTED): 4}


def gemv_max_rows(pw) -> int:
    """The largest M :func:`gemv_supported` routes to the GEMV for this NF4 weight."""
    return GEMV_ROUTE_ROWS.get(int(pw.weight), 0)


def gemv_config(M: int, N: int, K: int, qblock: int, device: torch.device,
                nested: bool = False) -> dict:
    """Tile, steps and split: ``BLOCK_N`` rows × ``CHUNKS`` QBLOCKs per step, and enough K slabs
    that ≥ 2 programs per SM stream W (N = K = 4096, M = 1: 16 column tiles × 16 slabs = 256
    programs on 132 SMs, 4 blocks of 64 per slab)."""
    bm = min(triton.next_power_of_2(max(M, 1)), GEMV_MAX_ROWS)
    if interpreting() or device.type != "cuda":
        cfg = dict(BLOCK_N=16, CHUNKS=2, num_warps=1)
    else:
        # 256 rows (4 per thread: x pairs converted once, used 4 times) where the register
        # file allows; 128 from M = 4 (BLOCK_N 256 at M = 4: 245 registers).
        # M = 1: two blocks per step (4.87 against 5.16 SASS / element with one before the
        # unmasked EVEN loads, 168 regs; nested: 255 regs, so one).
        cfg = dict(BLOCK_N=256 if bm <= 2 else 128, CHUNKS=2 if bm == 1 and not nested else 1,
                   num_warps=4)
    cfg["BLOCK_M"] = bm
    blocks = K // qblock
    tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, bm)
    split = min(triton.cdiv(2 * num_sms(device), tiles), triton.cdiv(blocks, cfg["CHUNKS"]),
                MAX_GEMV_SPLIT)
    cfg["SPLIT_K"] = min(triton.next_power_of_2(max(split, 1)), MAX_GEMV_SPLIT)
    # The nibble table, though 0.9 SASS / element dearer than the pair tables at M = 1 (5.18 vs
    # 4.24): its 16 words sit in 16 distinct banks, so a warp's LDS never conflicts; the
    # 256-entry pair tables span every bank 8 times and random codes conflict ~3.5-way, which
    # would make the shared-memory pipe, not issue, the limit (notes/nf4gemv.md).
    cfg["DECODE"] = int(DECODE_NIBBLES)
    return cfg


# Slabs per column tile: the workspace is [SPLIT_K, M, N] fp32 (16 × 8 × N × 4 B: 2 MiB at
# N = 4096).
MAX_GEMV_SPLIT = 16


def fuses_shrink(M: int, r: int) -> bool:
    """Whether the GEMV makes ``xa = x·Aᵀ`` itself (LORA_IN_LOOP, no dropout): the per-program
    share ``[BLOCK_M, r]`` stays within 256 fp32 (M = 1: r ≤ 256, M = 8: r ≤ 32)."""
    bm = min(triton.next_power_of_2(max(M, 1)), GEMV_MAX_ROWS)
    return 0 < r and bm * triton.next_power_of_2(r) <= 256


def nf4_gemv(x: torch.Tensor, pw, y: torch.Tensor, bias: Optional[torch.Tensor] = None,
             u: Optional[torch.Tensor] = None, lb: Optional[torch.Tensor] = None,
             scaling: float = 1.0, la: Optional[torch.Tensor] = None,
             config: Optional[dict] = None) -> torch.Tensor:
    """``y[M, N] = x·Wᵀ (+ bias) (+ scaling·u·lbᵀ)`` for ``x [M, K]`` and an NF4 ``pw`` (a
    :class:`gemm.formats.PackedWeight` with :func:`gemv_supported`), ``lb [N, r]``.

    ``la`` None: ``u [M, r]`` is given (the shrink's ``drop(x)·Aᵀ``); ``la [r, K]`` given
    (:func:`fuses_shrink`): the kernel computes ``u = x·Aᵀ`` in fp32 from its K slabs, uses
    it for the term and writes it (rounded to u's dtype) into ``u``. Writes and returns ``y``."""
    from lora_kernels.triton.fused_gemm import _scratch, _tickets, _WORKSPACE, _WORKSPACE_U
    M, K = x.shape
    N = pw.base_shape[0]
    # The word views need 16-byte-aligned, contiguous rows (a sliced x may start mid-word).
    if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    bias = bias.contiguous() if bias is not None else None
    lb = lb.contiguous() if lb is not None and lb.stride(-1) != 1 else lb
    la = la.contiguous() if la is not None and la.stride(-1) != 1 else la
    R = u.shape[1] if u is not None else 0
    lora = LoraMode.NONE if R == 0 else (LoraMode.IN_LOOP if la is not None else LoraMode.SEEDED)
    if lora == LoraMode.SEEDED and u.stride(-1) != 1:
        u = u.contiguous()
    if lora == LoraMode.IN_LOOP and not fuses_shrink(M, R):
        raise ValueError(f"the GEMV's own shrink takes BLOCK_M·r ≤ 256, got M={M}, r={R}")
    cfg = dict(config) if config is not None else gemv_config(
        M, N, K, pw.qblock, x.device, pw.weight == int(WEIGHT_NF4_NESTED))
    warps = cfg.pop("num_warps", 4)
    cfg.setdefault("DECODE", int(DECODE_NIBBLES))
    # EVEN: whole column tiles, whole row tiles and every K slab the same whole steps
    cfg["EVEN"] = (N % cfg["BLOCK_N"] == 0 and M % cfg["BLOCK_M"] == 0
                   and (K // pw.qblock) % (cfg["SPLIT_K"] * cfg["CHUNKS"]) == 0)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(M, cfg["BLOCK_M"]))
    ws = _scratch(_WORKSPACE, x.device, cfg["SPLIT_K"] * M * N, torch.float32)
    tickets = _tickets(x.device, grid[0] * grid[2])
    if lora == LoraMode.IN_LOOP:
        block_r = triton.next_power_of_2(R)
        wsu = _scratch(_WORKSPACE_U, x.device,
                       grid[0] * grid[2] * cfg["SPLIT_K"] * cfg["BLOCK_M"] * block_r, torch.float32)
    else:
        block_r, wsu = min(triton.next_power_of_2(max(R, 1)), 16), ws
    # x·Aᵀ share: [BLOCK_M, BLOCK_R, BLOCK_KS] accumulators, 32 fp32 per thread at 4 warps
    block_ks = max(16, min(64, 4096 // (cfg["BLOCK_M"] * block_r)))
    if x.dtype == torch.float32:
        xw, xkind = x.view(torch.int64), X_FP32
    else:
        xw, xkind = x.view(torch.int32), (X_BF16 if x.dtype == torch.bfloat16 else X_FP16)
    dummy = y
    nf4_gemv_kernel[grid](
        xw, x, pw.codes.view(torch.int32), pw.absmax,
        pw.absmax2 if pw.absmax2 is not None else pw.absmax, pw.lut, float(pw.offset), y,
        bias if bias is not None else dummy, u if R else dummy, la if la is not None else dummy,
        lb if R else dummy, ws, wsu, tickets, float(scaling), M, N, K, R,
        xw.stride(0), x.stride(0), y.stride(0), u.stride(0) if R else 0,
        la.stride(0) if la is not None else 0, lb.stride(0) if R else 0,
        WEIGHT=int(pw.weight), QBLOCK=int(pw.qblock), QBLOCK2=int(pw.qblock2),
        HAS_BIAS=bias is not None, LORA=int(lora), BLOCK_R=block_r, BLOCK_KS=block_ks,
        XKIND=int(xkind), num_warps=warps, **cfg)
    return y
