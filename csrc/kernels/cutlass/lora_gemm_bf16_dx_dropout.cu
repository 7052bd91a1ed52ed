// CUTLASS sm90 dX with dropout, bf16 (lora_gemm_dx_dropout.cuh); one instantiation per file.
#include "kernels/cutlass/lora_gemm_dx_dropout.cuh"

LK_LORA_DX_DROPOUT_INSTANTIATE(__nv_bfloat16)
