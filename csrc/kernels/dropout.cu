// The dropout keep-mask as a tensor (tests compare it with lora_kernels.reference; the torch
// parts of the backward apply it). The fused kernels evaluate the same philox.h functions in place.
#include "common.cuh"

namespace lk {

// One thread per mask group (8 columns of a row): one Philox call, up to 8 bools written.
__global__ void dropout_mask_kernel(bool* out, int64_t rows, int64_t cols, int64_t row_offset, Dropout d) {
  const int64_t groups = keep_groups(cols), total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / groups, k0 = (i - m * groups) * kKeepGroup;
    bool keep[kKeepGroup];
    keep_vec<kKeepGroup>(d.seed, d.threshold, m + row_offset, cols, k0, keep);
    bool* row = out + m * cols;
    #pragma unroll
    for (int j = 0; j < kKeepGroup; ++j)
      if (k0 + j < cols) row[k0 + j] = keep[j];
  }
}

cudaError_t launch_dropout_mask(bool* out, int64_t rows, int64_t cols, int64_t row_offset,
                                const Dropout& d, cudaStream_t stream) {
  const int64_t total = rows * keep_groups(cols);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = min64(ceil_div<int64_t>(total, threads), 65536);  // grid-stride beyond
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(out, rows, cols, row_offset, d);
  return cudaGetLastError();
}

}  // namespace lk
