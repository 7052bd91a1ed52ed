"""Tile schedules of the GEMM core: which output tile (and K slab) a program works on.

* tiles      one program per output tile, in grouped order (:func:`grouped_tile`);
* split-K    + ``program_id(1)`` picks a K slab (:func:`k_slab`); the slabs meet in an fp32
             workspace and the last program to take the tile's ticket finishes it
             (:func:`split_k_publish`, :func:`split_k_sum`);
* persistent grid = resident programs; each walks tiles ``pid, pid + P, ...`` in the same
             grouped order (the loop itself is in kernel.py, so the warp-specialised
             ``tl.range`` sees the whole tile body).
"""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` for tile ``pid`` in grouped order: GROUP_M row tiles sweep the
    column tiles together, so each weight panel is reused from L2 by GROUP_M programs instead
    of being refetched from HBM (the classic swizzle of Triton's matmul tutorial)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


@triton.jit
def k_slab(pid_k, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)`` of K slab ``pid_k``; slabs are whole BLOCK_Ks, so only the last one
    is ragged (and a slab past K is empty)."""
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    return k_lo, k_hi


@triton.jit
def split_k_publish(acc, ws_ptr, cnt_ptr, tile, pid_k, rm64, rn64, m_ok, n_ok, M, N,
                    SPLIT_K: tl.constexpr):
    """Publish this slab's fp32 partial and take the tile's ticket; True in the one program
    that took the final ticket (it then finishes the tile with :func:`split_k_sum`).

    Workspace ``[SPLIT_K, M, N]`` fp32 with int64 offsets. Every thread's partial is stored
    before the ticket is taken (the barrier), and the ticket is acq_rel at GPU scope, so the
    last program sees all slabs."""
    slab = tl.cast(M, tl.int64) * N  # tl.cast: M == 1 arrives as a constexpr
    tl.store(ws_ptr + pid_k * slab + rm64[:, None] * N + rn64[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return ticket == SPLIT_K - 1


@triton.jit
def split_k_sum(acc, ws_ptr, rm64, rn64, m_ok, n_ok, M, N, SPLIT_K: tl.constexpr):
    """``acc`` plus every slab's partial, in slab order (deterministic; no atomics on data).
    ``.cg`` loads bypass L1: other SMs wrote the slabs."""
    slab = tl.cast(M, tl.int64) * N
    ws_tile = rm64[:, None] * N + rn64[None, :]
    mn_ok = m_ok[:, None] & n_ok[None, :]
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * slab + ws_tile, mask=mn_ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def split_k_publish_rows(wsu_ptr, u_acc, pid_k, rm64, m_ok, M, BLOCK_R: tl.constexpr):
    """The ``[SPLIT_K, M, BLOCK_R]`` twin of the workspace for the in-loop u (xa): this
    slab's share, stored before the ticket is taken."""
    rr = tl.arange(0, BLOCK_R)
    tl.store(wsu_ptr + pid_k * M * BLOCK_R + rm64[:, None] * BLOCK_R + rr[None, :], u_acc,
             mask=m_ok[:, None])


@triton.jit
def split_k_sum_rows(wsu_ptr, u_acc, rm64, m_ok, M, BLOCK_R: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """The slab-ordered sum of the u shares (in the program that took the last ticket)."""
    rr = tl.arange(0, BLOCK_R)
    wsu_tile = rm64[:, None] * BLOCK_R + rr[None, :]
    u_sum = tl.zeros_like(u_acc)
    for s in range(0, SPLIT_K):
        u_sum += tl.load(wsu_ptr + s * M * BLOCK_R + wsu_tile, mask=m_ok[:, None], other=0.0,
                         cache_modifier=".cg")
    return u_sum


@triton.jit
def moe_segment_tile(tiles_ptr, pid):
    """``(expert, slot, row0, row_end)`` of M tile ``pid`` of the grouped MoE schedule: tiles
    walk the segments of the expert-sorted pair list, ``cdiv(n_seg, BLOCK_M)`` tiles per
    segment (none for an empty one), so a tile never mixes experts (or adapter slots: the
    multi-adapter variant sorts by (expert, slot)) and the cost follows the real tokens per
    expert. The table ``[tiles, 4]`` int32 is built on the device (triton/moe_lora.py);
    unused tiles of the upper-bound grid hold expert -1; slot -1 means no LoRA."""
    e = tl.load(tiles_ptr + pid * 4)
    slot = tl.load(tiles_ptr + pid * 4 + 1)
    row0 = tl.load(tiles_ptr + pid * 4 + 2)
    row_end = tl.load(tiles_ptr + pid * 4 + 3)
    return e, slot, row0, row_end
