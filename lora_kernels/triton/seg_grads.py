"""Weight gradients of heterogeneous multi-adapter batches as deterministic segment reductions.

:func:`_seg_outer_kernel` computes ``out_i[j, r, q] = Σ_{t∈G_i} L[t, j·R + r]·M[t, q]`` (dA:
L = s·dY·B, M = x; dB: L = xa, M = dY restricted to slice j): one program per (slot, slice,
rank tile, column tile) loops over its slot's tokens in order — deterministic, no atomics.
Long segments with few programs (one adapter, long sequences) split their tokens into fixed
chunks, each writing its own fp32 plane, summed afterwards in a fixed order: still
deterministic. Rank tiles past ``ranks[slot, j]`` exit, so cost follows the real rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.triton.segments import slice_bounds
from lora_kernels.triton.slots import ranks_args, slot_rank


@triton.jit
def _seg_outer_kernel(
        L, M, OUT, RANKS, BOUNDS, sorted_ids, seg_offsets, active_slots,
        R, Q, n_slices, rank_tiles, n_qtiles, n_tsplits, t_chunk,
        stride_lt, stride_mt, stride_op, stride_os, stride_oj, stride_or, stride_oq,
        stride_rs, stride_rj,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
        HAS_RANKS: tl.constexpr, SLICED_Q: tl.constexpr, SLICE_ALIGN: tl.constexpr,
        BY_ACTIVE: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    qt = pid % n_qtiles
    rest = pid // n_qtiles
    ts = rest % n_tsplits
    rest = rest // n_tsplits
    jr = rest % (n_slices * rank_tiles)
    a_idx = rest // (n_slices * rank_tiles)
    j = jr // rank_tiles
    r0 = (jr % rank_tiles) * BLOCK_R
    slot = tl.load(active_slots + a_idx)
    if slot < 0:  # padding of a bounded batch's active slots
        return
    rank = slot_rank(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if r0 >= rank:
        return
    q_lo, q_hi = slice_bounds(BOUNDS, j, Q, SLICED_Q, SLICE_ALIGN)
    q0 = q_lo + qt * BLOCK_Q
    if q0 >= q_hi:
        return
    # Token chunk ts of the segment (an empty chunk still stores its zero plane).
    seg_lo = tl.load(seg_offsets + slot + 1) + ts * t_chunk
    seg_hi = tl.minimum(tl.load(seg_offsets + slot + 2), seg_lo + t_chunk)
    rr = r0 + tl.arange(0, BLOCK_R)
    r_mask = rr < rank
    qq = q0 + tl.arange(0, BLOCK_Q)
    q_mask = qq < q_hi
    acc = tl.zeros([BLOCK_R, BLOCK_Q], dtype=tl.float32)
    for t0 in range(seg_lo, seg_hi, BLOCK_T):  # the slot's tokens, always in the same order
        pos = t0 + tl.arange(0, BLOCK_T)
        t_mask = pos < seg_hi
        tok = tl.load(sorted_ids + pos, mask=t_mask, other=0).to(tl.int64)
        lt = tl.load(L + tok[:, None] * stride_lt + (j * R + rr)[None, :],
                     mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        mt = tl.load(M + tok[:, None] * stride_mt + qq[None, :],
                     mask=t_mask[:, None] & q_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(lt), mt.to(tl.float32), acc, input_precision=PREC)
    # Split planes are indexed by active position (sized by A, not S), the final output by slot.
    dst = a_idx if BY_ACTIVE else slot
    out = (OUT + ts * stride_op + dst.to(tl.int64) * stride_os + j * stride_oj
           + rr[:, None].to(tl.int64) * stride_or + qq[None, :].to(tl.int64) * stride_oq)
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=r_mask[:, None] & q_mask[None, :])



def launch_seg_outer(lhs, rhs, out, out_strides, batch, *, R, n_slices, ranks, bounds, prec,
                     block_t, block_r, block_q, max_width, num_warps, slice_align=16,
                     t_splits=1):
    """``out_i[j, r, q] = Σ_{t∈G_i} lhs[t, j·R + r] · rhs[t, q]`` for every active slot i.

    ``out_strides = (slot, slice, rank, col)``; ``bounds`` restricts slice j to columns
    ``bounds[j]:bounds[j+1]`` of rhs (None: all). ``out`` must be pre-zeroed (absent slots and
    ranks past each slot's rank are never written). ``t_splits > 1`` cuts every segment into
    that many token chunks reduced through fp32 planes (more programs, same determinism).
    """
    Q = rhs.shape[1]
    width = Q if bounds is None else max_width
    rank_tiles = triton.cdiv(R, block_r)
    n_qtiles = triton.cdiv(width, block_q)
    rk, srs, srj, has_rk = ranks_args(ranks, out)
    A = batch.num_active
    t_chunk = triton.cdiv(triton.cdiv(max(batch.max_seg_len, 1), t_splits), block_t) * block_t
    if t_splits > 1:
        dst = torch.zeros((t_splits, A) + tuple(out.shape[1:]), dtype=torch.float32,
                          device=out.device)
        # dst[s] has out[:A]'s shape, hence its trailing strides.
        strides = (dst.stride(0), dst.stride(1), *out_strides[1:])
    else:
        dst, strides = out, (0, *out_strides)
    grid = (A * n_slices * rank_tiles * t_splits * n_qtiles,)
    _seg_outer_kernel[grid](
        lhs, rhs, dst, rk, out if bounds is None else bounds,
        batch.sorted_token_ids, batch.seg_offsets, batch.active_slots,
        R, Q, n_slices, rank_tiles, n_qtiles, t_splits, t_chunk,
        lhs.stride(0), rhs.stride(0), *strides, srs, srj,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_Q=block_q, HAS_RANKS=has_rk,
        SLICED_Q=bounds is not None, SLICE_ALIGN=slice_align, BY_ACTIVE=t_splits > 1,
        PREC=prec, num_warps=num_warps)
    if t_splits > 1:
        # (bounded batches never split: their active_slots carry -1 padding)
        out.index_copy_(0, batch.active_slots.long(), dst.sum(0).to(out.dtype))
    return out
