// Routes launch_fused_gemm<T> to the (dtype, layout) instantiations, which live in their own
// translation units (fused_gemm_<dtype>_<layout>.cu) so ninja compiles them in parallel.
#include "common.cuh"

namespace lk {

template <typename T, bool TRANS_B>
cudaError_t launch_fused_gemm_layout(const GemmParams& p, cudaStream_t stream);

template <> cudaError_t launch_fused_gemm<__half>(const GemmParams& p, bool trans_b, cudaStream_t s) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return trans_b ? launch_fused_gemm_layout<__half, true>(p, s) : launch_fused_gemm_layout<__half, false>(p, s);
}

template <> cudaError_t launch_fused_gemm<__nv_bfloat16>(const GemmParams& p, bool trans_b, cudaStream_t s) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return trans_b ? launch_fused_gemm_layout<__nv_bfloat16, true>(p, s)
                 : launch_fused_gemm_layout<__nv_bfloat16, false>(p, s);
}

}  // namespace lk
