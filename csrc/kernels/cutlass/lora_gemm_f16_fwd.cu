// CUTLASS sm90 fused LoRA GEMM, f16 fwd (lora_gemm_sm90.cuh); one instantiation per file.
#include "kernels/cutlass/lora_gemm_sm90.cuh"

LK_LORA_GEMM_INSTANTIATE(__half, false)
