// Multi-adapter shrink/expand kernels for float (one dtype per file: the build parallelises).
#include "multi_lora.cuh"

LK_INSTANTIATE_MULTI_LORA(float)
