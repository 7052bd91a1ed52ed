"""PEFT LoRA over an FP8 e4m3 base (:class:`lora_kernels.nn.FP8Linear`).

PEFT has no FP8 linear of its own: ``get_peft_model`` refuses a module type it does not know.
Its custom-module dispatch (``LoraConfig._register_custom_module``) takes a LoRA layer class per
base type, so :func:`register_fp8_lora` maps ``FP8Linear`` to :func:`fp8_lora_layer_class`'s
``FP8LoraLinear``: PEFT's own ``lora.Linear`` (the forward, adapters, dropout, scaling, mixed
batches, ``save_pretrained`` with PEFT's key names all PEFT's), with only what an FP8 base
changes:

* in/out features read from the base (PEFT's table does not know the class);
* ``merge`` / ``unmerge`` dequantize the rows, add (subtract) ``B·A·s`` in fp32 and re-quantize
  to e4m3 with fresh per-row scales. That is lossy, as PEFT's merge into a bitsandbytes 4-bit
  base is, and it warns the same way; the unmerged weight is not bit-identical to the original;
* DoRA is refused at creation (its weight norm needs a dense W0).

Unpatched, a layer runs ``FP8Linear`` (the fused FP8 op at rank 0) plus PEFT's torch LoRA
branch. ``patch_peft_model`` then runs each such layer as one
:func:`~lora_kernels.ops.lora_linear_fp8.lora_linear_fp8` call (LoRA fused with the fp8 GEMM),
and mixed batches (``adapter_names=``) as one ``multi_lora_linear`` over the FP8 storage. PEFT
is imported only when the layer class is asked for.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from lora_kernels.nn.fp8_linear import FP8Linear
from lora_kernels.ops.fp8 import FP8Weight, dequantize, quantize_fp8

__all__ = ["register_fp8_lora", "fp8_lora_layer_class", "is_fp8_base", "base_reason",
           "mixed_reason", "base_operands", "FP8Weight"]


def is_fp8_base(base: nn.Module) -> bool:
    return isinstance(base, FP8Linear) and type(base).forward is FP8Linear.forward


def base_reason(base: nn.Module) -> Optional[str]:
    """None if the FP8Linear base can be fused, else why not."""
    if base._forward_hooks or base._forward_pre_hooks:
        return "its base layer has forward hooks, which the fused op would skip"
    return None


def mixed_reason(layer: nn.Module, used) -> Optional[str]:
    """None if a mixed batch over this FP8 layer can run fused, else why not."""
    for name in sorted(used):
        if name in getattr(layer, "lora_variant", {}):
            return (f"adapter '{name}' is a LoRA variant over an FP8 base, which is not fused "
                    f"in mixed batches")
    if layer.base_layer.act_quant is not None:  # multi_lora_linear has weight-only FP8 only
        return (f"its FP8Linear base quantizes activations (act_quant="
                f"{layer.base_layer.act_quant!r}), which mixed batches do not fuse")
    return base_reason(layer.base_layer)


def base_operands(layer: nn.Module, x: Tensor):
    """``(FP8Weight, bias, x in the compute dtype)``; under autocast the autocast dtype (what
    autocast would give F.linear), else x's own dtype (what FP8Linear computes in)."""
    base = layer.base_layer
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return base.fp8_weight, base.bias, x


def _requantize(base: FP8Linear, weight: Tensor) -> None:
    """Write ``weight`` (fp32 ``[N, K]``) back into the base as e4m3 codes + per-row scales."""
    q = quantize_fp8(weight)
    base.weight.copy_(q.codes.view(base.weight.dtype))
    base.weight_scale.copy_(q.scale)


@functools.lru_cache(maxsize=None)
def fp8_lora_layer_class():
    """PEFT's ``lora.Linear`` over an :class:`FP8Linear` (built on first use: PEFT is optional)."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - peft is an optional extra
        raise ImportError("FP8 LoRA layers for PEFT need PEFT: pip install 'lora-kernels[peft]'") \
            from exc

    class FP8LoraLinear(lora_layer.Linear):
        """``lora.Linear`` with an FP8 e4m3 base; see :mod:`lora_kernels.integrations.peft_fp8`."""

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            if getattr(config, "use_dora", False) or kwargs.get("use_dora", False):
                raise ValueError("use_dora=True is not supported over an FP8Linear base (DoRA's "
                                 "weight norm needs a dense W0); quantize after training or "
                                 "use plain LoRA")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def _merge_into_base(self, adapters, sign: float, safe: bool) -> None:
            base = self.get_base_layer()
            w = dequantize(base.fp8_weight, torch.float32)
            for a in adapters:
                w = w + sign * self.get_delta_weight(a).to(device=w.device, dtype=torch.float32)
            if safe and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                 f"{adapters[-1]} seems to be broken")
            _requantize(base, w)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not names:
                return
            for a in names:
                if self.lora_bias.get(a, False):
                    raise ValueError(f"adapter '{a}' has lora_bias=True, which cannot be merged "
                                     f"into an FP8Linear base")
            warnings.warn("Merging LoRA into an FP8 (e4m3) base re-quantizes the weight: outputs "
                          "differ from the unmerged model by FP8 rounding, and unmerge does not "
                          "restore the original codes exactly.", UserWarning, stacklevel=2)
            self._merge_into_base(names, 1.0, safe_merge)
            self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            names = [a for a in reversed(self.merged_adapters) if a in self.lora_A]
            self._merge_into_base(names, -1.0, False)
            self.merged_adapters.clear()

    FP8LoraLinear.__module__ = __name__
    return FP8LoraLinear


def register_fp8_lora(config):
    """Let PEFT put LoRA on :class:`FP8Linear` modules: registers the FP8 layer class in
    ``config`` (a ``peft.LoraConfig``) and returns it, e.g.
    ``get_peft_model(quantize_linears_fp8(model), register_fp8_lora(LoraConfig(...)))``."""
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise TypeError(f"config must be a peft.LoraConfig (PEFT ≥ 0.13), got "
                        f"{type(config).__name__}")
    register({FP8Linear: fp8_lora_layer_class()})
    return config
