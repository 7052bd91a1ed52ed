"""Modules: drop-in LoRA layers, multi-adapter layers, and model surgery helpers."""

from lora_kernels.nn.fp8_linear import (FP8Linear, FP8LoRALinear, inject_lora_fp8,
                                        quantize_linears_fp8)
from lora_kernels.nn.inject import (inject_lora, lora_modules, lora_state_dict,
                                    mark_only_lora_as_trainable, merge_lora, unmerge_lora)
from lora_kernels.nn.lora_linear import LoRALinear, PackedLoRALinear, lora_scaling
from lora_kernels.nn.multi_lora import MultiLoRALinear, set_lora_batch, use_lora_batch

__all__ = ["FP8Linear", "FP8LoRALinear", "LoRALinear", "MultiLoRALinear", "PackedLoRALinear",
           "inject_lora", "inject_lora_fp8", "lora_modules", "lora_scaling", "lora_state_dict",
           "mark_only_lora_as_trainable", "merge_lora", "quantize_linears_fp8",
           "set_lora_batch", "unmerge_lora", "use_lora_batch"]
