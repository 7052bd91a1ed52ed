// Fused LoRA GEMM, __nv_bfloat16, dX layout (w [K, N], v [r, N]).
#include "fused_gemm.cuh"

LK_INSTANTIATE_FUSED_GEMM(__nv_bfloat16, true)
