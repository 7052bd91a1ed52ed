"""Epilogue steps of the GEMM core, applied in this order to the fp32 tile:

1. the low-rank term: seeded before the main loop (:func:`lowrank_seed`), added from the
   in-loop u (:func:`in_loop_term`), or walked per adapter slot (:func:`per_slot_term`);
   (the fp8 x fp8 GEMM instead scales its accumulator by ``row_scale[m]·col_scale[n]`` and then
   adds the low-rank term into it: :func:`fp8_act_scale`);
2. the column scale (:func:`scale_bias`, ``COL_SCALE_VECTOR``): ``acc *= col_scale[n]``;
3. the bias, after the scale: ``out = col_scale[n]·(a·wᵀ + low-rank) + bias[n]``;
4. the one store of the output tile in its dtype (:func:`store_tile`: pointers or TMA).

A new fusion is one more step here and one spec value, not a new main loop.
"""

import triton
import triton.language as tl

from lora_kernels.triton.dropout import keep_tile, load_bits_tile, spread_bits
from lora_kernels.triton.gemm.modes import COL_SCALE_VECTOR, STORE_TMA
from lora_kernels.triton.slots import slot_rank


@triton.jit
def rank_dot(acc, u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um, stride_ur, stride_lbn,
             stride_lbr, scaling, SCALE_U: tl.constexpr, BLOCK_R: tl.constexpr,
             PRECISION: tl.constexpr):
    """``acc + u[rows, :R]·lb[cols, :R]ᵀ`` in rank chunks of BLOCK_R (any r fits); with
    ``SCALE_U`` each u chunk is first scaled by ``scaling`` and rounded to lb's dtype (the term
    then goes straight into a live accumulator, no second fp32 tile)."""
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        u = tl.load(u_ptr + rm64[:, None] * stride_um + (r0 + rr)[None, :] * stride_ur,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        lbt = tl.load(lb_ptr + rn64[None, :] * stride_lbn + (r0 + rr)[:, None] * stride_lbr,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE_U:
            u = (u.to(tl.float32) * scaling).to(lbt.dtype)
        acc = tl.dot(u, lbt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def lowrank_seed(u_ptr, lb_ptr, row0, col0, rm64, rn64, m_ok, n_ok, N, R, stride_um, stride_ur,
                 stride_lbn, stride_lbr, scaling, seed, drop_threshold, drop_scale,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, bits_ptr=None,
                 READ_BITS: tl.constexpr = False):
    """The seeded term ``s·u[rows, :R]·lb[cols, :R]ᵀ`` (masked for the dX backward) as the
    accumulator's initial value (LoRAFusion), so the output is stored once.

    Register budget, from sm_90 compiles (ptxas -v) of the 128-row dX tiles with dropout:
    adding the term in the epilogue instead needs a second fp32 tile next to the main one
    (the mask applies to this term only) and spilled up to 10 KB per thread; seeding compiles
    spill-free at 64 accumulator elements per thread (bench/sass_report.py). 128 elements per
    thread spilled with the v1 mask, so those configs are pruned when the dX carries dropout
    (``configs.prune_dropout``). Rank chunks of BLOCK_R loop, so any r fits.
    """
    low = rank_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr, lb_ptr, rm64, rn64,
                   m_ok, n_ok, R, stride_um, stride_ur, stride_lbn, stride_lbr, 1.0, False,
                   BLOCK_R, PRECISION)
    if DROPOUT:
        # dX's mask is the forward's mask on x: element (m, k) of dX is element (m, k) of the
        # [M, K] mask grid, and K is this GEMM's N. Drawn after the rank dot, so no mask tile
        # is live across it; where, not a product: a dropped element is 0 even when the term
        # is inf/NaN (as in the reference).
        # READ_BITS: the forward's packed mask (uint8 [M, ceil(N/8)]): the byte tile spread
        # to the accumulator layout costs 3.5 SASS/element against 19.2 for the Philox redraw
        # (a per-element byte load was 11.4; static sm_90a, 128x128 tiles, notes/mask.md).
        if READ_BITS:
            keep = spread_bits(load_bits_tile(bits_ptr, (N + 7) // 8, rm64, m_ok, col0,
                                              (N + 7) // 8, BLOCK_N), BLOCK_M, BLOCK_N)
        else:
            keep = keep_tile(seed, row0, col0, N, drop_threshold, BLOCK_M, BLOCK_N)
        low = tl.where(keep, low * (drop_scale * scaling), 0.0)
    else:
        low = low * scaling
    return low


@triton.jit
def fp8_act_scale(acc, row_scale_ptr, col_scale_ptr, u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R,
                  stride_um, stride_ur, stride_lbn, stride_lbr, scaling, LOWRANK: tl.constexpr,
                  BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The fp8 x fp8 epilogue (``WEIGHT_FP8_ACT``): ``(acc·row_scale[m])·col_scale[n] +
    (s·u)·lbᵀ`` with ``acc = Σ_k e4m3(a)·e4m3(w)`` (fp32), ``row_scale`` the per-token scale of
    the activation codes, ``col_scale`` the weight's per-channel scale, ``u`` = xa of the
    *unquantized* x (the quantizer's pass makes it). The scales cannot seed the accumulator
    (they multiply the whole K sum), so the low-rank term comes after the loop; each rank chunk
    accumulates straight into acc (s·u rounded to lb's dtype, as :func:`in_loop_term` does),
    so no second fp32 tile is live next to the accumulator."""
    rs = tl.load(row_scale_ptr + rm64, mask=m_ok, other=0.0)
    cs = tl.load(col_scale_ptr + rn64, mask=n_ok, other=0.0)
    acc = (acc * rs[:, None]) * cs[None, :]
    if LOWRANK:
        acc = rank_dot(acc, u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um, stride_ur,
                       stride_lbn, stride_lbr, scaling, True, BLOCK_R, PRECISION)
    return acc


@triton.jit
def in_loop_term(acc, u_acc, lb_ptr, rn64, n_ok, r_ok, stride_lbn, stride_lbr, scaling,
                 BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr = False,
                 seed=0, drop_threshold=0, drop_scale=1.0, row0=0, col0=0, rm64=None,
                 m_ok=None, N=0, BLOCK_M: tl.constexpr = 1, BLOCK_N: tl.constexpr = 1,
                 bits_ptr=None, READ_BITS: tl.constexpr = False):
    """``acc += (s·u)·lbᵀ`` for the in-loop u. s·u is rounded once to the input dtype (the
    torch composition rounds u there too) and the dot accumulates straight into acc: no second
    fp32 tile in registers. The term is linear in u, so split-K slabs each add their share.

    ``DROPOUT`` (the panel dX at p > 0, a = dY): the mask is on dX's (m, k) grid and applies
    to this term only, so it gets its own fp32 tile, masked as :func:`lowrank_seed` masks the
    seeded one (bits when the forward wrote them, else the Philox redraw) and then added."""
    rr = tl.arange(0, BLOCK_R)
    lbt = tl.load(lb_ptr + rn64[None, :] * stride_lbn + rr[:, None] * stride_lbr,
                  mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    su = (u_acc * scaling).to(lbt.dtype)
    if DROPOUT:
        low = tl.dot(su, lbt, input_precision=PRECISION)
        if READ_BITS:
            keep = spread_bits(load_bits_tile(bits_ptr, (N + 7) // 8, rm64, m_ok, col0,
                                              (N + 7) // 8, BLOCK_N), BLOCK_M, BLOCK_N)
        else:
            keep = keep_tile(seed, row0, col0, N, drop_threshold, BLOCK_M, BLOCK_N)
        return acc + tl.where(keep, low * drop_scale, 0.0)
    return tl.dot(su, lbt, acc, input_precision=PRECISION)


@triton.jit
def store_rank_rows(u_ptr, u_acc, rm64, m_ok, r_ok, stride_um, stride_ur, BLOCK_R: tl.constexpr):
    """Write the in-loop u (= xa, saved for the backward) in u's dtype."""
    rr = tl.arange(0, BLOCK_R)
    tl.store(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
             u_acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def per_slot_term(acc, XA, B, RANKS, BOUNDS, slots, rows, cols, col0, S, R, n_slices,
                  stride_xat, stride_bs, stride_bn, stride_rs, stride_rj,
                  HAS_RANKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``acc[i] += xa[rows[i]]·B_{slots[i]}ᵀ`` restricted to each slice's columns: one pass per
    distinct slot in the tile (ascending, found with a min-reduction: no host data; rows of
    slot -1 are skipped), one small MMA per slot, slice and rank chunk."""
    cur = tl.min(tl.where(slots >= 0, slots, S), 0)
    while cur < S:
        sel = slots == cur
        b_cols = B + cur.to(tl.int64) * stride_bs + cols.to(tl.int64) * stride_bn
        for j in range(0, n_slices):
            c_lo = tl.load(BOUNDS + j)
            c_hi = tl.load(BOUNDS + j + 1)
            if (c_lo < col0 + BLOCK_N) & (c_hi > col0):  # slice j meets this column tile
                rank = slot_rank(RANKS, cur, j, R, stride_rs, stride_rj, HAS_RANKS)
                in_slice = (cols >= c_lo) & (cols < c_hi)
                for r0 in range(0, rank, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    r_mask = rr < rank
                    xa = tl.load(XA + rows[:, None] * stride_xat + (j * R + rr)[None, :],
                                 mask=sel[:, None] & r_mask[None, :], other=0.0)
                    bt = tl.load(b_cols[None, :] + rr[:, None],
                                 mask=r_mask[:, None] & in_slice[None, :], other=0.0)
                    acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision=PRECISION)
        cur = tl.min(tl.where(slots > cur, slots, S), 0)
    return acc


@triton.jit
def scale_bias(acc, cs_ptr, bias_ptr, rn64, n_ok, stride_cs, stride_b,
               COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``col_scale[n]·acc + bias[n]`` (fp32 scale; the bias after it, in fp32)."""
    if COL_SCALE == COL_SCALE_VECTOR:
        acc = acc * tl.load(cs_ptr + rn64 * stride_cs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64 * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def store_tile(acc, out_ptr, o_desc, row0, col0, o_rows, rn64, m_ok, n_ok, stride_on,
               STORE: tl.constexpr):
    """The one store of the output tile in out's dtype; ``o_rows`` are int64 row offsets
    (``row·stride_om``: dense or gathered rows). A descriptor store clips at the edges."""
    if STORE == STORE_TMA:
        o_desc.store([row0, col0], acc.to(o_desc.dtype))
    else:
        tl.store(out_ptr + o_rows[:, None] + rn64[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
