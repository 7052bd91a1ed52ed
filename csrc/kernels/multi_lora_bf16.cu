// Multi-adapter shrink/expand kernels for __nv_bfloat16 (one dtype per file: the build parallelises).
#include "multi_lora.cuh"

LK_INSTANTIATE_MULTI_LORA(__nv_bfloat16)
