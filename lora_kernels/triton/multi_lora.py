"""Heterogeneous multi-adapter batches on Triton: the backend API ``lora_shrink``,
``lora_expand``, ``multi_lora_fwd``, ``multi_lora_bwd`` (contract: docs/BACKENDS.md), plus
``add_lora_`` for engines that run the base GEMM themselves.

Kernels: :mod:`~lora_kernels.triton.shrink_expand` (segment shrink / expand, decode and
prefill), :mod:`~lora_kernels.triton.seg_grads` (dA/dB segment reductions) and
:mod:`~lora_kernels.triton.multi_fused` (base GEMM + per-token LoRA epilogue). How each call is
sized: :mod:`~lora_kernels.triton.multi_plan` (host ints only, so a layer never syncs and the
launches can be captured in a CUDA graph; run one warm-up call first: it compiles kernels and
caches slice tables).
"""

from __future__ import annotations

import functools

import torch

from lora_kernels.triton import configs as C
from lora_kernels.triton.device import on_device
from lora_kernels.triton.multi_fused import launch_fused
from lora_kernels.triton.multi_plan import (TUNING, SegConfig, fold_planes, grad_splits,
                                            override, plan, use_fused, use_pdl)
from lora_kernels.triton.seg_grads import launch_seg_outer
from lora_kernels.triton.shrink_expand import launch_expand, launch_shrink
from lora_kernels.triton import quant_lora as _quant
from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.lora_linear import SMALL_M_MAX

__all__ = ["lora_shrink", "lora_expand", "multi_lora_fwd", "multi_lora_bwd"]
# Also public here (not re-exported by the backend package): add_lora_, and from multi_plan
# plan, override, TUNING, SegConfig (tests force each path; the benchmark compares them).


def _on_input_device(fn):
    """Triton launches on the *current* CUDA device: make it the first input's device."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with on_device(first):
            return fn(first, *args, **kwargs)
    return wrapper


_BOUNDS: dict = {}


def _bounds(out_slices, N: int, device) -> tuple[torch.Tensor, int]:
    """Slice column boundaries ``[0, w0, w0+w1, …, N]`` as a cached int32 device tensor
    (created once per layout, so later calls neither copy nor sync), and their alignment
    (16 if every boundary is a multiple of 16, else 1; see ``shrink_expand.launch_shrink``)."""
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


def _shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg, zero: bool, pdl=False):
    """Partial planes ``[cfg.split, T, n_slices·R]`` float32 of the scaled shrink."""
    alloc = torch.zeros if zero else torch.empty
    planes = alloc(cfg.split, x.shape[0], n_slices * R, dtype=torch.float32, device=x.device)
    return launch_shrink(x, lora_a, _a_as_shrink(lora_a, R), planes, batch, cfg, R=R,
                         n_slices=n_slices, scalings=scalings, ranks=ranks, bounds=None,
                         max_width=x.shape[1], prec=C.dot_precision(x.dtype), pdl=pdl)


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
    launch_expand(y, xa.float().contiguous()[None], lora_b, _b_as_expand(lora_b), batch, cfg,
                  R=R, n_slices=n_slices, ranks=ranks, bounds=bounds, slice_align=align,
                  max_width=max_w, prec=C.dot_precision(y.dtype))
    return y


def _quantized(weight) -> bool:
    """A frozen quantized W (FP8Weight / NF4Weight attributes, or a PackedWeight): the base
    GEMMs decode it in their K loop (gemm/formats.py), never a dense copy."""
    return not isinstance(weight, torch.Tensor)


def base_gemm(x, weight, bias):
    """``x·Wᵀ + b`` for a dense or quantized W (the quantized one on the GEMM core, split-K
    on decode shapes like the single-adapter op)."""
    if not _quantized(weight):
        return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    pw = _quant.packed(weight)
    y = torch.empty(x.shape[0], pw.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0]:
        fused_gemm(x, pw, y, bias=bias, small_m_max=SMALL_M_MAX)
    return y


def base_dx(dy, weight):
    """``dY·W`` for a dense or quantized W (the quantized one from the packed storage's Wᵀ
    view: the same bytes, no transposed copy)."""
    if not _quantized(weight):
        return dy @ weight
    pw = _quant.packed(weight)
    dx = torch.empty(dy.shape[0], pw.shape[1], dtype=dy.dtype, device=dy.device)
    if dy.shape[0]:
        fused_gemm(dy, pw.t(), dx, small_m_max=SMALL_M_MAX)
    return dx


@_on_input_device
def multi_lora_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   need_xa=True):
    T, K = x.shape
    if _quantized(weight):
        weight = _quant.packed(weight)
    N, R = weight.shape[0], lora_b.shape[2]
    n_slices, max_w = _slices(out_slices, N)
    if batch.has_lora and T and use_fused(batch, x.dtype, x.device):
        cfg = plan(batch, K, max_w, R, n_slices, x.device, x.element_size(), fused=True)
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
    y = base_gemm(x, weight, bias)
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
        launch_expand(y, None, lora_b, _b_as_expand(lora_b), batch, cfg,
                      inline=(x, lora_a, scalings), **common)
    else:
        pdl = cfg.block_m == batch.TILE_ROWS and use_pdl(x.device)
        planes = _shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg, zero=False,
                         pdl=pdl)
        folded = fold_planes(planes, cfg, batch, K, max_w, R, n_slices, x.element_size())
        # A plane sum in between is a plain launch: PDL only pairs shrink → expand.
        launch_expand(y, folded, lora_b, _b_as_expand(lora_b), batch, cfg,
                      pdl=pdl and folded is planes, **common)
    return y


@_on_input_device
def multi_lora_bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    T, K = x.shape
    if _quantized(weight):
        assert not need_w, "a quantized base weight is frozen"
        weight = _quant.packed(weight)
    N, R = weight.shape[0], lora_b.shape[2]
    n_slices, max_w = _slices(out_slices, N)
    dx = base_dx(dy, weight) if need_x else None
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
        launch_shrink(dy, lora_b, _b_as_shrink(lora_b), planes, batch, cfg, R=R,
                      n_slices=n_slices, scalings=scalings, ranks=ranks, bounds=bounds,
                      slice_align=align, max_width=max_w, prec=prec)
        u = _one_plane(planes)
        if need_x:
            launch_expand(dx, u[None], lora_a, _a_as_expand(lora_a, R), batch, cfg, R=R,
                          n_slices=n_slices, ranks=ranks, bounds=None, max_width=K,
                          prec=prec)
        if need_a:  # dA_i[j·R + r, k] = Σ_{t∈G_i} u[t, j·R + r]·x[t, k]
            launch_seg_outer(u, x, da, (da.stride(0), R * da.stride(1), da.stride(1),
                                        da.stride(2)), bounds=None,
                             t_splits=grad_splits(batch, n_slices, R, K, block_t, block_q,
                                                   x.device), **outer)
    if need_bb:  # dB_i[n, r] = Σ_{t∈G_i} dY[t, n]·xa[t, j·R + r], n in slice j
        if xa is None or xa.numel() != T * n_slices * R:
            cfg = plan(batch, K, max_w, R, n_slices, x.device, x.element_size())
            xa = _one_plane(_shrink(x, lora_a, batch, scalings, ranks, R, n_slices, cfg,
                                    zero=False))
        xa = xa.float().contiguous()
        launch_seg_outer(xa, dy, dbb, (dbb.stride(0), 0, dbb.stride(2), dbb.stride(1)),
                         bounds=bounds, t_splits=grad_splits(batch, n_slices, R, max_w,
                                                              block_t, block_q, x.device),
                         **outer)
    return dx, dw, db, da, dbb
