"""Segment kernels for heterogeneous multi-adapter batches (Punica SGMV / BGMV family).

Tokens are visited through ``LoRABatch.sorted_token_ids``: slot ``i``'s tokens are the sorted
positions ``seg_offsets[i+1] : seg_offsets[i+2]`` and the ``-1`` tokens (positions before
``seg_offsets[1]``) are never visited at all, so base-only tokens cost nothing here.

Three kernels, each one body with ``tl.constexpr`` flags:

* :func:`_shrink_kernel` — ``out[t, j·R + r] = s_i · Σ_k in[t, k]·A_i[j, r, k]`` over one token
  tile of one slot segment, one slice ``j`` and one 16-wide rank tile; optional split over the
  reduction dimension (decode: few tokens, so the grid must be widened along K to fill the GPU),
  each split writing its own partial plane (no atomics: the consumer sums the planes in a fixed
  order). ``SLICED_IN`` makes slice ``j`` read only its own input columns: that is the backward's
  ``dY·B_i`` of a packed projection.
* :func:`_expand_kernel` — ``y[t, n] += Σ_r xa[t, j·R + r]·B_i[n, j, r]``, xa taken from the
  shrink's partial planes (summed here), or recomputed in-program (``INLINE``: shrink + expand
  in one launch for tiny decode batches); ``SUM_SLICES`` contracts over every slice instead
  (the backward's ``dX += u·A_i``). Can write the reduced xa back for autograd.
* :func:`_seg_outer_kernel` — the weight gradients as segment reductions,
  ``out_i[j, r, q] = Σ_{t∈G_i} L[t, j·R + r]·M[t, q]`` (dA: L = s·dY·B, M = x; dB: L = xa,
  M = dY restricted to slice j): one program per (slot, slice, rank tile, column tile) loops
  over its slot's tokens in order — deterministic, no atomics. Long segments with few
  programs (one adapter, long sequences) split their tokens into fixed chunks, each writing
  its own fp32 plane, summed afterwards in a fixed order: still deterministic.

Rank loops and rank-tile programs stop at ``ranks[slot, j]`` (masked loads inside a tile
never touch memory), so cost follows each adapter's real rank, not r_max.
All index arithmetic that multiplies a row or slot by a stride is done in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_tile(pid_t, seg_offsets, active_slots, num_active, tiles_per_seg,
                  BLOCK_M: tl.constexpr, A_BLOCK: tl.constexpr, SCAN: tl.constexpr):
    """Map token-tile number ``pid_t`` to ``(slot, first sorted position, segment end)``.

    ``slot = -1`` when ``pid_t`` lies past the last tile (the grid is an upper bound computed
    from host ints only, so no sync is needed to size it).

    SCAN: tiles are numbered densely across the active segments (``Σ ceil(len_i / BLOCK_M)``
    tiles, at most ``ceil(T / BLOCK_M) + A``): every program recomputes the prefix sum of
    tiles per segment from ``seg_offsets`` (A ints, L2-resident). *Why in-kernel*: the batch
    reaches the kernels rebuilt from plain tensors (custom-op boundary), so a cached device
    tile map would not survive, and the scan keeps a Zipf-skewed batch from launching
    ``A × ceil(max_seg_len / BLOCK_M)`` mostly-empty programs.
    Not SCAN: ``tiles_per_seg`` fixed tiles per active segment, extra ones exit (chosen when
    that grid is no larger, e.g. decode, or when A is too large to scan).
    """
    if SCAN:
        a = tl.arange(0, A_BLOCK)
        am = a < num_active
        slots = tl.load(active_slots + a, mask=am, other=0)
        lo = tl.load(seg_offsets + slots + 1, mask=am, other=0)
        hi = tl.load(seg_offsets + slots + 2, mask=am, other=0)
        ntiles = tl.where(am, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
        cum = tl.cumsum(ntiles, 0)
        idx = tl.sum((cum <= pid_t).to(tl.int32), 0)  # segments wholly before this tile
        sel = a == idx
        slot = tl.sum(tl.where(sel, slots, 0), 0)
        first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
        seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
        seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
        row_lo = seg_lo + (pid_t - first_tile) * BLOCK_M
        slot = tl.where(idx < num_active, slot, -1)
    else:
        a_idx = pid_t // tiles_per_seg
        slot = tl.load(active_slots + a_idx, mask=a_idx < num_active, other=-1)
        seg_lo = tl.load(seg_offsets + slot + 1, mask=slot >= 0, other=0)
        seg_hi = tl.load(seg_offsets + slot + 2, mask=slot >= 0, other=0)
        row_lo = seg_lo + (pid_t % tiles_per_seg) * BLOCK_M
        slot = tl.where(row_lo < seg_hi, slot, -1)
    return slot, row_lo, seg_hi


@triton.jit
def _rank_of(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS: tl.constexpr):
    if HAS_RANKS:
        return tl.load(RANKS + slot * stride_rs + j * stride_rj)
    else:
        return R


@triton.jit
def _slice_bounds(BOUNDS, j, full, SLICED: tl.constexpr, SLICE_ALIGN: tl.constexpr):
    """Columns [lo, hi) of slice j (the whole [0, full) when unsliced). The alignment hint
    keeps the slices' row segments 16-byte aligned for vector loads/stores."""
    if SLICED:
        return (tl.multiple_of(tl.load(BOUNDS + j), SLICE_ALIGN),
                tl.multiple_of(tl.load(BOUNDS + j + 1), SLICE_ALIGN))
    else:
        return 0, full


@triton.jit
def _shrink_tile(X, tok, row_mask, r_mask, k_lo, k_hi, stride_xt, a_row_ptr, stride_ak,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr):
    """``Σ_{k_lo ≤ k < k_hi} X[tok, k] · A[rr, k]`` → fp32 ``[BLOCK_M, BLOCK_R]``.

    Rows of A are loaded as ``[BLOCK_R, BLOCK_K]`` with K contiguous (16-byte vector loads).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    x_rows = X + tok[:, None] * stride_xt
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < k_hi
        xt = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(a_row_ptr[:, None] + kk[None, :].to(tl.int64) * stride_ak,
                     mask=r_mask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PREC)
    return acc


@triton.jit
def _shrink_kernel(
        X, A, OUT, SCALE, RANKS, BOUNDS,
        sorted_ids, seg_offsets, active_slots, num_active, tiles_per_seg,
        R, K, n_slices, rank_tiles, n_splits, k_per_split,
        stride_xt, stride_as, stride_aj, stride_ar, stride_ak,
        stride_op, stride_ot, stride_rs, stride_rj,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        A_BLOCK: tl.constexpr, SCAN: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_RANKS: tl.constexpr, SLICED_IN: tl.constexpr, SLICE_ALIGN: tl.constexpr,
        PREC: tl.constexpr):
    # Split fastest: the splits of one (tile, rank tile) run side by side and share x rows in L2.
    pid = tl.program_id(0)
    split = pid % n_splits
    rest = pid // n_splits
    jr = rest % (n_slices * rank_tiles)
    tile = rest // (n_slices * rank_tiles)
    j = jr // rank_tiles
    r0 = (jr % rank_tiles) * BLOCK_R

    slot, row_lo, seg_hi = _segment_tile(tile, seg_offsets, active_slots, num_active,
                                         tiles_per_seg, BLOCK_M, A_BLOCK, SCAN)
    if slot < 0:
        return
    rank = _rank_of(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if r0 >= rank:  # cost follows the real rank: rank tiles past it do nothing
        return
    c_lo, c_hi = _slice_bounds(BOUNDS, j, K, SLICED_IN, SLICE_ALIGN)
    # An empty K range still stores its (zero) partial: the planes are not pre-zeroed.
    k_lo = c_lo + split * k_per_split
    k_hi = tl.minimum(c_hi, k_lo + k_per_split)

    rows = row_lo + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_hi
    tok = tl.load(sorted_ids + rows, mask=row_mask, other=0).to(tl.int64)
    rr = r0 + tl.arange(0, BLOCK_R)
    r_mask = rr < rank
    a_rows = A + slot.to(tl.int64) * stride_as + j * stride_aj + rr.to(tl.int64) * stride_ar
    acc = _shrink_tile(X, tok, row_mask, r_mask, k_lo, k_hi, stride_xt, a_rows, stride_ak,
                       BLOCK_M, BLOCK_R, BLOCK_K, PREC)
    if HAS_SCALE:
        acc *= tl.load(SCALE + slot)
    out = OUT + split * stride_op + tok[:, None] * stride_ot + (j * R + rr)[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
        Y, XA, B, RANKS, BOUNDS, X, A, SCALE, XA_OUT,
        sorted_ids, seg_offsets, active_slots, num_active, tiles_per_seg,
        R, K, N_OUT, n_slices, n_ntiles, n_splits,
        stride_yt, stride_xap, stride_xat,
        stride_bs, stride_bn, stride_bj, stride_br,
        stride_xt, stride_as, stride_ar, stride_rs, stride_rj,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, A_BLOCK: tl.constexpr, SCAN: tl.constexpr,
        HAS_RANKS: tl.constexpr, SUM_SLICES: tl.constexpr, INLINE: tl.constexpr,
        HAS_SCALE: tl.constexpr, WRITE_XA: tl.constexpr, SLICE_ALIGN: tl.constexpr,
        PREC: tl.constexpr):
    # Column tile fastest: with INLINE the programs of one segment run together and re-read
    # A_i from L2 rather than from HBM.
    pid = tl.program_id(0)
    nt = pid % n_ntiles
    rest = pid // n_ntiles
    if SUM_SLICES:
        tile = rest
        j_lo = 0
        j_hi = n_slices
        c_lo = 0
        c_hi = N_OUT
    else:
        j_lo = rest % n_slices
        j_hi = j_lo + 1
        tile = rest // n_slices
        c_lo, c_hi = _slice_bounds(BOUNDS, j_lo, N_OUT, True, SLICE_ALIGN)
    n0 = c_lo + nt * BLOCK_N
    if n0 >= c_hi:  # the grid covers the widest slice; narrower ones (GQA k/v) stop here
        return
    slot, row_lo, seg_hi = _segment_tile(tile, seg_offsets, active_slots, num_active,
                                         tiles_per_seg, BLOCK_M, A_BLOCK, SCAN)
    if slot < 0:
        return
    # A slot that does not adapt these slices (rank 0) leaves y alone: no read-modify-write.
    live = 0
    for j in range(j_lo, j_hi):
        live += _rank_of(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if live == 0:
        return
    slot64 = slot.to(tl.int64)
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_hi
    tok = tl.load(sorted_ids + rows, mask=row_mask, other=0).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    c_mask = cols < c_hi
    b_cols = B + slot64 * stride_bs + cols.to(tl.int64) * stride_bn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        rank = _rank_of(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr < rank
            # The B tile (the bulk of the bytes) is requested before the xa work it waits on,
            # so its latency overlaps the plane loads / inline shrink.
            bt = tl.load(b_cols[None, :] + j * stride_bj + rr[:, None].to(tl.int64) * stride_br,
                         mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            if INLINE:
                a_rows = A + slot64 * stride_as + (j * R + rr).to(tl.int64) * stride_ar
                xa = _shrink_tile(X, tok, row_mask, r_mask, 0, K, stride_xt, a_rows, 1,
                                  BLOCK_M, BLOCK_R, BLOCK_K, PREC)
                if HAS_SCALE:
                    xa *= tl.load(SCALE + slot)
            else:
                # Sum the shrink's split-K planes in a fixed order: deterministic.
                xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                xa_ptr = XA + tok[:, None] * stride_xat + (j * R + rr)[None, :]
                for s in range(0, n_splits):
                    xa += tl.load(xa_ptr + s * stride_xap,
                                  mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            if WRITE_XA:
                tl.store(XA_OUT + tok[:, None] * stride_xat + (j * R + rr)[None, :], xa,
                         mask=row_mask[:, None] & r_mask[None, :] & (nt == 0))
            acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision=PREC)

    y_ptr = Y + tok[:, None] * stride_yt + cols[None, :]
    mask = row_mask[:, None] & c_mask[None, :]
    y = tl.load(y_ptr, mask=mask, other=0.0)
    tl.store(y_ptr, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)  # one rounding


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
    rank = _rank_of(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if r0 >= rank:
        return
    q_lo, q_hi = _slice_bounds(BOUNDS, j, Q, SLICED_Q, SLICE_ALIGN)
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


# ------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated and contiguous (docs/BACKENDS.md); strided *views* of the
# adapter stacks are described by explicit strides so the backward reuses the same kernels
# (B_i as a "shrink matrix", A_i as an "expand matrix").
# ------------------------------------------------------------------------------------------
SCAN_MAX_ACTIVE = 4096  # beyond this the per-program prefix scan costs more than empty programs


def token_tiles(batch, block_m: int) -> tuple[int, bool, int, int]:
    """``(grid tiles, scan, tiles_per_seg, A_BLOCK)`` from the batch's host ints only.

    A fixed ``tiles_per_seg`` per active segment when that grid is no larger than the dense
    one (always so in decode, where every segment fits one tile: no scan, no empty program);
    the in-kernel scan otherwise (skewed segments), unless A is too large to scan.
    """
    A = batch.num_active
    per_seg = max(1, triton.cdiv(batch.max_seg_len, block_m))
    dense = triton.cdiv(batch.num_tokens, block_m) + A
    if A * per_seg <= dense or A > SCAN_MAX_ACTIVE:
        return A * per_seg, False, per_seg, 16
    # A_BLOCK ≥ 16: one compiled variant covers every small batch.
    return dense, True, per_seg, max(16, triton.next_power_of_2(A))


def _ranks_args(ranks, dummy):
    if ranks is None:
        return dummy, 0, 0, False
    if ranks.dim() == 1:
        return ranks, ranks.stride(0), 0, True
    return ranks, ranks.stride(0), ranks.stride(1), True


def launch_shrink(inp, mat, mat_strides, out, batch, cfg, *, R, n_slices, scalings, ranks,
                  bounds, max_width, prec, slice_align=16):
    """``out[split, t, j·R + r] (+)= s_i · inp[t, cols_j] · mat_i[j, r, cols_j]ᵀ``.

    ``mat_strides = (slot, slice, rank, col)``; ``bounds`` (int32 ``[n_slices+1]``) restricts
    slice j to input columns ``bounds[j]:bounds[j+1]`` (None: every slice reads all of them).
    ``out`` is ``[cfg.split, T, n_slices·R]`` float32; rows/ranks it does not cover are left as
    they were. ``slice_align``: 16 when every boundary is a multiple of 16 (the kernels then
    tell the compiler so, and loads/stores of slice-relative tiles vectorize), else 1.
    """
    tiles, scan, per_seg, a_block = token_tiles(batch, cfg.block_m)
    width = inp.shape[1] if bounds is None else max_width
    k_per_split = triton.cdiv(triton.cdiv(width, cfg.split), cfg.block_k) * cfg.block_k
    rank_tiles = triton.cdiv(R, cfg.block_r)
    rk, srs, srj, has_rk = _ranks_args(ranks, out)
    grid = (tiles * n_slices * rank_tiles * cfg.split,)
    _shrink_kernel[grid](
        inp, mat, out, out if scalings is None else scalings, rk,
        out if bounds is None else bounds,
        batch.sorted_token_ids, batch.seg_offsets, batch.active_slots, batch.num_active, per_seg,
        R, inp.shape[1], n_slices, rank_tiles, cfg.split, k_per_split,
        inp.stride(0), *mat_strides, out.stride(0), out.stride(1), srs, srj,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, A_BLOCK=a_block,
        SCAN=scan, HAS_SCALE=scalings is not None, HAS_RANKS=has_rk,
        SLICED_IN=bounds is not None, SLICE_ALIGN=slice_align, PREC=prec,
        num_warps=cfg.num_warps)
    return out


def launch_expand(y, xa, mat, mat_strides, batch, cfg, *, R, n_slices, ranks, bounds,
                  max_width, prec, slice_align=16, inline=None, xa_out=None):
    """``y[t, cols] += Σ_{j, r<rank} xa[t, j·R + r] · mat_i[cols, j, r]`` in place.

    ``mat_strides = (slot, col, slice, rank)``. ``bounds`` given: slice j writes only its own
    columns (forward of a packed projection); None: every slice adds into every column (the
    backward's dX). ``xa``: ``[splits, T, n_slices·R]`` float32 planes, summed here; or
    ``inline = (x, lora_a, scalings)`` to recompute the shrink in-program. ``xa_out``: write
    the reduced xa there too (autograd saves it).
    """
    tiles, scan, per_seg, a_block = token_tiles(batch, cfg.block_m)
    sum_slices = bounds is None
    width = y.shape[1] if sum_slices else max_width
    n_ntiles = triton.cdiv(width, cfg.block_n)
    rk, srs, srj, has_rk = _ranks_args(ranks, y)
    if inline is not None:
        x, lora_a, scalings = inline
        xa_planes, n_splits, K = y, 1, x.shape[1]
        sx, sas, sar = x.stride(0), lora_a.stride(0), lora_a.stride(1)
    else:
        x = lora_a = scalings = None
        xa_planes, n_splits, K = xa, xa.shape[0], 0
        sx = sas = sar = 0
    grid = (tiles * (1 if sum_slices else n_slices) * n_ntiles,)
    _expand_kernel[grid](
        y, xa_planes, mat, rk, y if bounds is None else bounds,
        y if x is None else x, y if lora_a is None else lora_a,
        y if scalings is None else scalings, y if xa_out is None else xa_out,
        batch.sorted_token_ids, batch.seg_offsets, batch.active_slots, batch.num_active, per_seg,
        R, K, y.shape[1], n_slices, n_ntiles, n_splits,
        # xa planes and xa_out are contiguous rows of n_slices·R floats.
        y.stride(0), 0 if inline is not None else xa.stride(0), n_slices * R,
        *mat_strides, sx, sas, sar, srs, srj,
        # Rank tiles of 16 whatever the shrink used: the expand loops over them anyway, and a
        # 64-wide fp32 xa tile next to the [BLOCK_M, BLOCK_N] accumulator exhausts registers.
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=16, BLOCK_K=cfg.block_k,
        A_BLOCK=a_block, SCAN=scan, HAS_RANKS=has_rk, SUM_SLICES=sum_slices,
        INLINE=inline is not None, HAS_SCALE=scalings is not None, WRITE_XA=xa_out is not None,
        SLICE_ALIGN=slice_align, PREC=prec, num_warps=cfg.num_warps)
    return y


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
    rk, srs, srj, has_rk = _ranks_args(ranks, out)
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
        out.index_copy_(0, batch.active_slots.long(), dst.sum(0).to(out.dtype))
    return out
