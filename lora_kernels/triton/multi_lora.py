"""Heterogeneous multi-adapter batches on Triton: ``lora_shrink``, ``lora_expand``,
``multi_lora_fwd``, ``multi_lora_bwd`` (contract: docs/BACKENDS.md).

Kernels live in :mod:`~lora_kernels.triton.sgmv` (segment shrink / expand / weight-gradient
reductions) and :mod:`~lora_kernels.triton.multi_fused` (base GEMM + per-token LoRA epilogue).
Everything here is sized from the batch's host ints (``num_tokens``, ``num_active``,
``max_seg_len``), so a layer never syncs with the host and the launches can be captured in a
CUDA graph (run one warm-up call first: it compiles kernels and caches slice tables).

How a forward is planned (:func:`plan`; every choice can be forced with :func:`override`):

* **decode** shape (``max_seg_len ≤ 16``: every slot's tokens fit one 16-row tile — BGMV
  territory): cuBLAS base GEMM, then the LoRA term as shrink + expand over slot segments.
  Tiles are 16 rows (tensor-core minimum) and the shrink splits K into partial planes until
  its bytes are spread over up to ``programs_per_sm × SMs`` programs of ≥ 16 KiB each, so a
  small batch still streams its adapters with many SMs; the expand sums the planes in a fixed
  order (or they are summed once first when many column tiles would re-read them). With at most
  ``inline_max_tokens`` tokens the shrink is recomputed inside the expand instead: one launch
  rather than two, when launch latency outweighs re-reading A_i from L2.
* **prefill** shape (longer segments, SGMV territory): 64-row tiles over each segment, K split
  only when the segments give too few programs.
* **fused** (``T ≥ fused_min_tokens``, fp16/bf16, on average ≥ 32 tokens per active slot): the
  shrink, then one Triton GEMM whose epilogue adds each row's ``xa·B_iᵀ`` before the only write
  of y (:mod:`multi_fused`). Below that size the base GEMM is weight-bandwidth bound and cuBLAS
  GEMV-class kernels win, and the LoRA term's extra read-modify-write of y is small.
  The thresholds are guesses until ``bench/bench_multi_lora.py`` has run on the target GPU.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

from lora_kernels.triton import configs as C, sgmv
from lora_kernels.triton.lora_linear import _on_device
from lora_kernels.triton.multi_fused import launch_fused

__all__ = ["lora_shrink", "lora_expand", "multi_lora_fwd", "multi_lora_bwd"]
# Also public here (not re-exported by the backend package): add_lora_, plan, override, TUNING.

TUNING = {
    "path": "auto",            # "auto" | "fused" | "unfused"   (multi_lora_fwd)
    "shape": "auto",           # "auto" | "decode" | "prefill"  (segment kernel configs)
    "inline": "auto",          # "auto" | True | False          (decode: shrink inside expand)
    "fused_min_tokens": 1024,
    "decode_max_seg_len": 16,
    "inline_max_tokens": 8,
    "programs_per_sm": 4,
    "grad_splits": "auto",     # "auto" | int: token chunks per segment in the dA/dB reductions
}


@contextlib.contextmanager
def override(**settings):
    """Temporarily change :data:`TUNING` (tests force each path; the benchmark compares them)."""
    unknown = set(settings) - set(TUNING)
    if unknown:
        raise KeyError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(TUNING)}")
    saved = dict(TUNING)
    TUNING.update(settings)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)


def _on_input_device(fn):
    """Triton launches on the *current* CUDA device: make it the first input's device."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with _on_device(first):
            return fn(first, *args, **kwargs)
    return wrapper


def _target_programs(device) -> int:
    if device.type != "cuda":
        return 1
    return TUNING["programs_per_sm"] * C.num_sms(device)


_BOUNDS: dict = {}


def _bounds(out_slices, N: int, device) -> tuple[torch.Tensor, int]:
    """Slice column boundaries ``[0, w0, w0+w1, …, N]`` as a cached int32 device tensor
    (created once per layout, so later calls neither copy nor sync), and their alignment
    (16 if every boundary is a multiple of 16, else 1; see ``sgmv.launch_shrink``)."""
    widths = tuple(int(w) for w in out_slices) if out_slices is not None else (N,)
    key = (widths, str(device))
    hit = _BOUNDS.get(key)
    if hit is None:
        edges = [0]
        for w in widths:
            edges.append(edges[-1] + w)
        align = 16 if all(e % 16 == 0 for e in edges) else 1
        hit = _BOUNDS[key] = (torch.tensor(edges, dtype=torch.int32, device=device), align)
    return hit


@dataclass(frozen=True)
class SegConfig:
    block_m: int
    block_r: int
    block_k: int
    block_n: int
    split: int        # shrink partial planes along K
    inline: bool      # expand recomputes the shrink (one launch)
    num_warps: int = 4


# A program should move at least this much, or its fixed latency chain (metadata → token ids
# → rows) dominates; below it, fewer and fuller programs are faster than filling every SM.
MIN_BYTES_PER_PROGRAM = 16 << 10


def plan(batch, K: int, out_width: int, R: int, n_slices: int, device, elem: int = 2,
         allow_inline: bool = False) -> SegConfig:
    """Block sizes for the segment kernels from host ints only (see the module docstring).

    ``K``: reduction width of the shrink; ``out_width``: widest output slice of the expand;
    ``elem``: bytes per element of the inputs.
    """
    shape = TUNING["shape"]
    if shape == "auto":
        shape = "decode" if batch.max_seg_len <= TUNING["decode_max_seg_len"] else "prefill"
    decode = shape == "decode"
    inline = TUNING["inline"]
    if inline == "auto":
        inline = decode and batch.num_tokens <= TUNING["inline_max_tokens"]
    inline = bool(inline) and allow_inline
    if device.type != "cuda":
        # Interpreter: one small config (few, wide programs run fastest); decode still splits
        # K so the plane sum is exercised.
        return SegConfig(16, 16, 32, 64, 2 if decode and K > 32 else 1, inline)
    A, T = batch.num_active, batch.num_tokens

    def programs_for(nbytes):  # enough programs to fill the GPU, but not emptier than the floor
        return max(1, min(_target_programs(device), nbytes // MIN_BYTES_PER_PROGRAM))

    block_m = 16 if decode else (64 if batch.max_seg_len >= 64 else 32)
    block_r = 16 if decode else C.rank_block(R)
    tiles = sgmv.token_tiles(batch, block_m)[0]
    base = tiles * n_slices * triton.cdiv(R, block_r)
    # Shrink: split K until the programs cover its bytes (A rows + x), ≥ 256 columns each.
    want = programs_for((A * n_slices * R + T) * K * elem)
    split = max(1, min(triton.next_power_of_2(triton.cdiv(want, base)), K // 256))
    block_k = 64 if not decode else max(64, min(256, triton.next_power_of_2(triton.cdiv(K, split))))
    if inline:
        block_n = 256  # fewer column tiles = fewer L2 re-reads of A_i
    else:
        # Expand: the widest column tile that still gives enough programs for B + y traffic.
        want = programs_for(n_slices * out_width * (A * R + 2 * T) * elem)
        block_n = 32
        for bn in (256, 128, 64):
            if tiles * n_slices * triton.cdiv(out_width, bn) >= want:
                block_n = bn
                break
        if not decode:
            block_n = min(block_n, 128)  # 64-row tiles: keep the fp32 accumulator in registers
    return SegConfig(block_m, block_r, block_k, block_n, split, inline)


def _fold_planes(planes, cfg, batch, K, out_width, R, n_slices, elem):
    """Sum the split-K planes once up front when every column tile of the expand re-reading
    all of them would cost more than a quarter of the essential traffic (few adapters, many
    tokens); otherwise the expand sums them itself and no launch is added."""
    if planes.shape[0] == 1:
        return planes
    T, A = batch.num_tokens, batch.num_active
    rereads = triton.cdiv(out_width, cfg.block_n) * planes.shape[0] * T * n_slices * R * 4
    essential = (A * n_slices * R * (K + out_width) + T * (K + 2 * n_slices * out_width)) * elem
    return planes.sum(0, keepdim=True) if 4 * rereads > essential else planes


def _slices(out_slices, N):
    widths = list(out_slices) if out_slices is not None else [N]
    return len(widths), max(widths)


# Views of the stacks as the kernels see them: shrink matrix strides (slot, slice, rank, col),
# expand matrix strides (slot, col, slice, rank).
def _a_as_shrink(lora_a, R):
    return lora_a.stride(0), R * lora_a.stride(1), lora_a.stride(1), lora_a.stride(2)


def _b_as_expand(lora_b):
    return lora_b.stride(0), lora_b.stride(1), 0, lora_b.stride(2)


def _b_as_shrink(lora_b):  # dY·B_i: slice j reads its own columns of dY and rows of B_i
    return lora_b.stride(0), 0, lora_b.stride(2), lora_b.stride(1)


def _a_as_expand(lora_a, R):  # dX += u·A_i: column k of A_i, rank row j·R + r
    return lora_a.stride(0), lora_a.stride(2), R * lora_a.stride(1), lora_a.stride(1)


def _shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg, zero: bool):
    """Partial planes ``[cfg.split, T, n_slices·R]`` float32 of the scaled shrink."""
    alloc = torch.zeros if zero else torch.empty
    planes = alloc(cfg.split, x.shape[0], n_slices * R, dtype=torch.float32, device=x.device)
    return sgmv.launch_shrink(x, lora_a, _a_as_shrink(lora_a, R), planes, batch, cfg, R=R,
                              n_slices=n_slices, scalings=scalings, ranks=ranks, bounds=None,
                              max_width=x.shape[1], prec=C.dot_precision(x.dtype))


def _one_plane(planes):
    return planes[0] if planes.shape[0] == 1 else planes.sum(0)


# ------------------------------------------------------------------------------------------
# Kernel-level API
# ------------------------------------------------------------------------------------------
@_on_input_device
def lora_shrink(x, lora_a, batch, scalings, ranks, n_slices):
    T, RR = x.shape[0], lora_a.shape[1]
    R = RR // n_slices
    if not batch.has_lora or T == 0:
        return torch.zeros(T, RR, dtype=torch.float32, device=x.device)
    cfg = plan(batch, x.shape[1], R, R, n_slices, x.device, x.element_size())
    # Zeroed planes: the contract wants zeros for -1 tokens and ranks past each rank.
    return _one_plane(_shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg, zero=True))


@_on_input_device
def lora_expand(y, xa, lora_b, batch, ranks, out_slices):
    T, N, R = y.shape[0], lora_b.shape[1], lora_b.shape[2]
    if not batch.has_lora or T == 0:
        return y
    n_slices, max_w = _slices(out_slices, N)
    cfg = plan(batch, R, max_w, R, n_slices, y.device, y.element_size())
    bounds, align = _bounds(out_slices, N, y.device)
    sgmv.launch_expand(y, xa.float().contiguous()[None], lora_b, _b_as_expand(lora_b), batch, cfg,
                       R=R, n_slices=n_slices, ranks=ranks, bounds=bounds, slice_align=align,
                       max_width=max_w, prec=C.dot_precision(y.dtype))
    return y


def _use_fused(batch, dtype, device) -> bool:
    path = TUNING["path"]
    if path != "auto":
        return path == "fused"
    T = batch.num_tokens
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and T >= TUNING["fused_min_tokens"] and T >= 32 * batch.num_active)


@_on_input_device
def multi_lora_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   need_xa=True):
    T, K = x.shape
    N, R = weight.shape[0], lora_b.shape[2]
    n_slices, max_w = _slices(out_slices, N)
    if batch.has_lora and T and _use_fused(batch, x.dtype, x.device):
        cfg = plan(batch, K, max_w, R, n_slices, x.device, x.element_size())
        xa = _one_plane(_shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg,
                                zero=need_xa))
        y = torch.empty(T, N, dtype=x.dtype, device=x.device)
        bounds, _ = _bounds(out_slices, N, x.device)
        # fp32 inputs: the base MMA in 3-pass tf32 (≈ fp32 accuracy, like torch.mm's default;
        # plain tf32's ~4e-4 relative error would sit at the GPU fp32 tolerance).
        launch_fused(x, weight, bias, y, xa, lora_b, ranks, bounds, batch, R=R,
                     n_slices=n_slices, prec="tf32x3", lora_prec=C.dot_precision(x.dtype),
                     interpret=x.device.type != "cuda")
        return y, (xa if need_xa else None)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    xa = torch.zeros(T, n_slices * R, dtype=torch.float32, device=x.device) if need_xa else None
    add_lora_(y, x, lora_a, lora_b, scalings, ranks, batch, out_slices, xa)
    return y, xa


@_on_input_device
def add_lora_(y, x, lora_a, lora_b, scalings, ranks, batch, out_slices=None, xa_out=None):
    """``y[t] += s_i·(x[t]·A_iᵀ)·B_iᵀ`` in place with the planned decode/prefill kernels: for
    engines that run the base GEMM themselves, one call instead of ``lora_shrink`` +
    ``lora_expand`` (which must materialise a reduced, zero-padded xa). Optionally writes the
    scaled xa into ``xa_out`` (zeroed ``[T, n_slices·R]`` float32). Inputs as in BACKENDS.md."""
    T, K = x.shape
    N, R = lora_b.shape[1], lora_b.shape[2]
    if not batch.has_lora or T == 0:
        return y
    n_slices, max_w = _slices(out_slices, N)
    bounds, align = _bounds(out_slices, N, x.device)
    cfg = plan(batch, K, max_w, R, n_slices, x.device, x.element_size(), allow_inline=True)
    common = dict(R=R, n_slices=n_slices, ranks=ranks, bounds=bounds, slice_align=align,
                  max_width=max_w, prec=C.dot_precision(x.dtype), xa_out=xa_out)
    if cfg.inline:
        sgmv.launch_expand(y, None, lora_b, _b_as_expand(lora_b), batch, cfg,
                           inline=(x, lora_a, scalings), **common)
    else:
        planes = _shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg, zero=False)
        planes = _fold_planes(planes, cfg, batch, K, max_w, R, n_slices, x.element_size())
        sgmv.launch_expand(y, planes, lora_b, _b_as_expand(lora_b), batch, cfg, **common)
    return y


def _grad_splits(batch, n_slices, R, width, block_t, block_q, device) -> int:
    """Token chunks per segment for dA/dB: enough programs to fill the GPU when few adapters
    own long segments, each chunk keeping ≥ 8 token blocks of work."""
    forced = TUNING["grad_splits"]
    if forced != "auto":
        return max(1, int(forced))
    if device.type != "cuda":
        return 1
    base = batch.num_active * n_slices * triton.cdiv(R, 16) * triton.cdiv(width, block_q)
    want = triton.next_power_of_2(triton.cdiv(_target_programs(device), max(base, 1)))
    return max(1, min(want, batch.max_seg_len // (8 * block_t)))


@_on_input_device
def multi_lora_bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    T, K = x.shape
    N, R = weight.shape[0], lora_b.shape[2]
    n_slices, max_w = _slices(out_slices, N)
    dx = dy @ weight if need_x else None
    dw = dy.t() @ x if need_w else None
    db = dy.sum(0) if need_b else None
    da = torch.zeros_like(lora_a) if need_a else None
    dbb = torch.zeros_like(lora_b) if need_bb else None
    if not batch.has_lora or T == 0:
        return dx, dw, db, da, dbb
    bounds, align = _bounds(out_slices, N, x.device)
    prec = C.dot_precision(x.dtype)
    interp = x.device.type != "cuda"
    block_t, block_q = (16 if interp else 32), 64
    outer = dict(batch=batch, R=R, n_slices=n_slices, ranks=ranks, prec=prec,
                 block_t=block_t, block_r=16, block_q=block_q, max_width=max_w, num_warps=4,
                 slice_align=align)
    if need_x or need_a:
        # u = s_i·dY·B_i (per slice), shared by dX and dA.
        cfg = plan(batch, max_w, K, R, n_slices, x.device, x.element_size())
        planes = torch.empty(cfg.split, T, n_slices * R, dtype=torch.float32, device=x.device)
        sgmv.launch_shrink(dy, lora_b, _b_as_shrink(lora_b), planes, batch, cfg, R=R,
                           n_slices=n_slices, scalings=scalings, ranks=ranks, bounds=bounds,
                           slice_align=align, max_width=max_w, prec=prec)
        u = _one_plane(planes)
        if need_x:
            sgmv.launch_expand(dx, u[None], lora_a, _a_as_expand(lora_a, R), batch, cfg, R=R,
                               n_slices=n_slices, ranks=ranks, bounds=None, max_width=K,
                               prec=prec)
        if need_a:  # dA_i[j·R + r, k] = Σ_{t∈G_i} u[t, j·R + r]·x[t, k]
            sgmv.launch_seg_outer(u, x, da, (da.stride(0), R * da.stride(1), da.stride(1),
                                             da.stride(2)), bounds=None,
                                  t_splits=_grad_splits(batch, n_slices, R, K, block_t, block_q,
                                                        x.device), **outer)
    if need_bb:  # dB_i[n, r] = Σ_{t∈G_i} dY[t, n]·xa[t, j·R + r], n in slice j
        if xa is None or xa.numel() != T * n_slices * R:
            cfg = plan(batch, K, max_w, R, n_slices, x.device, x.element_size())
            xa = _one_plane(_shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg,
                                    zero=False))
        xa = xa.float().contiguous()
        sgmv.launch_seg_outer(xa, dy, dbb, (dbb.stride(0), 0, dbb.stride(2), dbb.stride(1)),
                              bounds=bounds, t_splits=_grad_splits(batch, n_slices, R, max_w,
                                                                   block_t, block_q, x.device),
                              **outer)
    return dx, dw, db, da, dbb
