"""Integrations with other libraries. Importing this package does not import PEFT or
transformers; :func:`patch_peft_model` imports PEFT when called."""

from lora_kernels.integrations.peft import (LoRAKernelsFallbackWarning, PeftPatchHandle,
                                            patch_peft_model)

__all__ = ["LoRAKernelsFallbackWarning", "PeftPatchHandle", "patch_peft_model"]
