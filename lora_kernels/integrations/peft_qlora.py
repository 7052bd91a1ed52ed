"""PEFT LoRA layers over a bitsandbytes NF4 ``Linear4bit`` (QLoRA; the generic ``lora.Linear``
PEFT builds on CPU, or PEFT's ``lora.bnb.Linear4bit`` for a model loaded in 4 bit): what
integrations/peft.py needs to fuse them with
:func:`lora_kernels.ops.lora_linear_nf4.lora_linear_nf4`.

PEFT over ``Linear4bit`` computes ``base(x) + Σ B(A(drop(x)))·s`` where ``base`` casts x to the
layer's ``compute_dtype``, dequantizes the whole W (``dequantize_4bit(...).to(x.dtype)``, an
N×K tensor every call, forward and backward) and casts the result back to x's dtype. We run
the same math in the compute dtype from the 4-bit storage (the LoRA factors cast to it) and
cast back. bitsandbytes is never imported here: the base is recognised by its class and read
through ``weight.quant_state``.

Mixed batches (``adapter_names=``, inference, and training under the joint-training hook of
peft_joint.py) run as one :func:`lora_kernels.multi_lora_linear` over the same storage (an
``NF4Weight`` base: ops/multi_lora_quant.py), in the compute dtype, cast back to x's dtype,
each adapter with its own dropout (the per-token mask of ops/multi_lora_dropout.py; PEFT's own
mixed forward over Linear4bit cannot backward at all: it adds in place into MatMul4Bit's
output).

Not fused (PEFT's forward, with the reason): FP4, an unquantized weight, a weight repacked for
bitsandbytes' CPU inference kernel (``packing_format_for_cpu``, after an eval-mode CPU forward
on AVX512-BF16 machines); DoRA adapters in mixed batches.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lora_kernels.ops.nf4 import NF4Weight, from_params4bit

__all__ = ["is_nf4_base", "is_peft_bnb_4bit", "base_reason", "base_operands", "mixed_reason",
           "NF4Weight"]


def is_nf4_base(base: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or subclass) with its own forward."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(base).__mro__)


def is_peft_bnb_4bit(layer: nn.Module) -> bool:
    """PEFT's own QLoRA layer class (``peft.tuners.lora.bnb.Linear4bit``, what
    ``get_peft_model`` builds over a model loaded in 4 bit), not a subclass: its forward is
    lora.Linear's, branch for branch, plus a defensive clone of the base result."""
    cls = type(layer)
    return cls.__name__ == "Linear4bit" and cls.__module__ == "peft.tuners.lora.bnb"


def _state(base: nn.Module):
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


def base_reason(base: nn.Module) -> Optional[str]:
    """None if the Linear4bit base can be fused now, else why not."""
    qs = _state(base)
    if qs is None:
        return "its Linear4bit weight is not quantized yet (move the model to its device first)"
    if qs.quant_type != "nf4":
        return f"its Linear4bit uses quant_type={qs.quant_type!r} (only NF4 is fused)"
    if getattr(qs, "packing_format_for_cpu", False):
        return "its Linear4bit weight was repacked for bitsandbytes' CPU inference kernel"
    if base._forward_hooks or base._forward_pre_hooks:
        return "its base layer has forward hooks, which the fused op would skip"
    return None


def base_operands(layer: nn.Module, x: Tensor):
    """``(NF4Weight, bias, x in the compute dtype)`` or ``(reason, None, None)``."""
    base = layer.base_layer
    why = base_reason(base)
    if why is not None:
        return why, None, None
    if getattr(base.weight, "quant_state", None) is None:
        base.weight.quant_state = base.quant_state  # what Linear4bit.forward restores too
    dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return from_params4bit(base.weight), base.bias, x.to(dtype)


def mixed_reason(layer: nn.Module, used) -> Optional[str]:
    """None if a mixed batch over this NF4 layer can run fused, else why not. ``used``: the
    adapters of the batch this layer has."""
    for name in sorted(used):
        if name in getattr(layer, "lora_variant", {}):
            return (f"adapter '{name}' is a LoRA variant (DoRA...) over a bitsandbytes 4-bit "
                    f"base, which is not fused in mixed batches")
    return base_reason(layer.base_layer)
