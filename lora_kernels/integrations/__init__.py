"""Integrations with other libraries. Importing this package does not import PEFT or
transformers; :func:`patch_peft_model` imports PEFT when called."""

from lora_kernels.integrations.peft import (LoRAKernelsFallbackWarning, PeftPatchHandle,
                                            patch_peft_model)
from lora_kernels.integrations.peft_train import adapter_param_groups, save_peft_adapters

__all__ = ["LoRAKernelsFallbackWarning", "PeftPatchHandle", "adapter_param_groups",
           "patch_peft_model", "save_peft_adapters"]
