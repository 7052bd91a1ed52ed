"""Triton backend: @triton.jit kernels and their launchers. No autograd, no validation here
(``lora_kernels.ops`` does both); the names re-exported below implement docs/BACKENDS.md."""

from lora_kernels.triton.lora_linear import *  # noqa: F401,F403  (single adapter)
from lora_kernels.triton.multi_lora import *  # noqa: F401,F403  (heterogeneous batches)
from lora_kernels.triton.dora import *  # noqa: F401,F403  (DoRA's column-scaled forward)
