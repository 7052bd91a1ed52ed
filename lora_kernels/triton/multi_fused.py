"""Base GEMM fused with each token's own low-rank term: ``y[t] = x[t]·Wᵀ + b + xa[t]·B_iᵀ``.

One program computes a ``BLOCK_M × BLOCK_N`` tile of y over *sorted* token positions
(``sorted_token_ids``): the base GEMM does not care about row order, and in sorted order a tile
holds at most a few adapter segments. The epilogue then walks the distinct slots of the tile
(ascending, found with a min-reduction — no host data) and adds ``xa[rows of slot]·B_slotᵀ`` as
one small MMA per slot and slice, before the single write of the output tile.

*Why tiles over sorted positions and not per segment*: segment-aligned M tiles would pad every
segment up to ``BLOCK_M`` — with 64 adapters over 8192 tokens that doubles the number of M tiles
of the base GEMM. *Why not the original order*: a random mix of adapters puts up to BLOCK_M
distinct slots in a tile, each costing an epilogue MMA. *Why xa comes precomputed*
(``lora_shrink``, one pass over x): computing it inside the main loop would need one A_i per
row. The extra cost over the bare GEMM is one read of x (the shrink) plus
``segments-per-tile × r/K`` of the tile's MMA work.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lora_kernels.triton import configs as C
from lora_kernels.triton.sgmv import _rank_of, _ranks_args
from lora_kernels.triton.tiles import grouped_tile


@triton.jit
def _fused_kernel(
        X, W, BIAS, Y, XA, B, RANKS, BOUNDS, adapter_ids, sorted_ids,
        T, N, K, R, S, n_slices, t_bucket,
        stride_xt, stride_wn, stride_wk, stride_yt, stride_xat, stride_bs, stride_bn,
        stride_rs, stride_rj,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, PREC: tl.constexpr,
        LORA_PREC: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pos < T
    # Rows past T read token 0 and columns past N wrap: the main loop needs no row/col masks.
    tok = tl.load(sorted_ids + pos, mask=row_mask, other=0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # W keeps the caller's strides (a transposed view from a Conv1D works as is). Pointers
    # advance by BLOCK_K per step (64-bit adds; no per-step offset products).
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_xt + offs_k[None, :]
    w_ptrs = (W + (cols % N)[None, :].to(tl.int64) * stride_wn
              + offs_k[:, None].to(tl.int64) * stride_wk)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    # LoRA epilogue: one pass per distinct slot in the tile (tokens of -1 are skipped; sorted
    # order makes the slots of a tile a short ascending run).
    slots = tl.load(adapter_ids + tok, mask=row_mask, other=-1)
    cur = tl.min(tl.where(slots >= 0, slots, S), 0)
    while cur < S:
        sel = slots == cur
        b_cols = B + cur.to(tl.int64) * stride_bs + cols.to(tl.int64) * stride_bn
        for j in range(0, n_slices):
            c_lo = tl.load(BOUNDS + j)
            c_hi = tl.load(BOUNDS + j + 1)
            if (c_lo < n0 + BLOCK_N) & (c_hi > n0):  # slice j meets this column tile
                rank = _rank_of(RANKS, cur, j, R, stride_rs, stride_rj, HAS_RANKS)
                in_slice = (cols >= c_lo) & (cols < c_hi)
                for r0 in range(0, rank, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    r_mask = rr < rank
                    xa = tl.load(XA + tok[:, None] * stride_xat + (j * R + rr)[None, :],
                                 mask=sel[:, None] & r_mask[None, :], other=0.0)
                    bt = tl.load(b_cols[None, :] + rr[:, None],
                                 mask=r_mask[:, None] & in_slice[None, :], other=0.0)
                    acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision=LORA_PREC)
        cur = tl.min(tl.where(slots > cur, slots, S), 0)

    y_ptr = Y + tok[:, None] * stride_yt + cols[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# EVEN_K (no K masks in the main loop) follows whichever BLOCK_K the config has.
_fused_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_fused_kernel)
# Autotuned on GPUs only: the key buckets T by powers of two so a serving loop with a new T
# every step does not re-tune every step. The interpreter gets one small fixed config.
_fused_tuned = triton.autotune(configs=C.MULTI_FUSED, key=["N", "K", "t_bucket"])(_fused_even_k)


def launch_fused(x, weight, bias, y, xa, lora_b, ranks, bounds, batch, *, R, n_slices, prec,
                 lora_prec, interpret, config=None):
    """``y = x·Wᵀ + b + Σ_slices xa·B_iᵀ`` written once. ``xa``: the scaled shrink output,
    ``[T, n_slices·R]`` float32 (or one ``[1, T, n_slices·R]`` plane); only rows of adapted
    tokens and ranks below each rank are read. ``W`` may have any strides; the rest is dense."""
    T, K = x.shape
    N = weight.shape[0]
    xa2 = xa[0] if xa.dim() == 3 else xa
    rk, srs, srj, has_rk = _ranks_args(ranks, y)
    args = (x, weight, y if bias is None else bias, y, xa2, lora_b, rk, bounds,
            batch.adapter_ids, batch.sorted_token_ids,
            T, N, K, R, batch.num_slots, n_slices, C.m_bucket(T),
            x.stride(0), weight.stride(0), weight.stride(1), y.stride(0), xa2.stride(0),
            lora_b.stride(0), lora_b.stride(1), srs, srj)
    flags = dict(BLOCK_R=16, HAS_BIAS=bias is not None, HAS_RANKS=has_rk,
                 PREC=prec, LORA_PREC=lora_prec)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpret or config is not None:
        cfg = dict(C.MULTI_FUSED_INTERPRET if config is None else config)
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        _fused_even_k[grid](*args, **cfg, **flags, **launch)
    else:
        _fused_tuned[grid](*args, **flags)
    return y
