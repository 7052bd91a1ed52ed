"""Rank-sized kernels of the single-adapter LoRA: the shrink ``u = drop(x)·Aᵀ`` and the
reductions over rows behind ``dA`` and ``dB``.

Both read their big operand ([M, K] or [M, N]) exactly once and produce only rank-sized
results ([M, r] or [K|N, r]). The forward shrink draws the dropout mask and masks x with it
(``drop_and_bits_tile``) and, given ``keep_bits``, also writes it packed (1 bit per element of x);
the dA reduction reads those bits (a byte tile spread in registers, ``spread_bits_t``) or,
without them, redraws the mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton import configs as C
from lora_kernels.triton.dropout import (drop_and_bits_tile, drop_threshold, keep_tile,
                                         seed_arg, spread_bits_t,
                                         store_bits_tile)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _shrink_kernel(x_ptr, a_ptr, u_ptr, bits_ptr, M, K, R,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
                   seed, threshold, scale,
                   DROPOUT: tl.constexpr, WRITE_BITS: tl.constexpr, PARTIAL_GROUPS: tl.constexpr,
                   HALF_TILES: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[M, R] = scale · (keep ∘ x)[M, K] · a[R, K]ᵀ, one program per (BLOCK_M rows, BLOCK_R ranks)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # With dropout each BLOCK_K step runs as two half-width tiles (load, draw, mask, dot):
    # otherwise Triton splits the 128-wide register-A dot into two 64-wide wgmmas and builds
    # both halves of the masked x twice (16 STS.128 + 12 LDSM per 64 elements). Static sm_90a:
    # 1248 -> 1200 SASS with bits, 1160 -> 1080 without, 164 -> 120 registers (3 CTAs/SM).
    # At p = 0 the loop is the plain one (its A operand stays in shared memory); fp32 x or
    # K % 16 != 0 also keep one part: two parts spilled there (24 B fp32, 40 B bf16 K=4100).
    PARTS: tl.constexpr = 2 if HALF_TILES else 1
    TILE_K: tl.constexpr = BLOCK_K // PARTS
    rk = tl.arange(0, TILE_K)
    m_ok = rm < M
    r_ok = rr < R
    rm64 = rm.to(tl.int64)
    x_ptrs = x_ptr + rm64[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_ptr + rr[None, :].to(tl.int64) * stride_ar + rk[:, None].to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for part in tl.static_range(PARTS):
            k = k0 + part * TILE_K
            k_ok = (k + rk) < K
            x = tl.load(x_ptrs + part * TILE_K * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DROPOUT:
                # x masked as 32-bit pairs from the lane masks (the bytes are dead code
                # unless WRITE_BITS)
                x, bits = drop_and_bits_tile(x, seed, pid_m * BLOCK_M, k, K, threshold,
                                             BLOCK_M, TILE_K, PARTIAL_GROUPS)
                if WRITE_BITS:
                    if pid_r == 0:  # the rank-block-0 programs write it: one writer per byte
                        store_bits_tile(bits_ptr, (K + 7) // 8, rm64, m_ok, k, bits,
                                        (K + 7) // 8, TILE_K)
            a = tl.load(a_ptrs + part * TILE_K * stride_ak, mask=k_ok[:, None] & r_ok[None, :],
                        other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    # 1/(1-p) is applied once to the fp32 sum instead of to every kept element of x.
    acc = acc * scale
    tl.store(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
             acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


def shrink(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dropout_p: float = 0.0,
           seed: int = 0, keep_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[M, r] = drop(x)·aᵀ`` for ``x [M, K]``, ``a [r, K]`` (any strides). With dropout the
    mask is the v2 keep-mask of x's [M, K] grid; ``keep_bits`` (contiguous uint8
    ``[M, ceil(K/8)]``) then receives it packed."""
    M, K = x.shape
    R = a.shape[0]
    cfg = C.shrink_config(M)
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    br = C.rank_block(R)
    grid = (triton.cdiv(M, bm), triton.cdiv(R, br))
    write_bits = keep_bits is not None and dropout_p > 0.0
    _shrink_kernel[grid](
        x, a, out, keep_bits if write_bits else out, M, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        seed_arg(seed), drop_threshold(dropout_p),
        1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
        DROPOUT=dropout_p > 0.0, WRITE_BITS=write_bits, PARTIAL_GROUPS=K % 8 != 0,
        HALF_TILES=dropout_p > 0.0 and x.element_size() == 2 and K % 16 == 0,
        PRECISION=C.dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


@triton.jit(do_not_specialize=["seed", "threshold"])
def _reduce_rows_kernel(l_ptr, r_ptr, out_ptr, bits_ptr, M, P, Q, rows_per_split,
                        stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
                        seed, threshold, scale,
                        DROPOUT: tl.constexpr, READ_BITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[s, P, Q] = scale · Σ_{m in split s} (keep ∘ l)[m, P]ᵀ · r[m, Q].

    P is the big side (K for dA, N for dB) and sits on the MMA's M dimension, Q is the rank:
    128-row tiles feed Hopper's wgmma, which a 16-row rank-side tile could not. The mask, when
    on, is the keep-mask of ``l``'s [M, P] grid (x for dA), drawn as [BLOCK_M, BLOCK_P] and
    transposed.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rm = tl.arange(0, BLOCK_M)
    p_ok = rp < P
    q_ok = rq < Q
    rp64 = rp.to(tl.int64)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m in range(m_lo, m_hi, BLOCK_M):
        rows = (m + rm).to(tl.int64)
        row_ok = (m + rm) < m_hi
        lt = tl.load(l_ptr + rows[None, :] * stride_lm + rp64[:, None] * stride_lp,
                     mask=p_ok[:, None] & row_ok[None, :], other=0.0)
        if DROPOUT:
            if READ_BITS:  # the forward's packed mask: one byte per 8 elements, spread
                gg = pid_p * (BLOCK_P // 8) + tl.arange(0, BLOCK_P // 8)
                bits_t = tl.load(bits_ptr + rows[None, :] * ((P + 7) // 8) + gg[:, None],
                                 mask=(gg < (P + 7) // 8)[:, None] & row_ok[None, :], other=0)
                keep_t = spread_bits_t(bits_t, BLOCK_P, BLOCK_M)
            else:
                keep_t = tl.trans(keep_tile(seed, m, pid_p * BLOCK_P, P, threshold, BLOCK_M,
                                            BLOCK_P))
            lt = tl.where(keep_t, lt, 0.0)
        rt = tl.load(r_ptr + rows[:, None] * stride_rm + rq[None, :] * stride_rq,
                     mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(lt, rt, acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + rp64[:, None] * stride_op
             + rq[None, :] * stride_oq, acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & q_ok[None, :])


def reduce_rows(l: torch.Tensor, r: torch.Tensor, out: torch.Tensor, scale: float,
                dropout_p: float = 0.0, seed: int = 0,
                keep_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[P, Q] = scale · drop(l)ᵀ·r`` for ``l [M, P]``, ``r [M, Q]`` (Q rank-sized), any
    strides; ``out`` may be a transposed view (dA is written as ``[K, r]`` through ``.t()``).
    With dropout, ``keep_bits`` (contiguous uint8 ``[M, ceil(P/8)]``, the forward's packed
    mask) is read instead of redrawing the mask.

    When the P tiles alone leave SMs idle, M is split and the fp32 partials ``[S, P, Q]``
    (rank-sized) are summed by ``torch.sum`` in a fixed order: deterministic, no atomics.
    """
    M, P = l.shape
    Q = r.shape[1]
    cfg = C.reduce_config(dropout_p > 0.0)
    bp, bm = cfg["BLOCK_P"], cfg["BLOCK_M"]
    bq = C.rank_block(Q)
    tiles = triton.cdiv(P, bp) * triton.cdiv(Q, bq)
    # ≥ 2 programs per SM, each with ≥ 4 row blocks so its pipeline is worth filling.
    split = max(1, min(triton.cdiv(2 * C.num_sms(l.device), tiles), triton.cdiv(M, 4 * bm)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), bm) * bm
    split = triton.cdiv(M, rows_per_split)
    if dropout_p > 0:
        scale = scale / (1.0 - dropout_p)
    target = out if split == 1 else torch.empty(split, P, Q, dtype=torch.float32, device=l.device)
    so, sp, sq = (0, out.stride(0), out.stride(1)) if split == 1 else target.stride()
    read_bits = keep_bits is not None and dropout_p > 0.0
    _reduce_rows_kernel[(triton.cdiv(P, bp), triton.cdiv(Q, bq), split)](
        l, r, target, keep_bits if read_bits else target, M, P, Q, rows_per_split,
        l.stride(0), l.stride(1), r.stride(0), r.stride(1), so, sp, sq,
        seed_arg(seed), drop_threshold(dropout_p), float(scale),
        DROPOUT=dropout_p > 0.0, READ_BITS=read_bits, PRECISION=C.dot_precision(l.dtype),
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        out.copy_(target.sum(0))
    return out
