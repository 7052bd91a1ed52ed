"""Heterogeneous multi-adapter LoRA: contract, custom-op registration, autograd, dispatch.

Every token ``t`` carries a slot ``i = adapter_ids[t]`` (``-1`` = base model only):
``y[t] = x[t]·W0ᵀ + b + s_i·(x[t]·A_iᵀ)·B_iᵀ``. Stacked adapters ``lora_a [S, n_slices·R, K]``,
``lora_b [S, N, R]``; per-slot ``ranks`` make the cost follow the real rank. The batch
metadata (``LoRABatch``) travels into the custom ops as plain tensors and ints.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops import validation as V
from lora_kernels.ops import multi_lora_dropout as _dropout
from lora_kernels.ops import multi_lora_quant as _quant
from lora_kernels.ops.batch import LoRABatch
from lora_kernels.ops.lora_linear import check_seed, draw_seed

_EMPTY = (0,)


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def _multi_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
              scalings: Tensor, ranks: Optional[Tensor], adapter_ids: Tensor,
              sorted_token_ids: Tensor, seg_offsets: Tensor, active_slots: Tensor,
              tile_map: Tensor, batch_ints: Sequence[int], out_slices: Optional[Sequence[int]], need_xa: bool,
              backend: str) -> tuple[Tensor, Tensor]:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    return _forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                    need_xa, backend)


def _forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices, need_xa, backend):
    slices = None if out_slices is None else tuple(out_slices)
    fwd = _backend.kernel(backend, "multi_lora_fwd")
    y, xa = fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, slices, need_xa)
    if not need_xa or xa is None:
        xa = x.new_empty(_EMPTY, dtype=torch.float32)
    return y, xa


@_multi_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scalings, ranks, adapter_ids, sorted_token_ids,
      seg_offsets, active_slots, tile_map, batch_ints, out_slices, need_xa, backend):
    return _dropout.fake_forward_outputs(x, weight, lora_a, need_xa)


@torch.library.custom_op("lora_kernels::multi_lora_linear_backward", mutates_args=())
def _multi_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                       xa: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                       adapter_ids: Tensor, sorted_token_ids: Tensor, seg_offsets: Tensor,
                       active_slots: Tensor, tile_map: Tensor, batch_ints: Sequence[int],
                       out_slices: Optional[Sequence[int]], needs: Sequence[bool],
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    needs = tuple(bool(n) for n in needs)
    slices = None if out_slices is None else tuple(out_slices)
    bwd = _backend.kernel(backend, "multi_lora_bwd")
    grads = bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, slices, needs)
    return tuple(g if n else x.new_empty(_EMPTY) for g, n in zip(grads, needs))


@_multi_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, adapter_ids, sorted_token_ids,
      seg_offsets, active_slots, tile_map, batch_ints, out_slices, needs, backend):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else _EMPTY) for s, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, scalings, ranks, ids, order, offsets, active, tiles, ints,
     out_slices, need_xa, backend) = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scalings, ranks, ids, order,
                          offsets, active, tiles)
    ctx.ints, ctx.out_slices, ctx.backend = list(ints), out_slices, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dxa):
    (x, weight, lora_a, lora_b, xa, scalings, ranks, ids, order, offsets, active,
     tiles) = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.lora_kernels.multi_lora_linear_backward(
        dy.contiguous(), x, weight, lora_a, lora_b, xa, scalings, ranks, ids, order, offsets,
        active, tiles, ctx.ints, ctx.out_slices, needs, ctx.backend)
    out = [g if n else None for g, n in zip(grads, needs)]
    return (*out,) + (None,) * 11


_multi_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def _shrink_op(x: Tensor, lora_a: Tensor, scalings: Optional[Tensor], ranks: Optional[Tensor],
               adapter_ids: Tensor, sorted_token_ids: Tensor, seg_offsets: Tensor,
               active_slots: Tensor, tile_map: Tensor, batch_ints: Sequence[int], n_slices: int,
               backend: str) -> Tensor:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    return _backend.kernel(backend, "lora_shrink")(x, lora_a, batch, scalings, ranks, n_slices)


@_shrink_op.register_fake
def _(x, lora_a, scalings, ranks, adapter_ids, sorted_token_ids, seg_offsets, active_slots,
      tile_map, batch_ints, n_slices, backend):
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def _expand_op(y: Tensor, xa: Tensor, lora_b: Tensor, ranks: Optional[Tensor],
               adapter_ids: Tensor, sorted_token_ids: Tensor, seg_offsets: Tensor,
               active_slots: Tensor, tile_map: Tensor, batch_ints: Sequence[int],
               out_slices: Optional[Sequence[int]], backend: str) -> None:
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    slices = None if out_slices is None else tuple(out_slices)
    out = _backend.kernel(backend, "lora_expand")(y, xa, lora_b, batch, ranks, slices)
    if out is not y:
        y.copy_(out)


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                      lora_b: Tensor, batch: LoRABatch, *, scalings, ranks: Optional[Tensor] = None,
                      out_slices: Optional[Sequence[int]] = None, backend: str = "auto",
                      dropout_p=None, training: bool = True,
                      dropout_seed: Optional[int] = None) -> Tensor:
    """Base GEMM plus each token's own adapter, ``x [T, K]`` (or ``[..., K]``, flattened).

    ``lora_a [S, n_slices·r_max, K]``, ``lora_b [S, N, r_max]``, ``scalings [S]``, ``ranks [S]`` or
    ``[S, n_slices]`` (slot i uses its first ``ranks[i]`` ranks; 0 = no LoRA), ``out_slices``:
    output widths of a packed projection (qkv, gate_up) whose slices carry separate LoRAs.
    Differentiable in x, lora_a, lora_b (and weight/bias when they require grad).
    ``weight`` may also be a frozen quantized base, an ``FP8Weight`` (e4m3, one scale per
    output channel) or an ``NF4Weight`` (bitsandbytes storage): decoded tile by tile in the
    GEMM, never a whole dequantized N×K tensor (:mod:`lora_kernels.ops.multi_lora_quant`).
    ``dropout_p``: LoRA-branch dropout per slot (a float for all, S floats or a CPU tensor
    [S]; only when ``training``), a per-token mask regenerated in the backward
    (:mod:`lora_kernels.ops.multi_lora_dropout`); ``dropout_seed`` fixes it.
    """
    if _quant.is_quantized(weight):  # a frozen FP8 / NF4 base (ops/multi_lora_quant.py)
        return _quant.quant_multi_lora_linear(
            x, weight, bias, lora_a, lora_b, batch, scalings=scalings, ranks=ranks,
            out_slices=out_slices, backend=backend, dropout_p=dropout_p, training=training,
            dropout_seed=dropout_seed)
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [T, K], got a 0-D tensor")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: ambiguous when K = 0
    dtype, N, K, S, R, slices, n_slices = V.check_stack(x2, weight, bias, lora_a, lora_b, out_slices)
    batch = V.check_batch(batch, x2.shape[0], S, x.device)
    V.check_index_math("x", x2.shape[0])
    sc = V.check_scalings(scalings, S, x.device)
    rk = V.check_ranks(ranks, S, R, n_slices, x.device)
    drop = _dropout.check_dropout_p(dropout_p, S, training)
    seed = None if dropout_seed is None else check_seed(dropout_seed)
    bias_c = V.dense(bias, dtype)
    if not batch.has_lora or x2.shape[0] == 0:
        return F.linear(x2, weight, bias_c).reshape(*lead, N)
    name = _backend.resolve_for(backend, x2, "multi_lora_linear")
    a, b = V.dense(lora_a, dtype), V.dense(lora_b, dtype)
    need_xa = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or
                                           x2.requires_grad or weight.requires_grad)
    if drop is not None:
        seed_t = draw_seed() if seed is None else torch.tensor(seed, dtype=torch.int64)
        y, _ = torch.ops.lora_kernels.multi_lora_linear_dropout(
            x2.contiguous(), weight, bias_c, a, b, sc, rk, *batch.tensors(), batch.host_ints(),
            slices, list(drop), seed_t, need_xa, name)
        return y.reshape(*lead, N)
    if _backend.plain_eager(x, weight, bias, lora_a, lora_b):
        # inference: skip the custom-op dispatch, same kernels
        y, _ = _forward(x2.contiguous(), weight, bias_c, a, b, sc, rk, batch, slices, False, name)
    else:
        y, _ = torch.ops.lora_kernels.multi_lora_linear(
            x2.contiguous(), weight, bias_c, a, b, sc, rk, *batch.tensors(), batch.host_ints(),
            slices, need_xa, name)
    return y.reshape(*lead, N)


def lora_shrink(x: Tensor, lora_a: Tensor, batch: LoRABatch, scalings=None, *,
                ranks: Optional[Tensor] = None, n_slices: int = 1, backend: str = "auto") -> Tensor:
    """``xa[t] = s_i·x[t]·A_iᵀ`` → ``[T, n_slices·r_max]`` float32 (zero rows for ``-1`` tokens).

    The Punica/vLLM-style first half, for engines that run the base GEMM themselves.
    Inference only (no autograd).
    """
    V.tensor("x", x, 2)
    V.tensor("lora_a", lora_a, 3)
    S, RR, K = lora_a.shape
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1 or RR % n_slices:
        raise ValueError(f"n_slices must be a positive int dividing lora_a.shape[1]={RR}, got {n_slices!r}")
    V.shape("x", x, (x.shape[0], K), "[T, K]")
    V.same_device("x", x, lora_a=lora_a)
    batch = V.check_batch(batch, x.shape[0], S, x.device)
    sc = None if scalings is None else V.check_scalings(scalings, S, x.device)
    rk = V.check_ranks(ranks, S, RR // n_slices, n_slices, x.device)
    if not batch.has_lora or x.shape[0] == 0:
        return x.new_zeros(x.shape[0], RR, dtype=torch.promote_types(x.dtype, torch.float32))
    name = _backend.resolve_for(backend, x, "lora_shrink")
    return torch.ops.lora_kernels.lora_shrink(
        x.contiguous(), V.dense(lora_a, x.dtype), sc, rk, *batch.tensors(),
        batch.host_ints(), n_slices, name)


def lora_expand(y: Tensor, xa: Tensor, lora_b: Tensor, batch: LoRABatch, *,
                ranks: Optional[Tensor] = None, out_slices: Optional[Sequence[int]] = None,
                backend: str = "auto") -> Tensor:
    """``y[t] += xa[t]·B_iᵀ`` in place (rows of ``-1`` tokens untouched); returns ``y``.

    ``y [T, N]``, ``xa [T, n_slices·r_max]`` (from :func:`lora_shrink`), ``lora_b [S, N, r_max]``.
    Inference only (no autograd).
    """
    V.tensor("y", y, 2)
    V.tensor("xa", xa, 2)
    V.tensor("lora_b", lora_b, 3)
    S, N, R = lora_b.shape
    V.shape("y", y, (y.shape[0], N), "[T, N]")
    slices = V.check_slices(out_slices, N)
    n_slices = 1 if slices is None else len(slices)
    V.shape("xa", xa, (y.shape[0], n_slices * R), "[T, n_slices·r_max]")
    V.same_device("y", y, xa=xa, lora_b=lora_b)
    batch = V.check_batch(batch, y.shape[0], S, y.device)
    rk = V.check_ranks(ranks, S, R, n_slices, y.device)
    if not batch.has_lora or y.shape[0] == 0:
        return y
    if not y.is_contiguous():
        raise ValueError("y must be contiguous: lora_expand adds into it in place")
    name = _backend.resolve_for(backend, y, "lora_expand")
    torch.ops.lora_kernels.lora_expand(
        y, xa.to(torch.promote_types(y.dtype, torch.float32)).contiguous(),
        V.dense(lora_b, y.dtype), rk, *batch.tensors(), batch.host_ints(), slices, name)
    return y
