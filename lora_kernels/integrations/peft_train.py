"""Training several PEFT adapters at once: optimizer param groups per adapter, and one PEFT
adapter directory per adapter.

``adapter_param_groups(model, lr=1e-4, sql={"lr": 3e-4})`` gives every adapter its own group
(its own learning rate, weight decay, scheduler entry: ``LambdaLR`` takes one lambda per group),
so K adapters trained jointly in one batch (``model(..., adapter_names=[...])`` under
:func:`~lora_kernels.patch_peft_model`) follow K independent schedules with one optimizer.
Parameters are found through PEFT's own per-adapter containers (``adapter_layer_names`` of every
tuner layer and auxiliary wrapper: ``lora_A``, ``lora_B``, ``modules_to_save``, ...), never by
parsing names, and work through DDP/FSDP2 wrappers (which keep the module tree).
"""

from __future__ import annotations

import math
import warnings
from operator import attrgetter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from torch import nn

SHARED = "__shared__"  # trainable parameters that belong to no adapter


def _adapter_containers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            for attr in module.adapter_layer_names:
                try:
                    container = attrgetter(attr)(module)
                except AttributeError:
                    continue
                yield container


def adapter_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{adapter: [parameters]}`` in module order, every parameter once (trainable or not)."""
    out: dict[str, list] = {}
    seen: set = set()
    for container in _adapter_containers(model):
        for name, item in container.items():
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.setdefault(name, []).append(p)
    return out


def _check_options(what: str, opts) -> dict:
    if not isinstance(opts, Mapping):
        raise TypeError(f"{what} must be a dict of optimizer options (e.g. {{'lr': 1e-4}}), got "
                        f"{type(opts).__name__}")
    if "params" in opts:
        raise ValueError(f"{what} must not set 'params': the parameters are the adapter's own")
    return dict(opts)


def adapter_param_groups(model: nn.Module, lr: Optional[float] = None, *,
                         adapters: Optional[Sequence[str]] = None,
                         overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                         **per_adapter: Mapping[str, Any]) -> list[dict]:
    """Optimizer param groups, one per adapter: ``[{"params": [...], "adapter": name, ...}]``.

    ``lr``: every group's learning rate (omit to use the optimizer's default). Per-adapter
    options, e.g. ``{"lr": 3e-4, "weight_decay": 0.0}``, come as keywords named after the
    adapter (``sql={...}``) or, for names that are not identifiers, in ``overrides``.
    ``adapters``: which adapters (default: every adapter with trainable parameters, sorted by
    name so every DDP rank builds the same groups). Only trainable parameters are included; an
    adapter asked for by name with none trainable is an error (PEFT trains only the active
    adapter unless told otherwise: ``model.set_requires_grad([...], True)``). Trainable
    parameters that belong to no adapter get a last group, ``"adapter": "__shared__"``.
    """
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or
                           not math.isfinite(lr) or lr < 0):
        raise ValueError(f"lr must be a non-negative float, got {lr!r}")
    options = {}
    for key, opts in {**dict(overrides or {}), **per_adapter}.items():
        options[key] = _check_options(f"options for adapter {key!r}", opts)
    params = adapter_parameters(model)
    if not params:
        raise ValueError("adapter_param_groups found no PEFT adapter parameters in the model "
                         "(expected a PeftModel, possibly wrapped by DDP/FSDP)")
    unknown = sorted(set(options) - set(params))
    if adapters is not None:
        if isinstance(adapters, str):
            raise TypeError("adapters must be a sequence of adapter names, not one string")
        unknown += sorted(set(adapters) - set(params) - set(unknown))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(params)}")
    chosen = sorted(params) if adapters is None else list(dict.fromkeys(adapters))
    groups, frozen = [], []
    for name in chosen:
        trainable = [p for p in params[name] if p.requires_grad]
        if not trainable:
            if adapters is not None or name in options:
                raise ValueError(f"adapter {name!r} has no trainable parameters; call "
                                 f"model.set_requires_grad([{name!r}], True) first")
            frozen.append(name)
            continue
        group = {"params": trainable, "adapter": name}
        if lr is not None:
            group["lr"] = float(lr)
        group.update(options.get(name, {}))
        groups.append(group)
    if frozen:
        warnings.warn(f"adapter_param_groups: adapter(s) {frozen} have no trainable parameters "
                      f"and get no group (PEFT trains only the active adapter by default; "
                      f"model.set_requires_grad({frozen}, True) makes them trainable)",
                      RuntimeWarning, stacklevel=2)
    owned = {id(p) for ps in params.values() for p in ps}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    if shared:
        group = {"params": shared, "adapter": SHARED}
        if lr is not None:
            group["lr"] = float(lr)
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------
def _tuner(model: nn.Module):
    from lora_kernels.integrations.peft_joint import find_tuners
    tuners = find_tuners(model)
    if len(tuners) != 1:
        raise ValueError(f"expected one PEFT LoRA model inside model, found {len(tuners)}")
    return tuners[0]


def _config_dict(config) -> dict:
    d = config.to_dict()
    for k, v in d.items():
        if isinstance(v, (set, frozenset)):
            d[k] = sorted(v)
    d["peft_type"] = str(getattr(d.get("peft_type"), "value", d.get("peft_type")))
    if d.get("task_type") is not None:
        d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    d["inference_mode"] = True  # what PEFT's save_pretrained writes
    return d


def _full(t):
    # FSDP2 shards parameters as DTensors: gather (a collective - every rank must save).
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_peft_adapters(model: nn.Module, directory, adapters: Optional[Sequence[str]] = None
                       ) -> dict[str, Path]:
    """Write each adapter of a PEFT LoRA ``model`` as its own PEFT adapter directory,
    ``directory/<adapter>/`` (``PeftModel.from_pretrained(base, directory/<adapter>)`` loads
    it). Returns ``{adapter: path}``. Uses :func:`lora_kernels.save_peft_adapter` (atomic
    writes, checked config). Under FSDP2 every rank must call it (the gather is collective)."""
    from lora_kernels.adapters.peft_format import AdapterConfig, save_peft_adapter
    from peft.tuners.lora import LoraLayer
    tuner = _tuner(model)
    if isinstance(adapters, str):
        raise TypeError("adapters must be a sequence of adapter names, not one string")
    names = sorted(tuner.peft_config) if adapters is None else list(adapters)
    missing = sorted(set(names) - set(tuner.peft_config))
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; the model has {sorted(tuner.peft_config)}")
    tensors: dict[str, dict] = {n: {} for n in names}
    for path, layer in tuner.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for n in names:
            if n in layer.lora_A:
                tensors[n][f"{path}.lora_A.weight"] = _full(layer.lora_A[n].weight)
                tensors[n][f"{path}.lora_B.weight"] = _full(layer.lora_B[n].weight)
    # every config checked before the first file is written: a rejected call writes nothing
    configs = {n: AdapterConfig.from_dict(_config_dict(tuner.peft_config[n]),
                                          source=f"adapter {n!r}'s LoraConfig") for n in names}
    return {n: save_peft_adapter(Path(directory) / n, tensors[n], configs[n]) for n in names}
