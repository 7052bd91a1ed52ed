"""Loads the compiled extension ``lora_kernels._C`` once; keeps (not raises) why it failed.

Loading the .so runs its static registrations: the op schemas (defined once, in csrc/) and their
CUDA kernels appear under ``torch.ops.lora_kernels.cuda_*``.
"""

from __future__ import annotations

from typing import Optional

import torch

BUILD_HINT = ("build it with `make ext` (or `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation "
              "-e .`) on a machine with nvcc and a CUDA build of torch")
CUTLASS_HINT = ("install CUTLASS's headers (`pip install --no-deps nvidia-cutlass==4.2.0.0`) and "
                "rebuild with TORCH_CUDA_ARCH_LIST containing 9.0a")
CUTLASS_OP = "lora_kernels::cuda_cutlass_lora_gemm"


def _load() -> Optional[str]:
    try:
        from lora_kernels import _C  # noqa: F401  (loading the .so registers the ops)
    except ImportError as exc:
        return f"the CUDA extension lora_kernels._C is not built ({exc}); {BUILD_HINT}"
    except OSError as exc:  # built against another torch: undefined symbols
        return f"the CUDA extension lora_kernels._C does not load ({exc}); rebuild it: {BUILD_HINT}"
    return None


LOAD_ERROR = _load()


def why_unavailable() -> Optional[str]:
    """None if the extension is loaded, else why not and how to build it."""
    return LOAD_ERROR


def why_no_cutlass() -> Optional[str]:
    """None if the extension has the CUTLASS sm90 kernels, else why not. setup.py registers
    their CUDA implementation only when it found CUTLASS's headers; the schema always exists."""
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    if (CUTLASS_OP not in torch._C._dispatch_get_all_op_names()
            or not torch._C._dispatch_has_kernel_for_dispatch_key(CUTLASS_OP, "CUDA")):
        return f"the extension was built without the CUTLASS sm90 kernels; {CUTLASS_HINT}"
    return None


def ops():
    """``torch.ops.lora_kernels``, or the load error as a RuntimeError."""
    if LOAD_ERROR is not None:
        raise RuntimeError(LOAD_ERROR)
    return torch.ops.lora_kernels
