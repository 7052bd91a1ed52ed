"""Ops: validation, ``torch.library`` registration (namespace ``lora_kernels``), autograd and
backend dispatch. Stateless."""

from lora_kernels.ops.backend import BackendUnavailableError
from lora_kernels.ops.batch import LoRABatch
from lora_kernels.ops.dora import dora_linear
from lora_kernels.ops.lora_linear import block_diag_lora_b, lora_linear
from lora_kernels.ops.lora_linear_fp8 import lora_linear_fp8
from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4
from lora_kernels.ops.moe_lora import moe_lora_linear, moe_multi_lora_linear
from lora_kernels.ops.multi_lora import lora_expand, lora_shrink, multi_lora_linear

__all__ = ["BackendUnavailableError", "LoRABatch", "block_diag_lora_b", "dora_linear",
           "lora_linear", "lora_linear_fp8", "lora_linear_nf4", "lora_expand", "lora_shrink", "moe_lora_linear",
           "moe_multi_lora_linear", "multi_lora_linear"]
