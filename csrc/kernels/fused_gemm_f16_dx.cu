// Fused LoRA GEMM, __half, dX layout (w [K, N], v [r, N]).
#include "fused_gemm.cuh"

LK_INSTANTIATE_FUSED_GEMM(__half, true)
