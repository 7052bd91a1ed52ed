"""lora-kernels: fused LoRA kernels (Triton and CUDA C++) for PyTorch.

Public API: functional ops (``lora_linear``, ``multi_lora_linear``, ``lora_shrink``,
``lora_expand``), batch metadata (``LoRABatch``), modules (``LoRALinear``, ``MultiLoRALinear``...),
adapter files and pools, and ``patch_peft_model``. The README has a tour; ``lora-kernels info``
says which backends run here.
"""

from lora_kernels.nn import (LoRALinear, MultiLoRALinear, PackedLoRALinear, inject_lora,
                             lora_state_dict, mark_only_lora_as_trainable, merge_lora,
                             set_lora_batch, unmerge_lora, use_lora_batch)
from lora_kernels.ops import (BackendUnavailableError, LoRABatch, dora_linear, lora_expand,
                              lora_linear, lora_shrink, moe_lora_linear, moe_multi_lora_linear,
                              multi_lora_linear)
from lora_kernels.adapters import AdapterPool, load_peft_adapter, save_peft_adapter
from lora_kernels.integrations import adapter_param_groups, patch_peft_model, save_peft_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterPool", "BackendUnavailableError", "LoRABatch", "LoRALinear", "MultiLoRALinear",
    "PackedLoRALinear", "adapter_param_groups", "dora_linear", "inject_lora", "load_peft_adapter",
    "lora_expand", "lora_linear",
    "lora_shrink", "lora_state_dict", "mark_only_lora_as_trainable", "merge_lora",
    "moe_lora_linear", "moe_multi_lora_linear", "multi_lora_linear", "patch_peft_model",
    "save_peft_adapter", "save_peft_adapters", "set_lora_batch",
    "unmerge_lora", "use_lora_batch", "__version__",
]
