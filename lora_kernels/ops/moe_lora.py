"""LoRA on mixture-of-experts projections: contract, routing plan, custom ops, autograd.

For every (token, expert) pair of a router's top-k choice, ``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ``
with per-expert frozen weights ``W [E, N, K]`` and per-expert factors ``A [E, r, K]``,
``B [E, N, r]`` (PEFT's ``target_parameters`` LoRA on ``mlp.experts.*`` is exactly this).
Pairs are sorted by expert once (:func:`moe_plan`, a stable argsort on the device); the
backends then run one grouped GEMM over the expert segments, so the cost follows the real
tokens per expert and an empty expert costs nothing.

*Gate weights*: transformers' MoE blocks apply ``top_k_weights`` after the down projection
and sum the k pairs of a token. The op returns the per-pair outputs; with ``topk_weights``
the public entry does that weighted sum itself in plain torch, so the router's gradient
(``dL/dw = <dL/dy, y_pair>``) comes from autograd, not from a kernel.

The op saves ``x`` and the rank-sized ``u = x·A_eᵀ`` (sorted order) for the backward: dx, dA
and dB are each a fixed-order reduction (no atomics), so gradients are deterministic.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops import validation as V
from lora_kernels.ops.lora_linear import EMPTY_GRAD

_MODULES = {"torch": "lora_kernels.ops.moe_torch", "triton": "lora_kernels.triton.moe_lora",
            "cuda": "lora_kernels.triton.moe_lora"}  # no CUDA C++ MoE kernel: Triton's


def _impl(backend: str, fn: str):
    return getattr(importlib.import_module(_MODULES[backend]), fn)


def moe_plan(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(sorted_pairs [P], offsets [E+1])``: pair indices ``p = t·k + j`` in expert order
    (stable: token order within an expert) and each expert's segment bounds. Device ops
    only (no host sync)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    sorted_ids, sorted_pairs = torch.sort(flat, stable=True)
    # Bounds by binary search on the sorted ids: static shapes (torch.compile traces it; a
    # bincount's length would depend on the data) and no atomics.
    bounds = torch.arange(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return sorted_pairs, offsets


@torch.library.custom_op("lora_kernels::moe_lora_linear", mutates_args=())
def _moe_op(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, sorted_pairs: Tensor,
            offsets: Tensor, group: int, scaling: float, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling, backend)


def _forward(x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling, backend):
    P = sorted_pairs.shape[0]
    if P == 0:
        return x.new_empty(0, weight.shape[1]), x.new_empty(0, lora_a.shape[1])
    return _impl(backend, "moe_lora_fwd")(x, weight, lora_a, lora_b, sorted_pairs, offsets,
                                          group, scaling)


@_moe_op.register_fake
def _(x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling, backend):
    P = sorted_pairs.shape[0]
    return x.new_empty(P, weight.shape[1]), x.new_empty(P, lora_a.shape[1])


@torch.library.custom_op("lora_kernels::moe_lora_linear_backward", mutates_args=())
def _moe_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                     u: Tensor, sorted_pairs: Tensor, offsets: Tensor, group: int,
                     scaling: float, needs: Sequence[bool],
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    if sorted_pairs.shape[0] == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b))
    else:
        grads = _impl(backend, "moe_lora_bwd")(dy, x, weight, lora_a, lora_b, u, sorted_pairs,
                                               offsets, group, scaling, needs)
    # custom ops cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if n else x.new_empty(EMPTY_GRAD) for g, n in zip(grads, needs))


@_moe_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, u, sorted_pairs, offsets, group, scaling, needs, backend):
    shapes = (x.shape, lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else EMPTY_GRAD) for s, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], sorted_pairs, offsets)
    ctx.group, ctx.scaling, ctx.backend = group, scaling, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _du):
    x, weight, lora_a, lora_b, u, sorted_pairs, offsets = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("moe_lora_linear: expert_weight gradients are not implemented "
                           "(the base experts are frozen under LoRA)")
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    dx, da, db = torch.ops.lora_kernels.moe_lora_linear_backward(
        dy.contiguous(), x, weight, lora_a, lora_b, u, sorted_pairs, offsets, ctx.group,
        ctx.scaling, needs, ctx.backend)
    out = [g if n else None for g, n in zip((dx, da, db), needs)]
    return out[0], None, out[1], out[2], None, None, None, None, None


_moe_op.register_autograd(_backward, setup_context=_setup_context)


def _check_ids(topk_ids: Tensor, E: int) -> None:
    if not isinstance(topk_ids, Tensor):
        raise TypeError(f"topk_ids must be a Tensor, got {type(topk_ids).__name__}")
    dt = topk_ids.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must have shape [T, k], got {tuple(topk_ids.shape)}")


def _check_id_range(topk_ids: Tensor, E: int) -> None:
    # Reads the ids on the host (after the device checks); a compiled graph skips it.
    if topk_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"topk_ids must lie in [0, {E}) (E = expert_weight.shape[0]), "
                             f"got values in [{lo}, {hi}]")


def _check_routing(x, expert_weight, topk_ids, lora_a, lora_b, factor_ndim: int):
    """The checks both MoE entries share: tensors, the expert ids and x's two layouts.
    Returns ``(E, N, K, T, k, group)`` (``group``: pairs per row of x, k for ``[T, K]``)."""
    V.tensor("x", x)
    V.tensor("expert_weight", expert_weight, 3)
    V.tensor("lora_a", lora_a, factor_ndim)  # [E, r, K], or [S, E, r, K] for a slot stack
    V.tensor("lora_b", lora_b, factor_ndim)
    E, N, K = expert_weight.shape
    _check_ids(topk_ids, E)
    T, k = topk_ids.shape
    if x.dim() == 2:
        V.shape("x", x, (T, K), "[T, K] (T = topk_ids.shape[0])")
        return E, N, K, T, k, k
    if x.dim() == 3:
        V.shape("x", x, (T, k, K), "[T, k, K] (topk_ids is [T, k])")
        return E, N, K, T, k, 1
    raise ValueError(f"x must have shape [T, K] or [T, k, K], got {tuple(x.shape)}")


def moe_lora_linear(x: Tensor, expert_weight: Tensor, topk_ids: Tensor, lora_a: Tensor,
                    lora_b: Tensor, *, scaling: float = 1.0,
                    topk_weights: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """One expert projection with per-expert LoRA over a router's top-k choice.

    ``x``: ``[T, K]`` (all k pairs of token t read row t: gate/up) or ``[T, k, K]`` (pair
    (t, j) reads its own row: down, on the activated intermediate). ``expert_weight [E, N, K]``
    (frozen), ``topk_ids [T, k]`` integer expert ids, ``lora_a [E, r, K]``, ``lora_b [E, N, r]``
    (fp32 factors on a bf16 base are cast; their grads come back fp32).

    Returns ``[T, k, N]`` per pair, or with ``topk_weights [T, k]`` the gate-weighted sum
    over the pairs, ``[T, N]`` (differentiable in the weights too). Differentiable in x,
    lora_a and lora_b.
    """
    E, N, K, T, k, group = _check_routing(x, expert_weight, topk_ids, lora_a, lora_b, 3)
    r = lora_a.shape[1]
    V.shape("lora_a", lora_a, (E, None, K), "[E, r, K]")
    V.shape("lora_b", lora_b, (E, N, r), "[E, N, r]")
    if topk_weights is not None:
        V.tensor("topk_weights", topk_weights, 2)
        V.shape("topk_weights", topk_weights, (T, k), "[T, k]")
    V.same_device("x", x, expert_weight=expert_weight, topk_ids=topk_ids, lora_a=lora_a,
                  lora_b=lora_b, topk_weights=topk_weights)
    _check_id_range(topk_ids, E)
    if expert_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("expert_weight must be frozen (requires_grad=False): the MoE-LoRA op "
                         "trains the LoRA factors (and x), not the base experts")
    scaling = V.scalar("scaling", scaling)
    dtype = V.compute_dtype(x, expert_weight)
    x2 = x.reshape(T * k if group == 1 else T, K)
    V.check_index_math("x", T * k)
    name = _backend.resolve_for(backend, x2, "moe_lora_linear")
    sorted_pairs, offsets = moe_plan(topk_ids, E)
    args = (x2.contiguous(), expert_weight, V.dense(lora_a, dtype), V.dense(lora_b, dtype),
            sorted_pairs, offsets, group, scaling, name)
    if _backend.plain_eager(x, lora_a, lora_b, topk_weights):
        y, _ = _forward(*args)  # inference: skip the custom-op dispatch, same kernels
    else:
        y, _ = torch.ops.lora_kernels.moe_lora_linear(*args)
    y = y.view(T, k, N)
    if topk_weights is None:
        return y
    return (y * topk_weights.to(y.dtype)[..., None]).sum(1)


# ------------------------------------------------------------------------------------------
# Multi-adapter variant (serving): each token also carries an adapter slot
# ------------------------------------------------------------------------------------------
def moe_multi_plan(topk_ids: Tensor, adapter_ids: Tensor, num_experts: int,
                   num_slots: int) -> tuple[Tensor, Tensor]:
    """``(sorted_pairs [P], offsets [E·(S+1) + 1])``: pairs sorted by (expert, slot), slot
    -1 (base only) first within an expert, so a segment tile has one expert and one
    adapter. Device ops only."""
    k = topk_ids.shape[1]
    slot = adapter_ids.to(torch.int64).repeat_interleave(k)
    key = topk_ids.reshape(-1).to(torch.int64) * (num_slots + 1) + slot + 1
    sorted_key, sorted_pairs = torch.sort(key, stable=True)
    bounds = torch.arange(num_experts * (num_slots + 1) + 1, dtype=torch.int64,
                          device=key.device)
    return sorted_pairs, torch.searchsorted(sorted_key, bounds)


@torch.library.custom_op("lora_kernels::moe_multi_lora_linear", mutates_args=())
def _moe_multi_op(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scalings: Tensor,
                  sorted_pairs: Tensor, offsets: Tensor, group: int, backend: str) -> Tensor:
    if sorted_pairs.shape[0] == 0:
        return x.new_empty(0, weight.shape[1])
    return _impl(backend, "moe_multi_lora_fwd")(x, weight, lora_a, lora_b, scalings,
                                                sorted_pairs, offsets, group)


@_moe_multi_op.register_fake
def _(x, weight, lora_a, lora_b, scalings, sorted_pairs, offsets, group, backend):
    return x.new_empty(sorted_pairs.shape[0], weight.shape[1])


def moe_multi_lora_linear(x: Tensor, expert_weight: Tensor, topk_ids: Tensor, lora_a: Tensor,
                          lora_b: Tensor, adapter_ids: Tensor, *, scalings,
                          topk_weights: Optional[Tensor] = None,
                          backend: str = "auto") -> Tensor:
    """:func:`moe_lora_linear` for a batch of adapters (inference; no autograd): token t uses
    slot ``adapter_ids[t]`` of ``lora_a [S, E, r, K]`` / ``lora_b [S, E, N, r]`` with scaling
    ``scalings[slot]`` (a float for all, or ``[S]``); slot -1 runs the base experts only.
    A grouped GEMM over (expert, slot) segments, the low-rank term in the accumulator."""
    E, N, K, T, k, _ = _check_routing(x, expert_weight, topk_ids, lora_a, lora_b, 4)
    S, r = lora_a.shape[0], lora_a.shape[2]
    V.shape("lora_a", lora_a, (None, E, None, K), "[S, E, r, K]")
    V.shape("lora_b", lora_b, (S, E, N, r), "[S, E, N, r]")
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype.is_floating_point or \
            adapter_ids.dtype == torch.bool or adapter_ids.shape != (T,):
        raise ValueError(f"adapter_ids must be an integer tensor of shape [T] = [{T}]")
    if isinstance(scalings, Tensor):
        V.shape("scalings", scalings, (S,), "[S]")
        scalings = scalings.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        scalings = torch.full((S,), V.scalar("scalings", scalings), dtype=torch.float32,
                              device=x.device)
    if topk_weights is not None:
        V.tensor("topk_weights", topk_weights, 2)
        V.shape("topk_weights", topk_weights, (T, k), "[T, k]")
    V.same_device("x", x, expert_weight=expert_weight, topk_ids=topk_ids, lora_a=lora_a,
                  lora_b=lora_b, adapter_ids=adapter_ids, topk_weights=topk_weights)
    _check_id_range(topk_ids, E)
    if T and not torch.compiler.is_compiling():
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= S:
            raise ValueError(f"adapter_ids must lie in [-1, {S}), got values in [{lo}, {hi}]")
    dtype = V.compute_dtype(x, expert_weight)
    group = k if x.dim() == 2 else 1
    x2 = x.reshape(T if group == k else T * k, K)
    name = _backend.resolve_for(backend, x2, "moe_multi_lora_linear")
    sorted_pairs, offsets = moe_multi_plan(topk_ids, adapter_ids, E, S)
    y = torch.ops.lora_kernels.moe_multi_lora_linear(
        x2.contiguous(), expert_weight, V.dense(lora_a, dtype), V.dense(lora_b, dtype),
        scalings, sorted_pairs, offsets, group, name).view(T, k, N)
    if topk_weights is None:
        return y
    return (y * topk_weights.to(y.dtype)[..., None]).sum(1)
