"""Launchers of the MoE-LoRA op (ops/moe_lora.py): one grouped GEMM over expert segments.

Layout: pairs ``p = t·k + j`` sorted by expert (``sorted_pairs``, bounds ``offsets [E+1]``,
both from ``ops.moe_lora.moe_plan``). A tile table built here on the device (no host sync)
maps each M tile of the grid to ``(expert, row0, row_end)`` of one segment; the grid is the
upper bound ``cdiv(P, BLOCK_M) + E`` M tiles, unused tiles exit at once. Per tile the GEMM
core's ``moe_gemm_kernel`` runs the one K loop on gathered rows with the expert's weight and
LoRA factors, the low-rank term in the accumulator (no ``W_e + s·B_e·A_e`` anywhere).

* forward:  ``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ``, ``u = x·A_eᵀ`` saved (sorted order);
* dX:       the same kernel on ``dy`` with ``W_eᵀ``, ``B_eᵀ``, ``A_eᵀ`` stride views, which also
            yields ``g = dy·B_e`` (the in-loop u of that GEMM);
* dA, dB:   :func:`moe_rank_grad_kernel`, one program per (expert, column tile) summing its
            segment in a fixed order: rank-sized outputs, deterministic, no atomics.

Bytes and FLOPs (prediction; forward of the #18 gate_up: bf16, E = 64, top-8, T = 8192 so
P = 65536 pairs, K = 4096, N = 3072, r = 16): minimum traffic = W 1.5 GiB + gathered x 512 MiB +
y 384 MiB; 2·P·N·K = 1.65 TFLOP. With GROUP_M = 16 row tiles sweeping the N tiles together,
each expert's ~16 M tiles (1024 rows / 64) read W_e about once and their rows stay in L2:
HBM ≈ the minimum (≈ 0.5 ms at 4.8 TB/s) against ≈ 2.5 ms of MMA at ~660 TFLOP/s, so the
kernel is compute-bound and the LoRA cost is MMA work: seeded mode adds the shrink (2·P·K·r
= 0.4%, plus one more read of the gathered x, 512 MiB ≈ 0.1 ms) and 2·P·N·r (0.4%); in-loop
mode would add r/BLOCK_N = 12.5% here, which is why 24 N tiles pick the seeded mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.triton.device import dot_precision, interpreting
from lora_kernels.triton.gemm.kernel import moe_gemm_kernel
from lora_kernels.triton.gemm.modes import LORA_IN_LOOP, LORA_NONE, LORA_SEEDED

_INTERPRET_CFG = dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_GPU_CFG = dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=16, num_warps=4, num_stages=3)


# "in_loop" / "seeded" forces the low-rank mode of the single-adapter kernels (tests); None
# picks by the number of N tiles (see lora_mode).
FORCE_MODE = None


def lora_mode(N: int) -> int:
    """In-loop recomputes u = a·A_eᵀ in every N tile (+r/BLOCK_N MMA work per tile, no extra
    pass); seeded pays one shrink pass (a grouped GEMM with N = r: one more read of the
    gathered rows, 2·P·K·r FLOPs) and then r/K. With 4 or more N tiles the shrink is cheaper."""
    if FORCE_MODE is not None:
        return {"in_loop": LORA_IN_LOOP, "seeded": LORA_SEEDED}[FORCE_MODE]
    block_n = (_INTERPRET_CFG if interpreting() else _GPU_CFG)["BLOCK_N"]
    return LORA_SEEDED if triton.cdiv(N, block_n) >= 4 else LORA_IN_LOOP


def _block_m(P: int, E: int) -> int:
    # Segment tiles pad each expert to BLOCK_M rows: small segments (decode) want small tiles.
    if interpreting():
        return 16
    avg = P / max(E, 1)
    return 16 if avg <= 16 else (32 if avg <= 32 else 64)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))  # tl.dot needs K >= 16


def tile_table(offsets: torch.Tensor, P: int, block_m: int, slots: int = 0) -> torch.Tensor:
    """``[cdiv(P, BLOCK_M) + segments, 4]`` int32 ``(expert or -1, slot, row0, row_end)`` per
    M tile. ``offsets`` bounds ``E`` segments (``slots = 0``: slot 0 throughout) or
    ``E·(slots + 1)`` (expert-major, then slot -1 (base only), 0, ..., slots - 1)."""
    G = slots + 1 if slots else 1
    n_seg = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles_g = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles_g, 0)
    t = torch.arange(triton.cdiv(P, block_m) + n_seg, device=offsets.device)
    g = torch.searchsorted(ends, t, right=True)
    gc = g.clamp(max=n_seg - 1)
    row0 = offsets[gc] + (t - (ends[gc] - tiles_g[gc])) * block_m
    expert = torch.where(g < n_seg, gc // G, -1)
    slot = gc % G - 1 if slots else torch.zeros_like(gc)
    return torch.stack([expert, slot, row0, offsets[gc + 1]], 1).to(torch.int32)


def _grouped_gemm(a, w, la, lb, out, u, tiles, src, dst, N, K, R, w_strides, la_strides,
                  lb_strides, scaling, block_m, scales=None, store_u=True,
                  lora=LORA_IN_LOOP, block_n=None):
    """``la_strides`` / ``lb_strides``: (slot, expert, r, k) and (slot, expert, n, r)."""
    cfg = dict(_INTERPRET_CFG if interpreting() else _GPU_CFG)
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    grid = (tiles.shape[0] * triton.cdiv(N, cfg["BLOCK_N"]),)
    moe_gemm_kernel[grid](
        a, w, la, lb, out, u, tiles, src, dst, tiles if scales is None else scales,
        tiles.shape[0], N, K, R,
        a.stride(0), a.stride(1), *w_strides, *la_strides, *lb_strides,
        out.stride(0), out.stride(1), u.stride(0), u.stride(1), scaling,
        LORA=lora, STORE_U=store_u, SLOT_SCALES=scales is not None, BLOCK_R=_block_r(R),
        PRECISION=dot_precision(a.dtype), EVEN_K=K % cfg["BLOCK_K"] == 0, BLOCK_M=block_m,
        **cfg, **launch)


def _fused_term(a, w, la, lb, out, u, tiles, src, dst, N, K, R, w_strides, la_strides,
                lb_strides, scaling, block_m):
    """``out[dst] = a[src]·wᵀ + s·(a[src]·laᵀ)·lbᵀ`` per expert segment, ``u = a[src]·laᵀ``
    (sorted order) filled as a by-product; the low-rank mode by :func:`lora_mode`."""
    mode = lora_mode(N) if R > 0 else LORA_NONE  # rank 0 (an untargeted projection)
    if mode == LORA_SEEDED:
        # The shrink is the same grouped GEMM with w = la (N = r) and no low-rank term.
        P = src.shape[0]
        pos = torch.arange(P, device=src.device)
        _grouped_gemm(a, la, la, la, u, u, tiles, src, pos, R, K, 0, la_strides[1:],
                      (0,) * 4, (0,) * 4, 1.0, block_m, store_u=False, lora=LORA_NONE,
                      block_n=_block_r(R))
    _grouped_gemm(a, w, la, lb, out, u, tiles, src, dst, N, K, R, w_strides,
                  (0, *la_strides[1:]), (0, *lb_strides[1:]), scaling, block_m, lora=mode)


def moe_lora_fwd(x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling):
    """``(y [P, N] pair order, u [P, r] sorted order)`` (ops/moe_torch.py has the contract)."""
    P, K, R = sorted_pairs.shape[0], x.shape[1], lora_a.shape[1]
    E, N = weight.shape[0], weight.shape[1]
    bm = _block_m(P, E)
    tiles = tile_table(offsets, P, bm)
    src = sorted_pairs // group
    y = x.new_empty(P, N)
    u = x.new_empty(P, R)
    _fused_term(x, weight, lora_a, lora_b, y, u, tiles, src, sorted_pairs, N, K, R,
                (weight.stride(0), weight.stride(1), weight.stride(2)),
                (0, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
                (0, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), scaling, bm)
    return y, u


def moe_multi_lora_fwd(x, weight, lora_a, lora_b, scalings, sorted_pairs, offsets, group):
    """Multi-adapter forward (ops/moe_torch.py has the contract): segments per (expert,
    slot), ``lora_a [S, E, r, K]``, ``lora_b [S, E, N, r]``, ``scalings [S]`` fp32."""
    P, S, E = sorted_pairs.shape[0], lora_a.shape[0], weight.shape[0]
    N, K, R = weight.shape[1], x.shape[1], lora_a.shape[2]
    bm = _block_m(P, E)
    tiles = tile_table(offsets, P, bm, slots=S)
    y = x.new_empty(P, N)
    _grouped_gemm(x, weight, lora_a, lora_b, y, y, tiles, sorted_pairs // group, sorted_pairs,
                  N, K, R, (weight.stride(0), weight.stride(1), weight.stride(2)),
                  lora_a.stride(), lora_b.stride(), 1.0, bm, scales=scalings, store_u=False,
                  lora=LORA_IN_LOOP)
    return y


@triton.jit
def moe_rank_grad_kernel(M, V, OUT, SRC, OFFS, C, R, stride_mm, stride_mc, stride_vm,
                         stride_vr, stride_oe, stride_oc, stride_or, scaling,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """``OUT[e, c, r] = s·Σ_{pos in segment e} M[SRC[pos], c]·V[pos, r]`` (dAᵀ: M = x,
    V = dy·B_e; dB: M = dy, V = u), rows in a fixed order; an empty expert stores zeros."""
    e = tl.program_id(0)
    lo = tl.load(OFFS + e)
    hi = tl.load(OFFS + e + 1)
    rc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = rc < C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        ok = pos < hi
        src = tl.load(SRC + pos, mask=ok, other=0).to(tl.int64)
        m = tl.load(M + src[:, None] * stride_mm + rc[None, :] * stride_mc,
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        v = tl.load(V + pos[:, None].to(tl.int64) * stride_vm + rr[None, :] * stride_vr,
                    mask=ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(m), v.to(m.dtype), acc, input_precision=PRECISION)
    tl.store(OUT + e.to(tl.int64) * stride_oe + rc[:, None] * stride_oc + rr[None, :] * stride_or,
             (acc * scaling).to(OUT.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])


def _rank_grad(m, v, out, src, offsets, C, R, out_strides, scaling):
    block_c = 16 if interpreting() else 64
    block_m = 16 if interpreting() else 64
    E = offsets.shape[0] - 1
    moe_rank_grad_kernel[(E, triton.cdiv(C, block_c))](
        m, v, out, src, offsets, C, R, m.stride(0), m.stride(1), v.stride(0), v.stride(1),
        *out_strides, scaling, PRECISION=dot_precision(m.dtype), BLOCK_M=block_m,
        BLOCK_C=block_c, BLOCK_R=_block_r(R))


def moe_lora_bwd(dy, x, weight, lora_a, lora_b, u, sorted_pairs, offsets, group, scaling,
                 needs):
    """``(dx, dA, dB)`` (None where not needed), deterministic."""
    need_x, need_a, need_b = needs
    P, K, R = sorted_pairs.shape[0], x.shape[1], lora_a.shape[1]
    E, N = weight.shape[0], weight.shape[1]
    dx = da = db = None
    if need_x or need_a:
        bm = _block_m(P, E)
        tiles = tile_table(offsets, P, bm)
        dx_pair = dy.new_empty(P, K)
        g = dy.new_empty(P, R)
        # dX = dy·W_e + s·(dy·B_e)·A_e: the forward kernel on stride views (N and K swap).
        _fused_term(dy, weight, lora_b, lora_a, dx_pair, g, tiles, sorted_pairs, sorted_pairs,
                    K, N, R, (weight.stride(0), weight.stride(2), weight.stride(1)),
                    (0, lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
                    (0, lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), scaling, bm)
        if need_x:
            dx = dx_pair if group == 1 else dx_pair.view(-1, group, K).sum(1)
        if need_a:
            da = torch.empty_like(lora_a)
        if need_a and R > 0:
            _rank_grad(x, g, da, sorted_pairs // group, offsets, K, R,
                       (da.stride(0), da.stride(2), da.stride(1)), scaling)
    if need_b:
        db = torch.empty_like(lora_b)
    if need_b and R > 0:
        _rank_grad(dy, u, db, sorted_pairs, offsets, N, R,
                   (db.stride(0), db.stride(1), db.stride(2)), scaling)
    return dx, da, db
