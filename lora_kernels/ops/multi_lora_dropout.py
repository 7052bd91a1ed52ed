"""Dropout in heterogeneous batches: ``multi_lora_linear(..., dropout_p=...)`` for training
several adapters at once, each with its own LoRA dropout.

``y[t] = x[t]·W0ᵀ + b + s_i·(drop_i(x[t])·A_iᵀ)·B_iᵀ`` with ``i = adapter_ids[t]``. The mask is
the project's counter-based one (docs/BACKENDS.md, definition v2) drawn once over x's ``[T, K]``
grid from one seed; row ``t`` keeps ``k`` iff its 16 random bits are ≥ ``ceil(p_i·2¹⁶)``, ``p_i``
the dropout of the row's slot (``reference.token_keep_mask``). The forward never stores it:
the backward regenerates the same bits from the seed.

A backend may implement the pair natively (``multi_lora_dropout_fwd`` / ``_bwd``: the torch
backend does, inside its grouped kernels). The others (Triton, CUDA, for now) run a composed
path made of their own kernels, correct on every backend:

* forward: ``keep`` from the backend's ``dropout_keep_mask`` (once per distinct p), ``drop(x)``
  (a ``[T, K]`` temporary), the base GEMM on plain ``x``, then the backend's shrink on
  ``drop(x)`` and expand into ``y``;
* backward: ``dA``/``dB`` from the backend's ``multi_lora_bwd`` fed ``drop(x)``; the low-rank
  part of ``dX`` as ``shrink(dY, Bᵀ)`` then ``expand(·, Aᵀ)``, masked, plus ``dY·W0``.

Next fusion step (recorded in notes/joint.md): draw the mask inside the segment shrink's x
loads, as the single-adapter Triton shrink already does, and mask the dX expand's epilogue; that
removes the ``[T, K]`` temporary and two passes over x per layer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops.batch import LoRABatch
from lora_kernels.ops.lora_linear import seed_int

_EMPTY = (0,)


def _slot_table(values: Sequence, default, dtype, device) -> Tensor:
    """A per-slot table with one extra entry (``default``) that ``-1`` tokens index. Built on the
    host and copied without blocking: no wait for the device's queue."""
    return torch.tensor(list(values) + [default], dtype=dtype).to(device, non_blocking=True)


def _row_index(adapter_ids: Tensor, num_slots: int) -> Tensor:
    ids = adapter_ids.to(torch.int64)
    return torch.where(ids < 0, num_slots, ids)


def token_keep_mask(backend: str, seed: int, adapter_ids: Tensor, cols: int,
                    dropout_p: Sequence[float]) -> Optional[Tensor]:
    """``[T, cols]`` bool keep-mask (``reference.token_keep_mask``'s bits) built from backend
    ``backend``'s ``dropout_keep_mask``: the bits do not depend on p, so each distinct nonzero p
    draws the whole grid once and its rows are selected. None when no slot drops."""
    distinct = sorted({float(p) for p in dropout_p if p > 0.0})
    if not distinct:
        return None
    T, dev = adapter_ids.shape[0], adapter_ids.device
    mask_fn = _backend.kernel(backend, "dropout_keep_mask")
    if len(distinct) == 1 and all(p == distinct[0] for p in dropout_p):
        # every slot drops alike: -1 rows keep everything (their LoRA term is never computed,
        # but the mask must be the definition's)
        keep = mask_fn(seed, T, cols, distinct[0], dev)
        return keep | (adapter_ids < 0)[:, None]
    group = _slot_table([distinct.index(p) if p > 0.0 else -1 for p in dropout_p], -1,
                        torch.int64, dev)[_row_index(adapter_ids, len(dropout_p))]
    keep = torch.ones(T, cols, dtype=torch.bool, device=dev)
    for j, p in enumerate(distinct):
        keep = torch.where((group == j)[:, None], mask_fn(seed, T, cols, p, dev), keep)
    return keep


def _row_scale(adapter_ids: Tensor, dropout_p: Sequence[float], dtype) -> Tensor:
    """``1/(1 − p_i)`` per token ``[T, 1]`` (1 for -1 tokens and slots without dropout)."""
    acc = torch.promote_types(dtype, torch.float32)
    table = _slot_table([1.0 / (1.0 - p) for p in dropout_p], 1.0, acc, adapter_ids.device)
    return table[_row_index(adapter_ids, len(dropout_p))][:, None]


def _apply(t: Tensor, keep: Tensor, scale: Tensor) -> Tensor:
    # x·(1/(1−p)) in the op-math dtype, rounded once, as reference.apply_keep does
    return torch.where(keep, (t.to(scale.dtype) * scale).to(t.dtype),
                       torch.zeros((), dtype=t.dtype, device=t.device))


# ------------------------------------------------------------------------------------------
# The composed path (every backend): the backend's mask, shrink, expand and multi_lora_bwd
# ------------------------------------------------------------------------------------------
def composed_forward(name, x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                     need_xa, keep, dropout_p):
    n_slices = 1 if out_slices is None else len(out_slices)
    xd = _apply(x, keep, _row_scale(batch.adapter_ids, dropout_p, x.dtype))
    y = F.linear(x, weight, bias)
    xa = _backend.kernel(name, "lora_shrink")(xd, lora_a, batch, scalings, ranks, n_slices)
    y = _backend.kernel(name, "lora_expand")(y, xa, lora_b, batch, ranks, out_slices)
    return y, (xa if need_xa else None)


def _transposed_b(lora_b: Tensor, out_slices) -> Tensor:
    """``[S, n_slices·R, N]``: slice j's rank rows hold ``B_i[cols of j]ᵀ`` and zeros elsewhere,
    so the backend's shrink of ``dY`` gives ``s_i·dY[:, j]·B_i[j]`` per slice."""
    bt = lora_b.transpose(1, 2)
    if out_slices is None:
        return bt.contiguous()
    S, R, N = bt.shape
    out = bt.new_zeros(S, len(out_slices) * R, N)
    c0 = 0
    for j, w in enumerate(out_slices):
        out[:, j * R:(j + 1) * R, c0:c0 + w] = bt[:, :, c0:c0 + w]
        c0 += w
    return out


def _transposed_a(lora_a: Tensor, ranks: Optional[Tensor], n_slices: int) -> Tensor:
    """``[S, K, n_slices·R]`` = ``A_iᵀ`` with rank rows at or past each slot's rank zeroed
    (the expand reads them all; the contract says they hold anything)."""
    if ranks is not None:
        S, RR, _ = lora_a.shape
        R = RR // n_slices
        rk = ranks.reshape(S, -1).expand(S, n_slices).to(torch.int64)
        live = (torch.arange(R, device=lora_a.device)[None, None, :] < rk[:, :, None])
        lora_a = torch.where(live.reshape(S, RR)[:, :, None], lora_a,
                             torch.zeros((), dtype=lora_a.dtype, device=lora_a.device))
    return lora_a.transpose(1, 2).contiguous()


def composed_backward(name, dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices,
                      needs, keep, dropout_p):
    need_x, need_w, need_b, need_a, need_bb = needs
    n_slices = 1 if out_slices is None else len(out_slices)
    scale = _row_scale(batch.adapter_ids, dropout_p, x.dtype)
    da = dbb = dx = None
    if need_a or need_bb:
        xd = _apply(x, keep, scale)
        _, _, _, da, dbb = _backend.kernel(name, "multi_lora_bwd")(
            dy, xd, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices,
            (False, False, False, need_a, need_bb))
    if need_x:
        u = _backend.kernel(name, "lora_shrink")(dy, _transposed_b(lora_b, out_slices), batch,
                                                 scalings, ranks, n_slices)
        low = torch.zeros_like(x)
        low = _backend.kernel(name, "lora_expand")(low, u, _transposed_a(lora_a, ranks, n_slices),
                                                   batch, None, None)
        dx = _apply(low, keep, scale).addmm_(dy, weight)
    dw = dy.t() @ x if need_w else None
    db = dy.sum(0) if need_b else None
    return dx, dw, db, da, dbb


# Public names of the composed path's pieces (ops/multi_lora_quant.py composes them around a
# quantized base GEMM).
row_scale, apply_keep, transposed_a, transposed_b = _row_scale, _apply, _transposed_a, _transposed_b


def _fwd(name, *args):
    impl = _backend.native(name, "multi_lora_dropout_fwd")
    return impl(*args) if impl is not None else composed_forward(name, *args)


def _bwd(name, *args):
    impl = _backend.native(name, "multi_lora_dropout_bwd")
    return impl(*args) if impl is not None else composed_backward(name, *args)


# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::multi_lora_linear_dropout", mutates_args=())
def _dropout_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scalings: Tensor, ranks: Optional[Tensor], adapter_ids: Tensor,
                sorted_token_ids: Tensor, seg_offsets: Tensor, active_slots: Tensor,
                tile_map: Tensor, batch_ints: Sequence[int], out_slices: Optional[Sequence[int]],
                dropout_p: Sequence[float], seed: Tensor, need_xa: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    return forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   dropout_p, seed, need_xa, backend)


def forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices, dropout_p, seed,
            need_xa, backend):
    """The op's body (also called directly for inference-free eager calls)."""
    slices = None if out_slices is None else tuple(out_slices)
    p = tuple(float(v) for v in dropout_p)
    keep = token_keep_mask(backend, seed_int(seed), batch.adapter_ids, x.shape[1], p)
    if keep is None:  # every active slot has p = 0
        fwd = _backend.kernel(backend, "multi_lora_fwd")
        y, xa = fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, slices, need_xa)
    else:
        y, xa = _fwd(backend, x, weight, bias, lora_a, lora_b, scalings, ranks, batch, slices,
                     need_xa, keep, p)
    if not need_xa or xa is None:
        xa = x.new_empty(_EMPTY, dtype=torch.float32)
    return y, xa


def fake_forward_outputs(x: Tensor, weight: Tensor, lora_a: Tensor, need_xa: bool):
    """``(y [M, N], xa)`` of the right shapes and dtypes for the multi-adapter forward ops' fake
    (meta) implementations, with and without dropout: ``xa`` is ``[M, r]`` fp32-or-wider when
    kept, else the empty placeholder."""
    xa_dtype = torch.promote_types(x.dtype, torch.float32)
    xa_shape = (x.shape[0], lora_a.shape[1]) if need_xa else _EMPTY
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(xa_shape, dtype=xa_dtype)


@_dropout_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scalings, ranks, adapter_ids, sorted_token_ids,
      seg_offsets, active_slots, tile_map, batch_ints, out_slices, dropout_p, seed, need_xa,
      backend):
    return fake_forward_outputs(x, weight, lora_a, need_xa)


@torch.library.custom_op("lora_kernels::multi_lora_linear_dropout_backward", mutates_args=())
def _dropout_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                         xa: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                         adapter_ids: Tensor, sorted_token_ids: Tensor, seg_offsets: Tensor,
                         active_slots: Tensor, tile_map: Tensor, batch_ints: Sequence[int],
                         out_slices: Optional[Sequence[int]], dropout_p: Sequence[float],
                         seed: Tensor, needs: Sequence[bool],
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    needs = tuple(bool(n) for n in needs)
    slices = None if out_slices is None else tuple(out_slices)
    p = tuple(float(v) for v in dropout_p)
    # the forward's mask, regenerated from the same seed
    keep = token_keep_mask(backend, seed_int(seed), batch.adapter_ids, x.shape[1], p)
    if keep is None:
        bwd = _backend.kernel(backend, "multi_lora_bwd")
        grads = bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, slices, needs)
    else:
        grads = _bwd(backend, dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, slices,
                     needs, keep, p)
    return tuple(g if n else x.new_empty(_EMPTY) for g, n in zip(grads, needs))


@_dropout_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, adapter_ids, sorted_token_ids,
      seg_offsets, active_slots, tile_map, batch_ints, out_slices, dropout_p, seed, needs,
      backend):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else _EMPTY) for s, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, scalings, ranks, ids, order, offsets, active, tiles, ints,
     out_slices, dropout_p, seed, need_xa, backend) = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scalings, ranks, ids, order,
                          offsets, active, tiles, seed)
    ctx.ints, ctx.out_slices, ctx.dropout_p, ctx.backend = list(ints), out_slices, \
        list(dropout_p), backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dxa):
    (x, weight, lora_a, lora_b, xa, scalings, ranks, ids, order, offsets, active, tiles,
     seed) = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.lora_kernels.multi_lora_linear_dropout_backward(
        dy.contiguous(), x, weight, lora_a, lora_b, xa, scalings, ranks, ids, order, offsets,
        active, tiles, ctx.ints, ctx.out_slices, ctx.dropout_p, seed, needs, ctx.backend)
    out = [g if n else None for g, n in zip(grads, needs)]
    return (*out,) + (None,) * 13


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Validation (called by ops.multi_lora.multi_lora_linear)
# ------------------------------------------------------------------------------------------
def check_dropout_p(dropout_p, S: int, training) -> Optional[tuple[float, ...]]:
    """``dropout_p`` as S host floats in [0, 1), or None when nothing drops (None, all zeros,
    or ``training=False``). Accepts a float (every slot), a sequence of S floats or a CPU
    tensor [S]; a device tensor is refused (reading it would be a host sync per layer)."""
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if dropout_p is None:
        return None
    if isinstance(dropout_p, Tensor):
        if dropout_p.device.type != "cpu":
            raise ValueError(f"dropout_p must be host values (floats or a CPU tensor), got a "
                             f"tensor on {dropout_p.device}: reading it would sync every call")
        if not dropout_p.dtype.is_floating_point:
            raise TypeError(f"dropout_p must be a float tensor [S], got dtype {dropout_p.dtype}")
        if dropout_p.dim() != 1:
            raise ValueError(f"dropout_p must have shape [S] = [{S}], got "
                             f"{list(dropout_p.shape)}")
        values = dropout_p.tolist()
    elif isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool):
        values = [float(dropout_p)] * S
    else:
        try:
            values = list(dropout_p)
        except TypeError:
            raise TypeError(f"dropout_p must be a float, a sequence of S={S} floats or a CPU "
                            f"tensor [S], got {type(dropout_p).__name__}") from None
    if len(values) != S:
        raise ValueError(f"dropout_p must hold one probability per slot (S={S}), got "
                         f"{len(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"dropout_p[{i}] must be a float, got {type(v).__name__}")
        v = float(v)
        if not 0.0 <= v < 1.0:  # also rejects NaN
            raise ValueError(f"dropout_p[{i}] must be in [0, 1), got {v}")
        out.append(v)
    if not training or not any(v > 0.0 for v in out):
        return None
    return tuple(out)
