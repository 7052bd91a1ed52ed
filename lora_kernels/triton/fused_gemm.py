"""Launcher of the GEMM core for dense rows: ``fused_gemm`` picks a spec, builds the
arguments, descriptors' allocator, grid and scratch, and launches ``gemm.kernel.gemm_kernel``.

``out[M, N] = col_scale[n]·(a[M, K]·w[N, K]ᵀ + low-rank) + bias[n]``, every operand a strided
view, so the same kernel runs

* the forward      a = x,  w = W         low-rank = s·(drop(x)·Aᵀ)·Bᵀ
* the dX backward  a = dY, w = Wᵀ view   low-rank = mask ∘ (s·(dY·B)·A) / (1 − p)
* the dW backward  a = dYᵀ view, w = xᵀ view, no low-rank term.

The low-rank term (``lora``, names in ``gemm.modes.LoraMode``):

* ``SEEDED`` (1): ``u [M, r]`` is precomputed (the shrink kernel in lowrank.py) and ``s·u·lbᵀ``
  seeds the fp32 accumulator before the main loop (LoRAFusion's design); ``out`` is stored once.
  Costs one extra read of ``a`` (the shrink) but no extra MMA work in the main loop; the only
  mode that supports dropout (the mask is drawn once per element of x in the shrink, or once
  per element of dX in this epilogue).
* ``IN_LOOP`` (2): ``u`` accumulates in the main K loop from the same ``a`` tiles (r/BLOCK_N
  more MMA work, no extra read of x, one launch). Programs with ``pid_n == 0`` write ``u``
  (= xa) for the backward.
* ``PANEL`` (4, persistent schedule only; other schedules run it as ``IN_LOOP``): the same
  operands and result as ``IN_LOOP``, but each tile makes one K-slice share of ``u`` for a row
  panel one wave ahead and a tile whose panel is complete reads u instead of computing it:
  x crosses HBM once and the extra MMA work is ≈ r/(BLOCK_N·NT) (gemm/panel.py). Dropout
  only in the dX form, where the mask is on the output grid (the low-rank tile is masked on
  its own in the epilogue); a forward mask on x would have to be drawn on the x tiles of the
  fallback K loop, so the forward with dropout stays SEEDED (lora_linear.py).

Schedules: ``tiles`` (medium M), ``split_k`` (the decode path: K slabs reduced by the last
program to take the tile's ticket, deterministic, tickets reset by the kernel itself) and
``persistent`` (large M on a GPU: grid = resident CTAs, tensor-descriptor loads/stores when the
operands allow TMA, optionally warp-specialised).
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

import torch
import triton

from lora_kernels.triton import configs as C, tuned
from lora_kernels.triton.device import hw_cvt_ok
from lora_kernels.triton.dropout import drop_scale, drop_threshold, seed_arg
from lora_kernels.triton.gemm.formats import PackedWeight, prune_packed
from lora_kernels.triton.gemm.kernel import gemm_kernel
from lora_kernels.triton.gemm.modes import WEIGHT_FP8_ACT, LoraMode
from lora_kernels.triton.gemm.spec import GemmSpec
from lora_kernels.triton.lowrank import reduce_rows

__all__ = ["fused_gemm", "select_spec", "tma_compatible"]

# M is bucketed (training sees many sequence lengths); the strides tell the forward's K-major
# weight from the dX's N-major view of the same [N, K] tensor, which tune differently.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "stride_ak", "stride_wk", "LORA", "BLOCK_R", "HAS_BIAS",
                 "PRECISION", "DROPOUT", "COL_SCALE", "SCHEDULE", "STORE", "W_KMAJOR", "WEIGHT"]

_LISTS = {"small": (C.GEMM_SMALL, prune_packed(C.prune_small)),
          "medium": (C.GEMM_MEDIUM, prune_packed(C.prune_dropout)),
          "large": (C.GEMM_LARGE, prune_packed(C.prune_dropout)),
          "persistent": (C.GEMM_PERSISTENT, C.prune_persistent),
          "fp8_act": (C.GEMM_FP8_ACT, C.prune_fp8_act)}
SHAPE_CLASSES = tuple(_LISTS)  # the keys of autotuned(); bench/autotune_budget.py walks them


def _even_k(args):
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


heuristic_kernel = triton.heuristics({"EVEN_K": _even_k})(gemm_kernel)


@functools.lru_cache(maxsize=None)
def autotuned(shape_class: str, device_name: str):
    """The autotuned kernel of one config list (tuned JSON for this device, else in-code),
    built once per (shape class, device). lru_cache is thread-safe; a racing first call at
    worst builds the same autotuner twice."""
    fallback, prune = _LISTS[shape_class]
    configs = tuned.lookup("gemm", shape_class, device_name, fallback)
    # Benchmark runs of the panel mode repeat one launch (one epoch): its flags are cleared
    # before each (for other specs cnt_ptr is a ticket buffer or a dummy that is overwritten).
    reset = ["cnt_ptr"] if shape_class == "persistent" else None
    return triton.autotune(configs, key=_AUTOTUNE_KEY, reset_to_zero=reset,
                           prune_configs_by={"early_config_prune": prune})(heuristic_kernel)


# Split-K scratch: the tickets (one int32 per output tile, kept at zero between launches by the
# kernel itself) and the fp32 workspaces ([split, M, N] output slabs; [split, M, BLOCK_R] u
# slabs for IN_LOOP). One buffer of each per (device, stream), grown on demand and never
# shrunk (no allocation per decode step): launches on one stream are serialised, launches on
# different streams must not share them. The lock keeps concurrent host threads (a threaded
# AdapterPool) from racing a grow.
_TICKETS: dict = {}
_WORKSPACE: dict = {}
_WORKSPACE_U: dict = {}
_SCRATCH_LOCK = threading.Lock()


def _scratch(cache: dict, device: torch.device, n: int, dtype: torch.dtype,
             zero: bool = False, floor: int = 1024) -> torch.Tensor:
    """≥ ``n`` elements of the (device, current stream)'s buffer in ``cache``.

    Under CUDA-graph capture the buffer is allocated per call instead (from the graph's private
    pool, which the graph keeps alive): a cached buffer baked into a graph would be freed by a
    later grow while the graph still replays into it."""
    alloc = torch.zeros if zero else torch.empty
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return alloc(n, dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    with _SCRATCH_LOCK:
        buf = cache.get(key)
        if buf is None or buf.numel() < n:
            buf = cache[key] = alloc(max(n, floor), dtype=dtype, device=device)
    return buf


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    return _scratch(_TICKETS, device, n, torch.int32, zero=True)


# Panel-mode scratch (gemm/panel.py): shares [npm, NT, BM, BR] and final u [npm, BM, BR] fp32,
# tickets/flags int32 (zeroed once; tickets go back to 0 within each launch, flags hold the
# launch's epoch). Epochs are one process-wide sequence, so a flag is never mistaken for one of
# an earlier launch; at 2³¹ the flag buffers are dropped and re-zeroed. Under CUDA-graph capture
# the buffers are per call (a captured memset zeroes them on every replay).
_PANEL_WS: dict = {}
_PANEL_FINAL: dict = {}
_PANEL_CNT: dict = {}
_PANEL_DB: dict = {}
_PANEL_EPOCH = [0]


def _panel_scratch(dev, M: int, N: int, block_r: int, configs):
    npm = max(triton.cdiv(M, c["BLOCK_M"]) for c in configs)
    shares = max(triton.cdiv(M, c["BLOCK_M"]) * c["BLOCK_M"] * triton.cdiv(N, c["BLOCK_N"])
                 for c in configs) * block_r
    final = max(triton.cdiv(M, c["BLOCK_M"]) * c["BLOCK_M"] for c in configs) * block_r
    with _SCRATCH_LOCK:
        _PANEL_EPOCH[0] += 1
        if _PANEL_EPOCH[0] >= 2**31 - 1:
            _PANEL_CNT.clear()
            _PANEL_EPOCH[0] = 1
        epoch = _PANEL_EPOCH[0]
    ws = _scratch(_PANEL_WS, dev, shares, torch.float32)
    fin = _scratch(_PANEL_FINAL, dev, final, torch.float32)
    cnt = _scratch(_PANEL_CNT, dev, 2 + 2 * npm, torch.int32, zero=True)
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        epoch = 1  # fresh zeroed flags on every replay
    return ws, fin, cnt, epoch


def _descriptor_alloc(device, size: int, alignment: int, stream):
    # Global scratch for the tensor descriptors the kernel builds (triton.set_allocator; the
    # allocator is a ContextVar, so setting it per launch is thread-safe).
    return torch.empty(size, dtype=torch.int8, device=device)


def tma_compatible(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Tensor descriptors need a unit inner stride, 16-byte aligned base pointers and outer
    strides (a: K-major; w: either K- or N-major; out: N-major)."""
    def ok(t, inner):
        outer = 1 - inner
        return (t.stride(inner) == 1 and t.data_ptr() % 16 == 0
                and (t.stride(outer) * t.element_size()) % 16 == 0)
    return ok(a, 1) and (ok(w, 1) or ok(w, 0)) and ok(out, 1)


def select_spec(M: int, lora: int, col_scale: bool, path: str, tma_ok: bool,
                schedule: Optional[str] = None, store: Optional[str] = None,
                weight: str = "dense") -> GemmSpec:
    """The spec a call runs: split-K on the decode path, persistent + TMA for large M on a GPU
    when the operands allow descriptors, tiles otherwise (``schedule``/``store`` force one)."""
    lowrank = {LoraMode.NONE: "none", LoraMode.SEEDED: "seeded", LoraMode.IN_LOOP: "in_loop",
               LoraMode.PANEL: "panel"}[LoraMode(lora)]
    if schedule is None:
        schedule = {"small": "split_k", "medium": "tiles", "large": "tiles"}[path]
        if path == "large" and tma_ok:
            schedule = "persistent"
    if lowrank == "panel" and schedule != "persistent":
        lowrank = "in_loop"  # the same u and result, computed by every N tile
    if weight == "fp8_act" and schedule == "split_k":
        schedule = "tiles"  # the row x column scales multiply the whole K sum (spec.py)
    if store is None:
        store = "tma" if schedule == "persistent" and tma_ok else "pointer"
    return GemmSpec(weight=weight, lowrank=lowrank, col_scale="vector" if col_scale else "none",
                    schedule=schedule, store=store)


def _check_col_scale(col_scale: torch.Tensor, N: int, device) -> None:
    if not isinstance(col_scale, torch.Tensor):
        raise TypeError(f"col_scale must be a Tensor, got {type(col_scale).__name__}")
    if col_scale.dtype != torch.float32 or col_scale.shape != (N,) or col_scale.device != device:
        raise ValueError(f"col_scale must be float32 [{N}] on {device}, got "
                         f"{col_scale.dtype} {tuple(col_scale.shape)} on {col_scale.device}")


def fused_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
               bias: Optional[torch.Tensor] = None, lora: int = LoraMode.NONE,
               u: Optional[torch.Tensor] = None, la: Optional[torch.Tensor] = None,
               lb: Optional[torch.Tensor] = None, scaling: float = 1.0,
               dropout_p: float = 0.0, seed: int = 0, small_m_max: int = C.DECODE_MAX_ROWS,
               config: Optional[dict] = None, col_scale: Optional[torch.Tensor] = None,
               schedule: Optional[str] = None, store: Optional[str] = None,
               panel_ahead: int = 0, db_out: Optional[torch.Tensor] = None,
               db_u: Optional[torch.Tensor] = None,
               keep_bits: Optional[torch.Tensor] = None,
               a_scale: Optional[torch.Tensor] = None,
               w_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = col_scale·(a·wᵀ + low-rank) + bias`` (see the module doc); ``a [M, K]``,
    ``w [N, K]``, ``out [M, N]``, ``lb [N, r]``; ``lora=SEEDED``: ``u [M, r]`` input;
    ``lora=IN_LOOP``: ``la [r, K]`` and ``u [M, r]`` is *written* (xa). ``col_scale``: fp32
    ``[N]`` (DoRA's magnitude/norm), applied before the bias. All may be strided views (unit
    inner stride not required). ``config`` forces one launch config (tests; the interpreter
    always uses one); ``schedule``/``store`` force a spec (tests, benchmarks). ``w`` may be a
    ``gemm.formats.PackedWeight`` (NF4 storage, or its ``.t()`` view for dX): decoded in the
    K loop, pointer loads only. ``panel_ahead`` > 0 forces the panel mode's producer distance
    D in tiles (tests: ≥ the tile count means no tile ever finds its panel ready).
    ``db_out [N', r]`` with ``db_u [M, r]`` (the dX form, a = dY: dB = s·dYᵀ·xa): written as
    ``scaling·aᵀ·db_u``. The panel spec makes it from the a tiles its shares load (fp32
    partials ``[npm, K, BLOCK_R]`` — 16 MiB at M = 8192, K = 4096, BLOCK_R = 16 — summed over
    panels in order by torch.sum: deterministic); any other spec runs lowrank.reduce_rows.
    ``keep_bits``: the dX's dropout mask packed (uint8 ``[M, ceil(N/8)]``, the forward's
    bits), read instead of redrawn.

    ``a_scale`` fp32 ``[M]`` with ``w_scale`` fp32 ``[N]``: the fp8 x fp8 GEMM (spec weight
    ``fp8_act``): ``a`` and ``w`` are float8_e4m3fn codes (w K-major), the MMA runs on them as
    float8 and ``out = a_scale[m]·w_scale[n]·(a·wᵀ) + s·u·lbᵀ + bias`` (``lora`` NONE or
    SEEDED, ``u`` = xa of the unquantized x; no column scale, no dropout term)."""
    M, K = a.shape
    N = w.shape[0]
    assert w.shape[1] == K and out.shape == (M, N) and M > 0 and N > 0
    if col_scale is not None:
        _check_col_scale(col_scale, N, out.device)
    r = lb.shape[1] if lora else 0
    if lora and r == 0:
        lora = LoraMode.NONE
    dev = a.device
    dummy = out  # never dereferenced when the matching constexpr flag is off
    block_r = C.rank_block(r)
    if lora in (LoraMode.IN_LOOP, LoraMode.PANEL):
        # dropout_p is always the mask on out's grid (the dX form); the panel dX applies it to
        # its own low-rank tile (epilogue.in_loop_term), the plain in-loop mode does not
        assert r <= 64 and (dropout_p == 0.0 or (lora == LoraMode.PANEL and col_scale is None)), \
            "fused shrink: r ≤ 64, and dropout only in the panel dX without a column scale"
        assert la is not None and u is not None
    path = C.gemm_path(M, small_m_max)
    if lora == LoraMode.IN_LOOP and path == "small":
        # Triton lays a dot chained to another dot (here the u dot beside the main one, both
        # on the same a tiles) like that dot, and a chained [M, r] dot with M ≥ r puts every
        # warp along M: on the 16-row decode tiles all 4 warps then ran the same 16 rows, so
        # each did the whole MMA and the whole W decode (sm_90a TTGIR warpsPerCTA [4, 1]; the
        # FP8 K loop counted 37.8 SASS per W element against 12.0 without u). A u tile wider
        # than tall keeps the warps along N ([1, 4]); the extra rank columns are masked.
        block_r = max(block_r, 32)
    interpret = C.interpreting()
    packed = isinstance(w, PackedWeight)
    fp8_act = a_scale is not None
    if fp8_act:
        assert (w_scale is not None and not packed and col_scale is None
                and a.dtype == w.dtype == torch.float8_e4m3fn
                and lora in (LoraMode.NONE, LoraMode.SEEDED) and dropout_p == 0.0
                and a_scale.shape == (M,) and w_scale.shape == (N,)
                and a_scale.dtype == w_scale.dtype == torch.float32), \
            "fp8 x fp8: float8_e4m3fn a and w, fp32 a_scale [M] and w_scale [N], no col_scale"
    tma_ok = not packed and tma_compatible(a, w, out)
    spec = select_spec(M, lora, col_scale is not None, path,
                       tma_ok and (dev.type == "cuda" or store == "tma"), schedule, store,
                       "fp8_act" if fp8_act else (w.format if packed else "dense"))
    if spec.store == "tma" and not tma_ok:
        raise ValueError("store='tma' needs unit inner strides and 16-byte aligned operands")

    if config is None and interpret:
        config = C.gemm_interpret_config(path)
    if spec.schedule != "split_k":
        config = None if config is None else {**config, "SPLIT_K": 1}
        max_split = 1
    else:
        max_split = config["SPLIT_K"] if config is not None else C.MAX_SPLIT_K
    ws = wsu = tickets = dummy
    if max_split > 1:
        ws = _scratch(_WORKSPACE, dev, max_split * M * N, torch.float32)
        if lora == LoraMode.IN_LOOP:
            wsu = _scratch(_WORKSPACE_U, dev, max_split * M * block_r, torch.float32)
        tickets = _tickets(dev, triton.cdiv(M, 16) * triton.cdiv(N, 16))
    epoch = 0
    if spec.lowrank == "panel":
        cands = [config] if config is not None else [
            c.kwargs for c in tuned.lookup("gemm", "persistent", tuned.device_name(dev),
                                           C.GEMM_PERSISTENT)]
        ws, wsu, tickets, epoch = _panel_scratch(dev, M, N, block_r, cands)

    u_t = u if u is not None else dummy
    la_t = la if la is not None else dummy
    lb_t = lb if lb is not None else dummy
    cs_t = col_scale if col_scale is not None else dummy
    w_strides = w.strides() if packed else (w.stride(0), w.stride(1))
    args = (
        a, w.codes if packed else w, out, bias if bias is not None else dummy, cs_t,
        u_t, la_t, lb_t, ws, wsu, tickets,
        M, N, K, r, C.m_bucket(M),
        a.stride(0), a.stride(1), *w_strides, out.stride(0), out.stride(1),
        u_t.stride(0) if u is not None else 0, u_t.stride(1) if u is not None else 0,
        la_t.stride(0) if la is not None else 0, la_t.stride(1) if la is not None else 0,
        lb_t.stride(0) if lb is not None else 0, lb_t.stride(1) if lb is not None else 0,
        bias.stride(0) if bias is not None else 0,
        col_scale.stride(0) if col_scale is not None else 0,
        float(scaling), seed_arg(seed), drop_threshold(dropout_p), drop_scale(dropout_p),
    )
    panel_kw = dict(panel_epoch=epoch, panel_ahead=int(panel_ahead))
    fused_db = db_out is not None and spec.lowrank == "panel"
    if fused_db:
        bms = [c["BLOCK_M"] for c in cands]
        db_ws = _scratch(_PANEL_DB, dev, max(triton.cdiv(M, b) for b in bms) * K * block_r,
                         torch.float32)
        panel_kw.update(db_ptr=db_ws, xa_ptr=db_u, stride_xam=db_u.stride(0),
                        stride_xar=db_u.stride(1), PANEL_DB=True)
    modes = spec.constexprs()
    flags = dict(HAS_BIAS=bias is not None, LORA=modes["LORA"],
                 DROPOUT=lora in (LoraMode.SEEDED, LoraMode.PANEL) and dropout_p > 0.0,
                 COL_SCALE=modes["COL_SCALE"], SCHEDULE=modes["SCHEDULE"], STORE=modes["STORE"],
                 W_KMAJOR=w_strides[1] == 1, BLOCK_R=block_r, PRECISION=C.dot_precision(a.dtype))
    if keep_bits is not None and flags["DROPOUT"]:  # mask (#13 item 4): read, not redrawn
        flags.update(keep_bits=keep_bits, KEEP_BITS=True)
    if packed:
        flags.update(w.launch_args(hw_cvt=hw_cvt_ok(a)))
        flags["wq_absmax2"] = w.absmax2 if w.absmax2 is not None else w.absmax
    if fp8_act:  # the scales travel in the quantized-weight slots (gemm_kernel's wq tuple);
        #          the low-rank dot runs in the output's dtype, not the codes'
        flags.update(wq_absmax=w_scale, wq_absmax2=a_scale, WEIGHT=int(WEIGHT_FP8_ACT),
                     PRECISION=C.dot_precision(out.dtype))
    persistent = spec.schedule == "persistent"
    sms = C.num_sms(dev)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        if persistent:
            cfg = triton.Config({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                                num_warps=meta.get("num_warps", 4),
                                num_stages=meta.get("num_stages", 3))
            return (min(tiles, sms * C.ctas_per_sm(cfg, a.element_size())),)
        return (tiles, meta["SPLIT_K"])

    if spec.store == "tma":
        triton.set_allocator(functools.partial(_descriptor_alloc, dev))
    if config is not None:
        cfg = {"WARP_SPEC": False, **config}
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        heuristic_kernel[grid](*args, **flags, **cfg, **panel_kw, num_warps=warps,
                               num_stages=stages)
        block_m = cfg["BLOCK_M"]
    else:
        shape_class = "fp8_act" if fp8_act else ("persistent" if persistent else path)
        kernel = autotuned(shape_class, tuned.device_name(dev))
        kernel[grid](*args, **flags, **panel_kw)
        # the autotuner's pick fixes the partials' panel count (bench/sass_report.py's
        # compile-only stand-in has no best_config: its outputs are never read)
        best = getattr(kernel, "best_config", None)
        block_m = (best.kwargs["BLOCK_M"] if best is not None else cands[0]["BLOCK_M"]) \
            if fused_db else 0
    if fused_db:
        npm = triton.cdiv(M, block_m)
        parts = db_ws[:npm * K * block_r].view(npm, K, block_r)[:, :, :r]
        db_out.copy_(parts.sum(0).mul_(scaling))
    elif db_out is not None:
        reduce_rows(a, db_u, db_out, scaling)
    return out
