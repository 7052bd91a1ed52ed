"""The panel-shared low-rank term (``LORA_PANEL``) of the persistent schedule: ``u = x·Aᵀ``
for a row panel made as K-slice shares one wave ahead, with no spin-wait anywhere.

A row panel ``pm`` (BLOCK_M rows of x) has NT = cdiv(N, BLOCK_N) output tiles and its u is cut
into ``n_slices = cdiv(K, slice_len)`` K slices (``slice_len`` = cdiv(K, NT) rounded up to
BLOCK_K, so n_slices ≤ NT). Persistent program ``p`` walks tiles ``t = p, p + P, ...``
(grouped order); tile ``t`` also makes slice ``pid_n(t + D)`` of the panel of tile ``t + D``
(:func:`produce_share`), so every slice of a panel is made by exactly one tile, ``D`` tiles
earlier. ``D = P + GROUP_M·(NT − 1)`` (:func:`panel_ahead`): every share of a panel is then
made at least one iteration of the tile loop before the panel's first tile starts, and its
x rows (read once from HBM by the producers) are in L2 when the panel's own tiles stream them.

* shares ``ws [npm, NT, BLOCK_M, BLOCK_R]`` fp32; each producer stores its share, then takes the
  panel's ticket (acq_rel, GPU scope). The producer with the last ticket sums the shares in
  slice order into ``final [npm, BLOCK_M, BLOCK_R]`` fp32, writes xa (x's dtype) for the
  backward, puts the ticket back to 0 and releases the panel's flag = ``epoch`` (a number the
  launcher makes new for every launch, so flags never need clearing).
* a tile reads the flag (acquire) **before** its K loop (:func:`panel_ready`). Set: the plain
  K loop, then u = final. Not set (the first wave, a producer that lags, or every tile under
  ``TRITON_INTERPRET``, where programs run one after another): the sliced in-loop K loop
  (mainloop ``SLICED``) computes u from the same x tiles, slice by slice from zero, summed in
  slice order: the same fp32 operations as the shares, so both give the same bits and the
  result does not depend on timing. No program ever waits for another.
* a panel only gets producers when all its tiles have one (its first tile ``t0 ≥ D``), so
  every ticket that is taken reaches n_slices and goes back to 0 within the launch.

Scratch ``cnt`` int32: ``[0]`` counts tiles that found their panel ready (a diagnostic: the
hit rate on a GPU, the path check in the tests), then per panel ``2 + 2·pm`` the ticket and
``3 + 2·pm`` the flag (interleaved, so a launch with another BLOCK_M never reads a ticket
slot as a flag).
"""

import triton
import triton.language as tl

from lora_kernels.triton.gemm.modes import STORE_TMA
from lora_kernels.triton.gemm.schedule import grouped_tile


@triton.jit
def panel_geometry(M, N, K, num_programs, ahead, GROUP_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(slice_len, n_slices, D)``: the K slice of one share, how many slices a panel has,
    and the tile distance between a producer and its consumer (``ahead`` > 0 forces D)."""
    num_n = tl.cdiv(N, BLOCK_N)
    slice_len = tl.cdiv(tl.cdiv(K, num_n), BLOCK_K) * BLOCK_K
    n_slices = tl.cdiv(K, slice_len)
    d = num_programs + GROUP_M * (num_n - 1)
    if ahead > 0:
        d = ahead
    return slice_len, n_slices, d


@triton.jit
def _first_tile(pm, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped-order index of panel ``pm``'s first tile (its column 0): the inverse of
    schedule.grouped_tile at pid_n = 0."""
    first_m = (pm // GROUP_M) * GROUP_M
    return first_m * num_n + (pm - first_m)


@triton.jit
def _slice_pass(pm, j, a_ptr, a_desc, la_ptr, db_ptr, xa_ptr, M, K, R, stride_am, stride_ak,
                stride_lar, stride_lak, stride_xam, stride_xar, slice_len,
                STORE: tl.constexpr, PRECISION: tl.constexpr, DO_U: tl.constexpr,
                DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """One pass over K slice ``j`` of panel ``pm``'s rows of a: the u share ``a·laᵀ`` (DO_U,
    returned) and/or (DB, the dX form: a = dY) the dB partial ``aᵀ·xa`` of those rows,
    stored as rows ``k`` of the panel's ``[K, BLOCK_R]`` fp32 slab of ``db_ptr``."""
    row0 = pm * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rk = tl.arange(0, BLOCK_K)
    k_lo = j * slice_len
    k_hi = tl.minimum(K, k_lo + slice_len)
    a_ptrs = (a_ptr + rows.to(tl.int64)[:, None] * stride_am
              + (k_lo + rk).to(tl.int64)[None, :] * stride_ak)
    la_ptrs = (la_ptr + rr[None, :].to(tl.int64) * stride_lar
               + (k_lo + rk).to(tl.int64)[:, None] * stride_lak)
    share = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DB:
        xa = tl.load(xa_ptr + rows.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        db_rows = db_ptr + pm.to(tl.int64) * K * BLOCK_R + rr[None, :]
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k + rk) < k_hi
        if STORE == STORE_TMA:
            a = a_desc.load([row0, k])  # zero past K: the slice end is a K multiple
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DO_U:
            la = tl.load(la_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            share = tl.dot(a, la, share, input_precision=PRECISION)
        if DB:
            part = tl.dot(tl.trans(a), xa.to(a.dtype), input_precision=PRECISION)
            tl.store(db_rows + (k + rk).to(tl.int64)[:, None] * BLOCK_R, part,
                     mask=k_ok[:, None])
        a_ptrs += BLOCK_K * stride_ak
        la_ptrs += BLOCK_K * stride_lak
    return share


@triton.jit
def produce_share(tile, pid_m, pid_n, d, num_tiles, a_ptr, a_desc, la_ptr, u_ptr, ws_ptr,
                  final_ptr, cnt_ptr, db_ptr, xa_ptr, M, N, K, R, stride_am, stride_ak,
                  stride_lar, stride_lak, stride_um, stride_ur, stride_xam, stride_xar,
                  slice_len, n_slices, epoch, STORE: tl.constexpr, PRECISION: tl.constexpr,
                  DB: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile ``tile``'s share: slice ``pid_n(tile + d)`` of ``x·Aᵀ`` for the panel of tile
    ``tile + d`` (nothing when that tile does not exist or its panel has no full set of
    producers). The last producer of a panel finishes it (module doc). With ``DB`` the same
    pass also makes that slice's dB partial; a tile whose own panel has no producers makes
    its own slice's dB partial instead, so every (panel, slice) partial is made once."""
    target = tile + d
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if DB:
        if (_first_tile(pid_m, num_m, num_n, GROUP_M) < d) & (pid_n < n_slices):
            _slice_pass(pid_m, pid_n, a_ptr, a_desc, la_ptr, db_ptr, xa_ptr, M, K, R, stride_am,
                        stride_ak, stride_lar, stride_lak, stride_xam, stride_xar, slice_len,
                        STORE, PRECISION, False, True, BLOCK_M, BLOCK_K, BLOCK_R)
    if target < num_tiles:
        pm, j = grouped_tile(target, num_m, num_n, GROUP_M)
        if (_first_tile(pm, num_m, num_n, GROUP_M) >= d) & (j < n_slices):
            share = _slice_pass(pm, j, a_ptr, a_desc, la_ptr, db_ptr, xa_ptr, M, K, R,
                                stride_am, stride_ak, stride_lar, stride_lak, stride_xam,
                                stride_xar, slice_len, STORE, PRECISION, True, DB, BLOCK_M,
                                BLOCK_K, BLOCK_R)
            rr = tl.arange(0, BLOCK_R)
            rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rows < M
            tile_rb = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R
            ws_panel = ws_ptr + (pm * num_n).to(tl.int64) * (BLOCK_M * BLOCK_R)
            tl.store(ws_panel + j * (BLOCK_M * BLOCK_R) + tile_rb + rr[None, :], share)
            tl.debug_barrier()  # every thread's share is stored before the ticket is taken
            ticket = tl.atomic_add(cnt_ptr + 2 + 2 * pm, 1, sem="acq_rel", scope="gpu")
            if ticket == n_slices - 1:
                u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for s in range(0, n_slices):  # slice order: the SLICED K loop's order
                    u = u + tl.load(ws_panel + s * (BLOCK_M * BLOCK_R) + tile_rb + rr[None, :],
                                    cache_modifier=".cg")
                tl.store(final_ptr + pm.to(tl.int64) * (BLOCK_M * BLOCK_R) + tile_rb
                         + rr[None, :], u)
                tl.store(u_ptr + rows.to(tl.int64)[:, None] * stride_um + rr[None, :] * stride_ur,
                         u.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & (rr < R)[None, :])
                tl.debug_barrier()  # final u stored before the flag is released
                tl.atomic_xchg(cnt_ptr + 2 + 2 * pm, 0)  # every producer has taken its ticket
                tl.atomic_xchg(cnt_ptr + 3 + 2 * pm, epoch, sem="release", scope="gpu")


@triton.jit
def panel_ready(cnt_ptr, pid_m, epoch):
    """True when panel ``pid_m``'s final u of this launch is published (acquire)."""
    return tl.atomic_add(cnt_ptr + 3 + 2 * pid_m, 0, sem="acquire", scope="gpu") == epoch


@triton.jit
def panel_u(final_ptr, cnt_ptr, pid_m, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The published fp32 u of panel ``pid_m`` (``.cg``: another SM wrote it); counts a hit."""
    rb = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    u = tl.load(final_ptr + pid_m.to(tl.int64) * (BLOCK_M * BLOCK_R) + rb, cache_modifier=".cg")
    tl.atomic_add(cnt_ptr, 1, sem="relaxed", scope="gpu")
    return u
