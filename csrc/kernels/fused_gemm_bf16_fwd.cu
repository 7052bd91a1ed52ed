// Fused LoRA GEMM, __nv_bfloat16, forward layout (w [N, K], v [N, r]).
#include "fused_gemm.cuh"

LK_INSTANTIATE_FUSED_GEMM(__nv_bfloat16, false)
