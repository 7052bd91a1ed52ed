"""Model surgery: put LoRA layers into a model, pick what trains, export and merge."""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lora_kernels.nn.lora_linear import LoRALinear, PackedLoRALinear, LoRABase, is_conv1d
from lora_kernels.nn.multi_lora import MultiLoRALinear

Targets = Union[str, Sequence[str]]


def matches_targets(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a full-match regex on the module path; a list matches a module
    whose path equals an entry or ends with ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_bias_mode(bias) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, target_modules: Targets, r: int,
                lora_alpha: Optional[float] = None, lora_dropout: float = 0.0,
                use_rslora: bool = False, backend: str = "auto",
                enable_lora: Optional[Mapping[str, Sequence[bool]]] = None) -> nn.Module:
    """Replace every matching ``nn.Linear`` / transformers ``Conv1D`` with a ``LoRALinear``
    sharing its weight (in place; returns ``model``).

    ``enable_lora`` maps a target name to per-slice flags for packed projections, e.g.
    ``{"c_attn": [True, False, True]}`` puts LoRA on GPT-2's q and v only (loralib's
    ``MergedLinear``). Raises ``ValueError`` naming ``target_modules`` when nothing matches.
    """
    _check_model(model)
    if not isinstance(target_modules, (str, list, tuple)) or not target_modules:
        raise TypeError(f"target_modules must be a regex string or a non-empty list of names, "
                        f"got {target_modules!r}")
    enable_lora = dict(enable_lora or {})
    matched = [(n, m) for n, m in model.named_modules() if n and matches_targets(n, target_modules)]
    # Build every replacement before swapping any in: a layer that fails (bad enable_lora
    # flags, say) leaves the model exactly as it was.
    # (from_linear freezes the shared base weight: undone too.)
    replacements = []
    frozen = [(p, p.requires_grad) for _, m in matched for p in m.parameters(recurse=False)]
    try:
        for name, module in matched:
            if isinstance(module, (LoRABase, MultiLoRALinear)) or not is_linear(module):
                continue
            flags = next((f for key, f in enable_lora.items()
                          if name == key or name.endswith("." + key)), None)
            kwargs = dict(lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          use_rslora=use_rslora, backend=backend)
            if flags is not None:
                new = PackedLoRALinear.from_linear(module, r, enable_lora=flags, **kwargs)
            else:
                new = LoRALinear.from_linear(module, r, **kwargs)
            replacements.append((name, module, new))
    except BaseException:
        for p, flag in frozen:
            p.requires_grad_(flag)
        raise
    if not replacements:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear/Conv1D in the model")
    for name, _, new in replacements:
        set_child(model, name, new)
    return model


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRABase)]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but the LoRA factors; ``bias``: ``"none"``, ``"all"`` (every bias
    trains) or ``"lora_only"`` (biases of LoRA layers train) — loralib's semantics."""
    _check_model(model)
    _check_bias_mode(bias)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, m in lora_modules(model):
            if m.bias is not None:
                m.bias.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key suffixes (``<module>.lora_A.weight``,
    ``<module>.lora_B.weight``, DoRA's ``<module>.lora_magnitude_vector``), plus biases per ``bias`` as in :func:`mark_only_lora_as_trainable`.

    This is lora-kernels' own checkpoint: ``model.load_state_dict(sd, strict=False)`` on a
    model with the same LoRA layers loads it back. It is *not* a PEFT checkpoint (no
    ``base_model.model.`` prefix, no config with ``r``/``lora_alpha``, packed layers keep their
    own layout), so PEFT's ``set_peft_model_state_dict`` does not load it. For PEFT use
    :func:`lora_kernels.save_peft_adapter` (a directory ``PeftModel.from_pretrained`` loads,
    config included)."""
    _check_model(model)
    _check_bias_mode(bias)
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k or
           k.startswith(("lora_A.", "lora_B.")) or k.endswith("lora_magnitude_vector")}
    if bias == "all":
        out.update({k: v for k, v in sd.items() if k.endswith("bias")})
    elif bias == "lora_only":
        for name, m in lora_modules(model):
            if m.bias is not None:
                out[f"{name}.bias" if name else "bias"] = m.bias.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer's ``s·B·A`` into its base weight (forward = plain linear)."""
    _check_model(model)
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    _check_model(model)
    for _, m in lora_modules(model):
        m.unmerge()
    return model
