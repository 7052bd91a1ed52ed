"""Environment and device facts the Triton backend needs, each defined once here: whether
the interpreter runs, the SM count, tl.dot's input precision for a dtype, and the device
guard for launches."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from lora_kernels.runtime import interpreting  # noqa: F401  (re-exported: the one definition)

__all__ = ["interpreting", "num_sms", "fp32_precision", "dot_precision", "on_device",
           "hw_cvt_ok"]


def fp32_precision() -> str:
    """tl.dot input precision for fp32 inputs, following torch's own switch for fp32 matmuls:
    ``torch.set_float32_matmul_precision("high")`` (or ``"medium"``) allows tf32 tensor cores
    (within the project's 5e-4 GPU fp32 tolerance), the default ``"highest"`` keeps exact fp32
    (CUDA-core FMAs, slow). ``LORA_KERNELS_FP32_PRECISION=tf32|ieee|tf32x3`` overrides."""
    env = os.environ.get("LORA_KERNELS_FP32_PRECISION", "").strip().lower()
    if env:
        return env
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    # For fp16/bf16 operands "tf32" is Triton's default and means "tensor cores": pass it, not
    # "ieee", which is only meaningful (and slow) for fp32.
    return fp32_precision() if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count (the interpreter pretends to have 2, so tiny test shapes still split)."""
    if device.type != "cuda":
        return 2
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def on_device(t: torch.Tensor):
    """Context making ``t``'s GPU current: Triton launches on torch's *current* device, so
    tensors on cuda:1 while cuda:0 is current would otherwise be read from the wrong GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def hw_cvt_ok(x: torch.Tensor) -> bool:
    """The device converts between fp32/fp16 and e4m3 in hardware (sm_89+: ``cvt`` with
    ``.e4m3x2``; never the interpreter, whose float8 emulation the integer paths avoid)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
