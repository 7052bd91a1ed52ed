"""Adapters as files and as device-resident sets: PEFT-format load/save and ``AdapterPool``."""

from lora_kernels.adapters.peft_format import (AdapterConfig, AdapterFormatError,
                                               AdapterMismatchError, check_adapter,
                                               load_peft_adapter, save_peft_adapter)
from lora_kernels.adapters.pool import AdapterPool, PoolBatch, PoolBusyError

__all__ = ["AdapterConfig", "AdapterFormatError", "AdapterMismatchError", "AdapterPool",
           "PoolBatch", "PoolBusyError", "check_adapter", "load_peft_adapter",
           "save_peft_adapter"]
