"""PEFT's DoRA adapters (``LoraConfig(use_dora=True)``) on :func:`lora_kernels.dora_linear`.

PEFT's ``DoraLinearVariant.forward`` computes, per active DoRA adapter, ``result + (c − 1)⊙base +
c⊙s·lora(drop(x))`` where ``base`` is the layer's output so far minus the bias (no dropout) or
``drop(x)·W0ᵀ`` (dropout), and builds ``B·A`` and ``W0 + s·B·A`` [N, K] every call for the norm.
Here:

* **one active adapter, DoRA** (the common case): one ``dora_linear`` call (same semantics,
  dropout included, no N×K temporary);
* **several active adapters, DoRA first**: ``dora_linear`` for it, the plain adapters after it
  added PEFT's way. A DoRA adapter *after* others rescales their contributions in PEFT (its
  ``base`` includes them), which the op does not express: that layer keeps PEFT's forward;
* **mixed batches** (``adapter_names=``), which PEFT refuses for DoRA ("Cannot pass
  `adapter_names` when DoRA is enabled"): here each sample gets its adapter's forward as if that
  adapter alone were active (PEFT's single-adapter DoRA semantics). The samples of each DoRA
  adapter go through ``dora_linear`` as a sub-batch (rows gathered unless contiguous), the
  others through the grouped multi-adapter op, and the rows are put back in order.

``‖W0_n‖²`` is cached on the frozen base weight; a training step computes the norm from it with one
``W0·Aᵀ`` [N, r] GEMM. Inference (autograd reaching none of W0, A, B) caches the norm itself per
adapter, invalidated by the version counters of W0, A and B, so decoding does not re-read W0 for
it (writes through ``.data`` bypass the counters and are not seen). Merge/unmerge stay PEFT's.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.ops import dora_linear
from lora_kernels.ops.dora import row_sq_norm, weight_norm

# id(Parameter) -> (weakref to it, validity key, value): ‖W0_n‖² on base weights, the DoRA norm on
# magnitudes; entries die with the Parameter. (A WeakKeyDictionary would compare tensors with ==
# on hash collisions.)
_CACHE: dict = {}


def is_dora(layer: nn.Module, adapter: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(adapter, False))


def dora_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """None if DoRA adapter ``adapter`` of ``layer`` is PEFT's plain Linear DoRA, else why not."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant
    variant = layer.lora_variant.get(adapter)
    if type(variant) is not DoraLinearVariant and variant is not DoraLinearVariant:
        return f"adapter '{adapter}' uses DoRA through {type(variant).__name__}, which is not fused"
    mags = getattr(layer, "lora_magnitude_vector", None)
    dora = mags[adapter] if mags is not None and adapter in mags else None
    if type(dora) is not DoraLinearLayer or "forward" in dora.__dict__ or \
            getattr(dora, "weight", None) is None or dora.weight.dim() != 1:
        return f"adapter '{adapter}': its DoRA magnitude module is not PEFT's DoraLinearLayer"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return f"adapter '{adapter}': DoRA with ephemeral_gpu_offload is not fused"
    return None


def check_kwargs(layer: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` for PEFT's ``_check_forward_args`` with DoRA adapters in ``adapter_names``
    shown as ``"__base__"``: PEFT refuses DoRA in mixed batches (it has no sub-batch DoRA
    path to offer); here they run, so only its other checks (lengths, merged layers) apply."""
    names = kwargs.get("adapter_names")
    if names is None or not any(is_dora(layer, n) for n in set(names)):
        return kwargs
    return {**kwargs, "adapter_names": ["__base__" if is_dora(layer, n) else n for n in names]}


def active_reason(layer: nn.Module, active: Sequence[str]) -> Optional[str]:
    """None if the active adapters' order lets the op run them (DoRA only in first place)."""
    later = [a for a in active[1:] if is_dora(layer, a)]
    if later:
        return (f"DoRA adapter '{later[0]}' is active after other adapters (PEFT rescales their "
                f"output by its magnitude factor); only a DoRA adapter first in the active "
                f"list is fused")
    return None


def _cached(param: Tensor, key: tuple, build):
    """``build()`` cached on ``param`` (by id, dropped when it dies) while ``key`` holds."""
    hit = _CACHE.get(id(param))
    if hit is not None and hit[0]() is param and hit[1] == key:
        return hit[2]
    if hit is None or hit[0]() is not param:
        weakref.finalize(param, _CACHE.pop, id(param), None)
    value = build()
    _CACHE[id(param)] = (weakref.ref(param), key, value)
    return value


def _version(t: Tensor) -> tuple:
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype)


def _dora_norm(layer: nn.Module, weight: Tensor, adapter: str) -> Optional[Tensor]:
    """``‖W0_n + s·(B·A)_n‖`` for the operand ``weight`` (the base weight, maybe a Conv1D ``.t()``
    view or an autocast copy) and the adapter's factors, cached on its magnitude Parameter while
    the base weight, A, B (storage, version counters) and the scaling are unchanged; ``‖W0_n‖²``
    is cached on the base Parameter. None under torch.compile (the op computes both in-graph)."""
    if torch.compiler.is_compiling():
        return None
    param = layer.base_layer.weight
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = float(layer.scaling[adapter])
    base_key = (*_version(param), weight.dtype, weight.device, tuple(weight.shape),
                torch.is_inference_mode_enabled())
    sq = _cached(param, base_key, lambda: row_sq_norm(weight))
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or param.requires_grad):
        # training: fresh each step (optimizers writing through .data bypass version counters)
        return weight_norm(weight, a.to(weight.dtype), b.to(weight.dtype), scaling,
                           weight_sq_norm=sq)
    key = (base_key, _version(a), _version(b), scaling)
    return _cached(layer.lora_magnitude_vector[adapter].weight, key,
                   lambda: weight_norm(weight, a.to(weight.dtype), b.to(weight.dtype), scaling,
                                       weight_sq_norm=sq))


def dora_dropout_p(layer: nn.Module, adapter: str) -> float:
    drop = layer.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def dora_one(layer: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter: str,
             backend: str) -> Tensor:
    """Base layer + DoRA adapter ``adapter`` in one op (PEFT's ``DoraLinearVariant.forward``)."""
    p = dora_dropout_p(layer, adapter)
    return dora_linear(x, weight, bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                       layer.lora_magnitude_vector[adapter].weight,
                       scaling=float(layer.scaling[adapter]), dropout_p=p, training=p > 0.0,
                       backend=backend, dora_norm=_dora_norm(layer, weight, adapter))


def active_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   active: Sequence[str], backend: str) -> Tensor:
    """The active adapters with a DoRA adapter first (:func:`active_reason` is None)."""
    y = dora_one(layer, x, weight, bias, active[0], backend)
    for a in active[1:]:  # plain LoRA after it: PEFT adds each term to the running result
        xa = layer.lora_dropout[a](x.to(layer.lora_A[a].weight.dtype))
        y = y + (layer.lora_B[a](layer.lora_A[a](xa)) * float(layer.scaling[a])).to(y.dtype)
    return y


def mixed_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  adapter_names: Sequence[str], backend: str,
                  plain: Callable[[Tensor, list], Tensor]) -> Tensor:
    """A mixed batch with DoRA adapters: each DoRA adapter's samples run ``dora_linear`` on
    their sub-batch, every other sample goes through ``plain(x_rows, names_of_rows)`` (the
    grouped multi-adapter op), and the rows are written back in their places."""
    names = list(adapter_names)
    dora_names = sorted({n for n in names if n in layer.lora_A and is_dora(layer, n)})
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    groups = [(n, [i for i, m in enumerate(names) if m == n]) for n in dora_names]
    rest = [i for i, m in enumerate(names) if m not in dora_names]
    if rest:
        groups.append((None, rest))
    parts = []
    for name, rows in groups:
        sub = _rows(x, rows)
        if name is not None:
            y = dora_one(layer, sub, weight, bias, name, backend)
        elif any(names[i] in layer.lora_A for i in rows):
            y = plain(sub, [names[i] for i in rows])
        else:  # base-only samples
            y = F.linear(sub, weight, bias)
        parts.append((rows, y))
    if not torch.is_grad_enabled() or not any(y.requires_grad for _, y in parts):
        for rows, y in parts:
            out[_index(rows)] = y
        return out
    # Differentiable reassembly: one cat and one gather by the inverse permutation.
    order = [i for rows, _ in parts for i in rows]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat([y for _, y in parts]).index_select(0, inverse.to(x.device))


def _index(rows: list):
    """A slice for a contiguous run of samples (a view, no gather), else the index list."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows)


def _rows(x: Tensor, rows: list) -> Tensor:
    idx = _index(rows)
    return x[idx] if isinstance(idx, slice) else x.index_select(0, idx.to(x.device))
