"""Segment shrink and expand kernels for heterogeneous multi-adapter batches (Punica SGMV /
BGMV family), decode and prefill shapes, with their launchers.

Tokens are visited through ``LoRABatch.sorted_token_ids``: slot ``i``'s tokens are the sorted
positions ``seg_offsets[i+1] : seg_offsets[i+2]`` and the ``-1`` tokens (positions before
``seg_offsets[1]``) are never visited at all, so base-only tokens cost nothing here.

* :func:`_shrink_kernel` — ``out[t, j·R + r] = s_i · Σ_k in[t, k]·A_i[j, r, k]`` over one token
  tile of one slot segment, one slice ``j`` and one 16-wide rank tile; ``SPLIT`` (a
  compile-time constant chosen from the shape) splits the reduction dimension so a decode
  batch still fills one wave of the GPU, each split writing its own partial plane (no
  atomics: the consumer sums the planes in a fixed order). ``SLICED_IN`` makes slice ``j`` read
  only its own input columns: that is the backward's ``dY·B_i`` of a packed projection.
* :func:`_expand_kernel` — ``y[t, n] += Σ_r xa[t, j·R + r]·B_i[n, j, r]``, xa taken from the
  shrink's ``SPLIT`` partial planes (an unrolled sum), or recomputed in-program (``INLINE``:
  shrink + expand in one launch for tiny decode batches); ``SUM_SLICES`` contracts over every
  slice instead (the backward's ``dX += u·A_i``). Can write the reduced xa back for autograd.

With ``PDL`` (sm_90, see :func:`segments.pdl_supported`) the shrink lets the expand launch at
once; the expand loads its token ids, its first B tile and its y tile — none written by the
shrink — and waits (``gdc_wait``) only before it reads the planes.

Rank loops and rank-tile programs stop at ``ranks[slot, j]`` (masked loads inside a tile never
touch memory), so cost follows each adapter's real rank, not r_max. All index arithmetic that
multiplies a row or slot by a stride is done in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton.segments import TILES_BY_MAP, segment_tile, slice_bounds, token_tiles
from lora_kernels.triton.slots import ranks_args, slot_rank

try:  # Triton ≥ 3.4; only traced when PDL is on (segments.pdl_supported())
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


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
        sorted_ids, tile_map, seg_offsets, active_slots, num_active, tiles_per_seg,
        R, K, n_slices, rank_tiles, k_per_split,
        stride_xt, stride_as, stride_aj, stride_ar, stride_ak,
        stride_op, stride_ot, stride_rs, stride_rj,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        A_BLOCK: tl.constexpr, TILES: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_RANKS: tl.constexpr, SLICED_IN: tl.constexpr, SLICE_ALIGN: tl.constexpr,
        PDL: tl.constexpr, PREC: tl.constexpr):
    if PDL:
        # The expand may launch now: it waits for this grid before it reads the planes.
        gdc_launch_dependents()
    # Split fastest: the splits of one (tile, rank tile) run side by side and share x rows in L2.
    pid = tl.program_id(0)
    split = pid % SPLIT
    rest = pid // SPLIT
    jr = rest % (n_slices * rank_tiles)
    tile = rest // (n_slices * rank_tiles)
    j = jr // rank_tiles
    r0 = (jr % rank_tiles) * BLOCK_R

    slot, row_lo, seg_hi = segment_tile(tile, tile_map, seg_offsets, active_slots, num_active,
                                        tiles_per_seg, BLOCK_M, A_BLOCK, TILES)
    if slot < 0:
        return
    rank = slot_rank(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if r0 >= rank:  # cost follows the real rank: rank tiles past it do nothing
        return
    c_lo, c_hi = slice_bounds(BOUNDS, j, K, SLICED_IN, SLICE_ALIGN)
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
        sorted_ids, tile_map, seg_offsets, active_slots, num_active, tiles_per_seg,
        R, K, N_OUT, n_slices, n_ntiles,
        stride_yt, stride_xap, stride_xat,
        stride_bs, stride_bn, stride_bj, stride_br,
        stride_xt, stride_as, stride_ar, stride_rs, stride_rj,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, A_BLOCK: tl.constexpr,
        TILES: tl.constexpr, HAS_RANKS: tl.constexpr, SUM_SLICES: tl.constexpr,
        INLINE: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_XA: tl.constexpr,
        SLICE_ALIGN: tl.constexpr, PDL: tl.constexpr, PREC: tl.constexpr):
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
        c_lo, c_hi = slice_bounds(BOUNDS, j_lo, N_OUT, True, SLICE_ALIGN)
    n0 = c_lo + nt * BLOCK_N
    if n0 >= c_hi:  # the grid covers the widest slice; narrower ones (GQA k/v) stop here
        return
    slot, row_lo, seg_hi = segment_tile(tile, tile_map, seg_offsets, active_slots, num_active,
                                        tiles_per_seg, BLOCK_M, A_BLOCK, TILES)
    if slot < 0:
        return
    # A slot that does not adapt these slices (rank 0) leaves y alone: no read-modify-write.
    live = 0
    for j in range(j_lo, j_hi):
        live += slot_rank(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
    if live == 0:
        return
    slot64 = slot.to(tl.int64)
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_hi
    tok = tl.load(sorted_ids + rows, mask=row_mask, other=0).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    c_mask = cols < c_hi
    b_cols = B + slot64 * stride_bs + cols.to(tl.int64) * stride_bn
    y_ptr = Y + tok[:, None] * stride_yt + cols[None, :]
    y_mask = row_mask[:, None] & c_mask[None, :]

    # The first B tile (for decode: all of B_i's share of this program) is requested before
    # anything that waits on the shrink, so its latency hides behind the dependency.
    r_first = tl.arange(0, BLOCK_R)
    rank_lo = slot_rank(RANKS, slot, j_lo, R, stride_rs, stride_rj, HAS_RANKS)
    b_first = tl.load(b_cols[None, :] + j_lo * stride_bj + r_first[:, None].to(tl.int64) * stride_br,
                      mask=(r_first < rank_lo)[:, None] & c_mask[None, :], other=0.0)
    if PDL:
        y = tl.load(y_ptr, mask=y_mask, other=0.0)  # written before the shrink ran: no wait
        gdc_wait()  # the shrink's planes are complete and visible from here on

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        rank = slot_rank(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr < rank
            if (j == j_lo) & (r0 == 0):
                bt = b_first
            else:
                bt = tl.load(b_cols[None, :] + j * stride_bj + rr[:, None].to(tl.int64) * stride_br,
                             mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            if INLINE:
                a_rows = A + slot64 * stride_as + (j * R + rr).to(tl.int64) * stride_ar
                xa = _shrink_tile(X, tok, row_mask, r_mask, 0, K, stride_xt, a_rows, 1,
                                  BLOCK_M, BLOCK_R, BLOCK_K, PREC)
                if HAS_SCALE:
                    xa *= tl.load(SCALE + slot)
            else:
                # Sum the shrink's split-K planes in a fixed order (deterministic); SPLIT is a
                # compile-time constant, so the loads are unrolled and all in flight together.
                xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                xa_ptr = XA + tok[:, None] * stride_xat + (j * R + rr)[None, :]
                for s in tl.static_range(SPLIT):
                    xa += tl.load(xa_ptr + s * stride_xap,
                                  mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            if WRITE_XA:
                tl.store(XA_OUT + tok[:, None] * stride_xat + (j * R + rr)[None, :], xa,
                         mask=row_mask[:, None] & r_mask[None, :] & (nt == 0))
            acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision=PREC)

    if not PDL:
        y = tl.load(y_ptr, mask=y_mask, other=0.0)
    tl.store(y_ptr, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)  # one rounding


# ------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated and contiguous (docs/BACKENDS.md); strided *views* of the
# adapter stacks are described by explicit strides so the backward reuses the same kernels
# (B_i as a "shrink matrix", A_i as an "expand matrix").
# ------------------------------------------------------------------------------------------
def _meta(batch, block_m):
    tiles, mode, per_seg, a_block = token_tiles(batch, block_m)
    return tiles, dict(MODE=mode, A_BLOCK=a_block), (
        batch.sorted_token_ids, batch.tile_map, batch.seg_offsets, batch.active_slots,
        batch.num_active, per_seg)


def launch_shrink(inp, mat, mat_strides, out, batch, cfg, *, R, n_slices, scalings, ranks,
                  bounds, max_width, prec, slice_align=16, pdl=False):
    """``out[split, t, j·R + r] (+)= s_i · inp[t, cols_j] · mat_i[j, r, cols_j]ᵀ``.

    ``mat_strides = (slot, slice, rank, col)``; ``bounds`` (int32 ``[n_slices+1]``) restricts
    slice j to input columns ``bounds[j]:bounds[j+1]`` (None: every slice reads all of them).
    ``out`` is ``[cfg.split, T, n_slices·R]`` float32; rows/ranks it does not cover are left as
    they were. ``slice_align``: 16 when every boundary is a multiple of 16 (the kernels then
    tell the compiler so, and loads/stores of slice-relative tiles vectorize), else 1.
    ``pdl``: let the next launch (an expand with ``pdl=True``) start early.
    """
    tiles, modes, meta = _meta(batch, cfg.block_m)
    width = inp.shape[1] if bounds is None else max_width
    k_per_split = triton.cdiv(triton.cdiv(width, cfg.split), cfg.block_k) * cfg.block_k
    rank_tiles = triton.cdiv(R, cfg.block_r)
    rk, srs, srj, has_rk = ranks_args(ranks, out)
    grid = (tiles * n_slices * rank_tiles * cfg.split,)
    # The shrink itself launches normally (it waits for whatever ran before it); only its
    # dependent, the expand, carries the launch_pdl attribute.
    _shrink_kernel[grid](
        inp, mat, out, out if scalings is None else scalings, rk,
        out if bounds is None else bounds, *meta,
        R, inp.shape[1], n_slices, rank_tiles, k_per_split,
        inp.stride(0), *mat_strides, out.stride(0), out.stride(1), srs, srj,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT=cfg.split,
        A_BLOCK=modes["A_BLOCK"], TILES=modes["MODE"], HAS_SCALE=scalings is not None,
        HAS_RANKS=has_rk, SLICED_IN=bounds is not None, SLICE_ALIGN=slice_align, PDL=pdl,
        PREC=prec, num_warps=cfg.num_warps)
    return out


def launch_expand(y, xa, mat, mat_strides, batch, cfg, *, R, n_slices, ranks, bounds,
                  max_width, prec, slice_align=16, inline=None, xa_out=None, pdl=False):
    """``y[t, cols] += Σ_{j, r<rank} xa[t, j·R + r] · mat_i[cols, j, r]`` in place.

    ``mat_strides = (slot, col, slice, rank)``. ``bounds`` given: slice j writes only its own
    columns (forward of a packed projection); None: every slice adds into every column (the
    backward's dX). ``xa``: ``[splits, T, n_slices·R]`` float32 planes, summed here; or
    ``inline = (x, lora_a, scalings)`` to recompute the shrink in-program. ``xa_out``: write
    the reduced xa there too (autograd saves it). ``pdl``: launched as the dependent of a
    ``pdl=True`` shrink (prefetch first, wait before reading ``xa``).
    """
    tiles, modes, meta = _meta(batch, cfg.block_m)
    sum_slices = bounds is None
    width = y.shape[1] if sum_slices else max_width
    n_ntiles = triton.cdiv(width, cfg.block_n)
    rk, srs, srj, has_rk = ranks_args(ranks, y)
    if inline is not None:
        x, lora_a, scalings = inline
        xa_planes, n_splits, K = y, 1, x.shape[1]
        sx, sas, sar = x.stride(0), lora_a.stride(0), lora_a.stride(1)
        pdl = False
    else:
        x = lora_a = scalings = None
        xa_planes, n_splits, K = xa, xa.shape[0], 0
        sx = sas = sar = 0
    grid = (tiles * (1 if sum_slices else n_slices) * n_ntiles,)
    extra = dict(launch_pdl=True) if pdl else {}
    _expand_kernel[grid](
        y, xa_planes, mat, rk, y if bounds is None else bounds,
        y if x is None else x, y if lora_a is None else lora_a,
        y if scalings is None else scalings, y if xa_out is None else xa_out, *meta,
        R, K, y.shape[1], n_slices, n_ntiles,
        # xa planes and xa_out are contiguous rows of n_slices·R floats.
        y.stride(0), 0 if inline is not None else xa.stride(0), n_slices * R,
        *mat_strides, sx, sas, sar, srs, srj,
        # Rank tiles of 16 whatever the shrink used: the expand loops over them anyway, and a
        # 64-wide fp32 xa tile next to the [BLOCK_M, BLOCK_N] accumulator exhausts registers.
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=16, BLOCK_K=cfg.block_k,
        SPLIT=n_splits, A_BLOCK=modes["A_BLOCK"], TILES=modes["MODE"], HAS_RANKS=has_rk,
        SUM_SLICES=sum_slices, INLINE=inline is not None, HAS_SCALE=scalings is not None,
        WRITE_XA=xa_out is not None, SLICE_ALIGN=slice_align, PDL=pdl, PREC=prec,
        num_warps=cfg.expand_warps, **extra)
    return y


__all__ = ["launch_shrink", "launch_expand", "TILES_BY_MAP"]
