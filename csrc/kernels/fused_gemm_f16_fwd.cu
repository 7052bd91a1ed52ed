// Fused LoRA GEMM, __half, forward layout (w [N, K], v [N, r]).
#include "fused_gemm.cuh"

LK_INSTANTIATE_FUSED_GEMM(__half, false)
