"""The @triton.jit entry points of the GEMM core: schedule ∘ mainloop ∘ epilogue.

* :func:`gemm_kernel` — ``out = col_scale·(a·wᵀ + low-rank) + bias`` on dense rows: the
  single-adapter forward (``a = x, w = W``), dX (``a = dY, w = Wᵀ`` view) and dW
  (``a = dYᵀ, w = xᵀ`` views), under every schedule of :mod:`schedule`;
* :func:`multi_gemm_kernel` — the multi-adapter forward on gathered (sorted) rows with the
  per-slot low-rank epilogue;
* :func:`moe_gemm_kernel` — the MoE-LoRA forward / dX over expert segments of gathered rows,
  per-expert weight and per-expert LoRA, in-loop or seeded (launcher: triton/moe_lora.py).

All run the one K loop of :mod:`mainloop`; the variant is the spec's constexprs
(:mod:`spec`, :mod:`modes`). Persistent programs build their tensor descriptors once and walk
their tiles in a ``tl.range`` that Triton may flatten into the K loop and warp-specialise
(``WARP_SPEC``: producer warps issue the TMA loads of the next tile while consumer warps run
this tile's epilogue). In sm_90a compiles with Triton 3.8 this takes effect for the plain and
in-loop bodies; the seeded body (a nested rank loop before the K loop) compiles to the same
code as without it.

Bytes and FLOPs of the persistent forward at M = 8192, K = N = 4096, r = 16, bf16, seeded
mode (xa precomputed by the shrink): minimum = x + W + y = 64 + 32 + 64 MiB and
2·M·N·K = 275 GFLOP; this kernel reads each x row panel once per N tile and W once per
GROUP_M row tiles (both mostly from L2), reads xa [M, r] (0.25 MiB) and writes y once: HBM
traffic ≈ the minimum + 0.25 MiB, MMA work = minimum + 2·M·N·r (+0.4%). The shrink that
makes xa reads x once more (+64 MiB), which the in-loop mode avoids at +r/BLOCK_N MMA work.

Panel mode (``LORA_PANEL``, gemm/panel.py; 128x128x64 tiles, NT = 32 tiles per row panel,
2048 tiles over P = 132 programs, D = P + GROUP_M·(NT − 1) = 380 tiles): HBM traffic = the
minimum + xa written once (0.25 MiB) + the fp32 scratch (shares M·NT·BLOCK_R·4 = 16 MiB
written and read once, mostly in L2; final u 0.5 MiB written, read by every tile of its panel
from L2): x crosses HBM once (the producers read each panel's slices one wave before its own
tiles stream it from L2). MMA work = minimum + 2·M·N·r (the expand, +0.4%) + 2·M·K·r once in
the shares (+0.4%) + the fallback tiles' in-loop u, 2·BLOCK_M·K·r each (r/BLOCK_N = 12.5% of
a tile): the D first tiles (panels without producers, 19% at this shape) and any tile whose
panel's producers lag, ≈ +2.3% in all. PREDICTION, not measured: the hit rate is counted in
the scratch (``cnt[0]``) for the first GPU run.
"""

import triton
import triton.language as tl

from lora_kernels.triton.gemm.epilogue import (fp8_act_scale, in_loop_term, lowrank_seed,
                                               per_slot_term, scale_bias, store_rank_rows,
                                               store_tile)
from lora_kernels.triton.gemm.mainloop import mainloop
from lora_kernels.triton.gemm.modes import (LORA_IN_LOOP, LORA_PANEL, LORA_SEEDED, ROWS_DENSE,
                                            ROWS_GATHERED, SCHED_PERSISTENT, SCHED_SPLIT_K,
                                            STORE_POINTER, STORE_TMA, WEIGHT_FP8_ACT)
from lora_kernels.triton.gemm.operands import a_rows, descriptors
from lora_kernels.triton.gemm.panel import panel_geometry, panel_ready, panel_u, produce_share
from lora_kernels.triton.gemm.schedule import (grouped_tile, k_slab, moe_segment_tile,
                                               split_k_publish, split_k_publish_rows,
                                               split_k_sum, split_k_sum_rows)


@triton.jit
def _dense_tile(tile, pid_k, a_ptr, w_ptr, out_ptr, bias_ptr, cs_ptr, u_ptr, la_ptr, lb_ptr,
                ws_ptr, wsu_ptr, cnt_ptr, a_desc, w_desc, o_desc,
                M, N, K, R, stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                stride_um, stride_ur, stride_lar, stride_lak, stride_lbn, stride_lbr, stride_b,
                stride_cs, scaling, seed, drop_threshold, drop_scale,
                HAS_BIAS: tl.constexpr, LORA: tl.constexpr, DROPOUT: tl.constexpr,
                COL_SCALE: tl.constexpr, SCHEDULE: tl.constexpr, STORE: tl.constexpr,
                W_KMAJOR: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, wq,
                WEIGHT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                QROUND: tl.constexpr, panel, PANEL_DB: tl.constexpr, keep_bits,
                KEEP_BITS: tl.constexpr):
    """One output tile (one K slab of it under split-K) of :func:`gemm_kernel`. ``panel``:
    ``(num_tiles, slice_len, n_slices, D, epoch, db, xa, xa strides)`` of the panel mode
    (gemm/panel.py); ``PANEL_DB``: its shares also make dB partials (the dX form);
    ``keep_bits``/``KEEP_BITS``: the dX dropout mask read from the forward's packed bits."""
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm64, a_off, m_ok = a_rows(a_ptr, a_ptr, row0, M, stride_am, ROWS_DENSE, BLOCK_M)
    rn64 = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn64 < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    k_lo, k_hi = k_slab(pid_k, K, SPLIT_K, BLOCK_K)
    rk64 = (k_lo + tl.arange(0, BLOCK_K)).to(tl.int64)
    a_ptrs = a_ptr + a_off[:, None] + rk64[None, :] * stride_ak
    w_ptrs = w_ptr + rn64[None, :] * stride_wn + rk64[:, None] * stride_wk
    la_ptrs = la_ptr + rr[None, :].to(tl.int64) * stride_lar + rk64[:, None] * stride_lak

    # The split-K schedule with a one-slab config is the tile schedule.
    SPLIT: tl.constexpr = (SCHEDULE == SCHED_SPLIT_K) and (SPLIT_K > 1)
    # fp8 x fp8: the row/column scales multiply the whole K sum, the seed comes after them
    FP8_ACT: tl.constexpr = WEIGHT == WEIGHT_FP8_ACT
    if LORA == LORA_SEEDED and not SPLIT and not FP8_ACT:
        acc = lowrank_seed(u_ptr, lb_ptr, row0, col0, rm64, rn64, m_ok, n_ok, N, R, stride_um,
                           stride_ur, stride_lbn, stride_lbr, scaling, seed, drop_threshold,
                           drop_scale, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION,
                           keep_bits, KEEP_BITS)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if LORA == LORA_PANEL:
        num_tiles, slice_len, n_slices, d, epoch, db_ptr, xa_ptr, stride_xam, stride_xar = panel
        # This tile's share for a panel D tiles ahead, then its own panel: published (plain
        # K loop) or not yet (the sliced in-loop K loop; same bits, gemm/panel.py).
        produce_share(tile, pid_m, pid_n, d, num_tiles, a_ptr, a_desc, la_ptr, u_ptr, ws_ptr,
                      wsu_ptr, cnt_ptr, db_ptr, xa_ptr, M, N, K, R, stride_am, stride_ak,
                      stride_lar, stride_lak, stride_um, stride_ur, stride_xam, stride_xar,
                      slice_len, n_slices, epoch, STORE, PRECISION, PANEL_DB, GROUP_M, BLOCK_M,
                      BLOCK_N, BLOCK_K, BLOCK_R)
        if panel_ready(cnt_ptr, pid_m, epoch):
            acc, u_acc = mainloop(acc, u_acc, a_ptrs, w_ptrs, la_ptrs, a_desc, w_desc, row0,
                                  col0, k_lo, k_hi, m_ok, n_ok, r_ok, stride_ak, stride_wk,
                                  stride_lak, STORE, False, True, True, EVEN_K, W_KMAJOR,
                                  PRECISION, BLOCK_K, wq, WEIGHT, QBLOCK, QBLOCK2, QROUND,
                                  BLOCK_N)
            u_acc = panel_u(wsu_ptr, cnt_ptr, pid_m, BLOCK_M, BLOCK_R)
        else:
            acc, u_acc = mainloop(acc, u_acc, a_ptrs, w_ptrs, la_ptrs, a_desc, w_desc, row0,
                                  col0, k_lo, k_hi, m_ok, n_ok, r_ok, stride_ak, stride_wk,
                                  stride_lak, STORE, True, True, True, EVEN_K, W_KMAJOR,
                                  PRECISION, BLOCK_K, wq, WEIGHT, QBLOCK, QBLOCK2, QROUND,
                                  BLOCK_N, slice_len, True)
            if pid_n == 0:  # xa for the backward (a producer that finishes later rewrites
                #             the same bits)
                store_rank_rows(u_ptr, u_acc, rm64, m_ok, r_ok, stride_um, stride_ur, BLOCK_R)
    else:
        acc, u_acc = mainloop(acc, u_acc, a_ptrs, w_ptrs, la_ptrs, a_desc, w_desc, row0, col0,
                              k_lo, k_hi, m_ok, n_ok, r_ok, stride_ak, stride_wk, stride_lak,
                              STORE, LORA == LORA_IN_LOOP, True, True, EVEN_K, W_KMAJOR,
                              PRECISION, BLOCK_K, wq, WEIGHT, QBLOCK, QBLOCK2, QROUND, BLOCK_N)
    if LORA == LORA_IN_LOOP or LORA == LORA_PANEL:
        acc = in_loop_term(acc, u_acc, lb_ptr, rn64, n_ok, r_ok, stride_lbn, stride_lbr,
                           scaling, BLOCK_R, PRECISION, DROPOUT, seed, drop_threshold,
                           drop_scale, row0, col0, rm64, m_ok, N, BLOCK_M, BLOCK_N, keep_bits,
                           KEEP_BITS)
    if FP8_ACT:  # wq: (col scale of w [N], row scale of a [M], ...), spec.py: never split-K
        acc = fp8_act_scale(acc, wq[1], wq[0], u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R,
                            stride_um, stride_ur, stride_lbn, stride_lbr, scaling,
                            LORA == LORA_SEEDED, BLOCK_R, PRECISION)

    o_rows = rm64 * stride_om
    if SPLIT:
        if LORA == LORA_IN_LOOP:
            if pid_n == 0:
                split_k_publish_rows(wsu_ptr, u_acc, pid_k, rm64, m_ok, M, BLOCK_R)
        last = split_k_publish(acc, ws_ptr, cnt_ptr, tile, pid_k, rm64, rn64, m_ok, n_ok, M,
                               N, SPLIT_K)
        if last:
            if LORA == LORA_SEEDED:
                acc = lowrank_seed(u_ptr, lb_ptr, row0, col0, rm64, rn64, m_ok, n_ok, N, R,
                                   stride_um, stride_ur, stride_lbn, stride_lbr, scaling, seed,
                                   drop_threshold, drop_scale, DROPOUT, BLOCK_M, BLOCK_N,
                                   BLOCK_R, PRECISION, keep_bits, KEEP_BITS)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = split_k_sum(acc, ws_ptr, rm64, rn64, m_ok, n_ok, M, N, SPLIT_K)
            if LORA == LORA_IN_LOOP:
                if pid_n == 0:
                    u_sum = split_k_sum_rows(wsu_ptr, u_acc, rm64, m_ok, M, BLOCK_R, SPLIT_K)
                    store_rank_rows(u_ptr, u_sum, rm64, m_ok, r_ok, stride_um, stride_ur,
                                    BLOCK_R)
            acc = scale_bias(acc, cs_ptr, bias_ptr, rn64, n_ok, stride_cs, stride_b, COL_SCALE,
                             HAS_BIAS)
            store_tile(acc, out_ptr, o_desc, row0, col0, o_rows, rn64, m_ok, n_ok, stride_on,
                       STORE_POINTER)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # the ticket is back at zero for the next launch
    else:
        if LORA == LORA_IN_LOOP:
            if pid_n == 0:
                store_rank_rows(u_ptr, u_acc, rm64, m_ok, r_ok, stride_um, stride_ur, BLOCK_R)
        acc = scale_bias(acc, cs_ptr, bias_ptr, rn64, n_ok, stride_cs, stride_b, COL_SCALE,
                         HAS_BIAS)
        store_tile(acc, out_ptr, o_desc, row0, col0, o_rows, rn64, m_ok, n_ok, stride_on, STORE)


@triton.jit(do_not_specialize=["seed", "drop_threshold", "panel_epoch", "panel_ahead"])
def gemm_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, cs_ptr, u_ptr, la_ptr, lb_ptr, ws_ptr, wsu_ptr, cnt_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    stride_um, stride_ur, stride_lar, stride_lak, stride_lbn, stride_lbr, stride_b, stride_cs,
    scaling, seed, drop_threshold, drop_scale,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, DROPOUT: tl.constexpr, COL_SCALE: tl.constexpr,
    SCHEDULE: tl.constexpr, STORE: tl.constexpr, W_KMAJOR: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, WARP_SPEC: tl.constexpr,
    wq_absmax=None, wq_absmax2=None, wq_lut=None, wq_offset=0.0,
    WEIGHT: tl.constexpr = 0, QBLOCK: tl.constexpr = 64, QBLOCK2: tl.constexpr = 256,
    QROUND: tl.constexpr = 0, panel_epoch=0, panel_ahead=0, db_ptr=None, xa_ptr=None,
    stride_xam=0, stride_xar=0, PANEL_DB: tl.constexpr = False,
    keep_bits=None, KEEP_BITS: tl.constexpr = False,
):
    """``out = col_scale·(a·wᵀ + low-rank) + bias`` (fused_gemm.py documents the operands).
    ``M_BUCKET`` only keys the autotuner; ``wq_*``/``WEIGHT``/``Q*``: a quantized w
    (formats.py; ``w_ptr`` is then its packed storage, stride_wn/wk its logical strides).
    ``panel_epoch``/``panel_ahead``: the panel mode's launch number and forced D (0 = auto);
    ``PANEL_DB``: the dX form also writes dB partials ``aᵀ·xa`` per panel to ``db_ptr``."""
    wq = (wq_absmax, wq_absmax2, wq_lut, wq_offset, stride_wn, stride_wk)
    if STORE == STORE_TMA:
        a_desc, w_desc, o_desc = descriptors(a_ptr, w_ptr, out_ptr, M, N, K, stride_am,
                                             stride_wn, stride_wk, stride_om, W_KMAJOR,
                                             BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        a_desc, w_desc, o_desc = a_ptr, w_ptr, out_ptr  # unused placeholders
    if SCHEDULE == SCHED_PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        slice_len, n_slices, d = panel_geometry(M, N, K, tl.num_programs(0), panel_ahead,
                                                GROUP_M, BLOCK_M, BLOCK_N, BLOCK_K)
        panel = (num_tiles, slice_len, n_slices, d, panel_epoch, db_ptr, xa_ptr, stride_xam,
                 stride_xar)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0),
                             warp_specialize=WARP_SPEC, flatten=WARP_SPEC):
            _dense_tile(tile, 0, a_ptr, w_ptr, out_ptr, bias_ptr, cs_ptr, u_ptr, la_ptr, lb_ptr,
                        ws_ptr, wsu_ptr, cnt_ptr, a_desc, w_desc, o_desc, M, N, K, R,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                        stride_um, stride_ur, stride_lar, stride_lak, stride_lbn, stride_lbr,
                        stride_b, stride_cs, scaling, seed, drop_threshold, drop_scale,
                        HAS_BIAS, LORA, DROPOUT, COL_SCALE, SCHEDULE, STORE, W_KMAJOR, BLOCK_R,
                        PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 1, wq, WEIGHT,
                        QBLOCK, QBLOCK2, QROUND, panel, PANEL_DB, keep_bits, KEEP_BITS)
    else:
        _dense_tile(tl.program_id(0), tl.program_id(1), a_ptr, w_ptr, out_ptr, bias_ptr,
                    cs_ptr, u_ptr, la_ptr, lb_ptr, ws_ptr, wsu_ptr, cnt_ptr, a_desc, w_desc,
                    o_desc, M, N, K, R, stride_am, stride_ak, stride_wn, stride_wk, stride_om,
                    stride_on, stride_um, stride_ur, stride_lar, stride_lak, stride_lbn,
                    stride_lbr, stride_b, stride_cs, scaling, seed, drop_threshold, drop_scale,
                    HAS_BIAS, LORA, DROPOUT, COL_SCALE, SCHEDULE, STORE, W_KMAJOR, BLOCK_R,
                    PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, wq, WEIGHT,
                    QBLOCK, QBLOCK2, QROUND, (0, 0, 0, 0, 0, 0, 0, 0, 0), False, keep_bits,
                    KEEP_BITS)


@triton.jit
def multi_gemm_kernel(
        X, W, BIAS, Y, XA, B, RANKS, BOUNDS, adapter_ids, sorted_ids,
        T, N, K, R, S, n_slices, t_bucket,
        stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_xat, stride_bs,
        stride_bn, stride_rs, stride_rj, stride_b,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, PREC: tl.constexpr,
        LORA_PREC: tl.constexpr,
        wq_absmax=None, wq_absmax2=None, wq_lut=None, wq_offset=0.0,
        WEIGHT: tl.constexpr = 0, QBLOCK: tl.constexpr = 64, QBLOCK2: tl.constexpr = 256,
        QROUND: tl.constexpr = 0):
    """``y[t] = x[t]·Wᵀ + xa[t]·B_{slot(t)}ᵀ + b`` over sorted token positions (multi_fused.py
    explains the layout). ``t_bucket`` only keys the autotuner. ``wq_*``/``WEIGHT``/``Q*``: a
    quantized W, as in :func:`gemm_kernel` (``W`` is then its packed storage)."""
    wq = (wq_absmax, wq_absmax2, wq_lut, wq_offset, stride_wn, stride_wk)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    tok, x_off, row_ok = a_rows(X, sorted_ids, row0, T, stride_xt, ROWS_GATHERED, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rk64 = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = X + x_off[:, None] + rk64[None, :] * stride_xk
    # Columns past N wrap: the main loop needs no column mask.
    w_ptrs = W + (cols % N)[None, :].to(tl.int64) * stride_wn + rk64[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # W_KMAJOR=True: with pointer loads it only tells an FP8 W's decode that its row scale
    # runs along the tile's N axis (this kernel reads the forward's W; launch_fused checks).
    acc, _ = mainloop(acc, acc, x_ptrs, w_ptrs, x_ptrs, X, W, row0, col0, 0, K, row_ok, col_ok,
                      col_ok, stride_xk, stride_wk, 0, STORE_POINTER, False, False, False,
                      EVEN_K, True, PREC, BLOCK_K, wq, WEIGHT, QBLOCK, QBLOCK2, QROUND, BLOCK_N)
    slots = tl.load(adapter_ids + tok, mask=row_ok, other=-1)
    acc = per_slot_term(acc, XA, B, RANKS, BOUNDS, slots, tok, cols, col0, S, R, n_slices,
                        stride_xat, stride_bs, stride_bn, stride_rs, stride_rj, HAS_RANKS,
                        BLOCK_N, BLOCK_R, LORA_PREC)
    cols64 = cols.to(tl.int64)
    acc = scale_bias(acc, BIAS, BIAS, cols64, col_ok, 0, stride_b, 0, HAS_BIAS)
    store_tile(acc, Y, Y, row0, col0, tok * stride_yt, cols64, row_ok, col_ok, 1,
               STORE_POINTER)


@triton.jit
def moe_gemm_kernel(
        A, W, LA, LB, OUT, U, TILES, SRC, DST, SCALES, M_TILES, N, K, R,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk,
        stride_las, stride_lae, stride_lar, stride_lak,
        stride_lbs, stride_lbe, stride_lbn, stride_lbr,
        stride_om, stride_on, stride_um, stride_ur, scaling,
        LORA: tl.constexpr, STORE_U: tl.constexpr, SLOT_SCALES: tl.constexpr,
        BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped MoE-LoRA GEMM (schedule ``SCHED_MOE_SEGMENTS``): for the sorted pair positions
    of one segment tile (expert e, adapter slot j), ``out[DST[pos]] = a[SRC[pos]]·W_eᵀ +
    s_j·u·LB_{j,e}ᵀ`` with the in-loop ``u = a[SRC[pos]]·LA_{j,e}ᵀ`` (written to ``U[pos]``
    when STORE_U); slot -1 is the base experts only (rank 0). The forward runs it on (x, W_e,
    A_e, B_e), dX on (dy, W_eᵀ view, B_eᵀ view, A_eᵀ view): the same K loop as every other
    GEMM of the package, the expert weight is never combined with B_e·A_e.

    ``LORA``: ``LORA_IN_LOOP`` (u from the K loop; recomputed by every N tile, +r/BLOCK_N MMA
    work), ``LORA_SEEDED`` (``U`` holds u already, sorted order: the accumulator starts at
    ``s·u·LB_eᵀ``; wins when there are many N tiles) or ``LORA_NONE`` (plain grouped GEMM:
    with ``W = LA`` and N = r it *is* the shrink that makes the seeded mode's u)."""
    # Grouped raster over the table's M tiles (consecutive tiles are mostly one expert):
    # GROUP_M row tiles sweep the N tiles together, so their gathered rows stay in L2 while
    # W_e's panels are read about once per expert.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M_TILES, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, slot, row0, row_end = moe_segment_tile(TILES, pid_m)
    if e >= 0:
        s = scaling
        if SLOT_SCALES:
            s = scaling * tl.load(SCALES + tl.maximum(slot, 0))
        col0 = pid_n * BLOCK_N
        pos = row0 + tl.arange(0, BLOCK_M)
        row_ok = pos < row_end
        src = tl.load(SRC + pos, mask=row_ok, other=0).to(tl.int64)
        rn64 = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = rn64 < N
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < tl.where(slot >= 0, R, 0)
        rk64 = tl.arange(0, BLOCK_K).to(tl.int64)
        e64 = e.to(tl.int64)
        j64 = tl.maximum(slot, 0).to(tl.int64)
        a_ptrs = A + src[:, None] * stride_am + rk64[None, :] * stride_ak
        w_ptrs = W + e64 * stride_we + rn64[None, :] * stride_wn + rk64[:, None] * stride_wk
        la_ptrs = (LA + j64 * stride_las + e64 * stride_lae
                   + rr[None, :].to(tl.int64) * stride_lar + rk64[:, None] * stride_lak)
        lb = LB + j64 * stride_lbs + e64 * stride_lbe
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LORA == LORA_SEEDED:
            u = tl.load(U + pos[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            acc = in_loop_term(acc, u.to(tl.float32), lb, rn64, n_ok, r_ok, stride_lbn,
                               stride_lbr, s, BLOCK_R, PRECISION)
        u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc, u_acc = mainloop(acc, u_acc, a_ptrs, w_ptrs, la_ptrs, A, W, row0, col0, 0, K,
                              row_ok, n_ok, r_ok, stride_ak, stride_wk, stride_lak,
                              STORE_POINTER, LORA == LORA_IN_LOOP, True, True, EVEN_K, True,
                              PRECISION, BLOCK_K)
        if LORA == LORA_IN_LOOP:
            acc = in_loop_term(acc, u_acc, lb, rn64, n_ok, r_ok, stride_lbn, stride_lbr, s,
                               BLOCK_R, PRECISION)
        if STORE_U and LORA == LORA_IN_LOOP:
            if pid_n == 0:
                store_rank_rows(U, u_acc, pos.to(tl.int64), row_ok, r_ok, stride_um,
                                stride_ur, BLOCK_R)
        dst = tl.load(DST + pos, mask=row_ok, other=0).to(tl.int64)
        store_tile(acc, OUT, OUT, row0, col0, dst * stride_om, rn64, row_ok, n_ok, stride_on,
                   STORE_POINTER)
