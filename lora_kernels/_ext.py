"""Lazy loader of the compiled CUDA extension (``lora_kernels._C``)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def why_unavailable():
    try:
        from lora_kernels import _C  # noqa: F401
    except ImportError as exc:
        return (f"the CUDA extension lora_kernels._C is not built ({exc}); build it with "
                f"`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` on a machine "
                f"with nvcc and a CUDA build of torch")
    return None
