"""lora-kernels: fused LoRA kernels (Triton and CUDA C++) for PyTorch."""

from lora_kernels.ops import (BackendUnavailableError, LoRABatch, lora_expand, lora_linear,
                              lora_shrink, multi_lora_linear)

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "LoRABatch", "lora_expand", "lora_linear", "lora_shrink",
           "multi_lora_linear", "__version__"]
