// torch glue for the CUTLASS sm90 fused LoRA GEMM (csrc/kernels/cutlass/): its schema, its checks
// and the launch. Kept apart from torch_bindings.cpp so the CUTLASS kernels stay optional: the
// schema is always defined (one home, here), the CUDA implementation is registered only when
// setup.py found CUTLASS's headers (LK_WITH_CUTLASS), and lora_kernels/_ext asks the dispatcher
// whether it exists before calling it.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

#include "kernels/cutlass/lora_gemm_sm90.h"
#include "kernels/philox.h"

namespace {

using at::Tensor;

#ifdef LK_WITH_CUTLASS
// Row stride of a 2-D matrix with unit inner stride (views like w[:, :K] keep their stride).
int64_t row_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride along dim 1, got strides ",
              t.strides());
  if (t.size(0) <= 1) return (t.size(1) + 7) / 8 * 8;  // a single row never uses its stride
  TORCH_CHECK(t.stride(0) >= t.size(1), name, " rows overlap (strides ", t.strides(), ")");
  return t.stride(0);
}

// out = a·op(w) + u·op(v) + bias, op = transpose unless trans_b (lora_gemm_sm90.h). The LoRA
// scaling is already in u; dropout, where it applies, already in u (forward); dX with dropout
// is cuda_cutlass_lora_dx_dropout below.
void cutlass_lora_gemm(const Tensor& a, const Tensor& w, const std::optional<Tensor>& bias,
                       const Tensor& u, const Tensor& v, bool trans_b, Tensor& out) {
  TORCH_CHECK(a.is_cuda(), "a must be a CUDA tensor, got a tensor on ", a.device());
  const auto dev = a.device();
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "cuda_cutlass_lora_gemm takes float16/bfloat16, got ", dt);
  lk::LowRankGemmParams p;
  p.lda = row_stride(a, "a"); p.ldw = row_stride(w, "w"); p.ldu = row_stride(u, "u");
  p.ldv = row_stride(v, "v"); p.ldo = row_stride(out, "out");
  p.M = a.size(0); p.K = a.size(1);
  p.N = trans_b ? w.size(1) : w.size(0);
  const int64_t r = u.size(1);
  TORCH_CHECK((trans_b ? w.size(0) : w.size(1)) == p.K,
              trans_b ? "w must be [K, N] (trans_b=True)" : "w must be [N, K] (trans_b=False)", "; got a ",
              a.sizes(), " and w ", w.sizes());
  TORCH_CHECK(u.size(0) == p.M, "u must be [M, r] with M = ", p.M, ", got ", u.sizes());
  TORCH_CHECK(trans_b ? (v.size(0) == r && v.size(1) == p.N) : (v.size(0) == p.N && v.size(1) == r),
              trans_b ? "v must be [r, N]" : "v must be [N, r]", " with N = ", p.N, ", r = ", r, ", got ", v.sizes());
  TORCH_CHECK(out.sizes() == c10::IntArrayRef({p.M, p.N}), "out must have shape [", p.M, ", ", p.N, "], got ",
              out.sizes());
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&w, "w"}, {&u, "u"}, {&v, "v"}, {&out, "out"}}) {
    TORCH_CHECK(t->device() == dev, name, " is on ", t->device(), " but a is on ", dev);
    TORCH_CHECK(t->scalar_type() == dt, name, " must be ", dt, " like a, got ", t->scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK(!trans_b, "bias is a forward-only argument (trans_b=False)");
    TORCH_CHECK(bias->device() == dev && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == p.N && bias->is_contiguous(),
                "bias must be a contiguous ", dt, " [", p.N, "] tensor on ", dev);
  }
  p.r = static_cast<int>(r);
  p.a = a.data_ptr(); p.w = w.data_ptr(); p.out = out.data_ptr();
  p.u = r > 0 ? u.data_ptr() : nullptr;
  p.v = r > 0 ? v.data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  TORCH_CHECK(lk::lowrank_gemm_sm90_supported(p, trans_b),
              "cuda_cutlass_lora_gemm needs TMA-compatible operands: 16-byte aligned data pointers, "
              "K, N, r and every row stride multiples of 8 elements, K >= 1 and r <= 4096; got M = ", p.M,
              ", N = ", p.N, ", K = ", p.K, ", r = ", r, " (lora_kernels._ext pads r and routes other "
              "shapes to cuda_fused_lora_gemm)");
  if (p.M == 0 || p.N == 0) return;
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (dt == at::kHalf) {
    err = trans_b ? lk::launch_lowrank_gemm_sm90<__half, true>(p, stream)
                  : lk::launch_lowrank_gemm_sm90<__half, false>(p, stream);
  } else {
    err = trans_b ? lk::launch_lowrank_gemm_sm90<__nv_bfloat16, true>(p, stream)
                  : lk::launch_lowrank_gemm_sm90<__nv_bfloat16, false>(p, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "cuda_cutlass_lora_gemm: CUDA error: ", cudaGetErrorString(err));
}

// dx = dy·w + keep∘(u·v)/(1-p) (lora_gemm_dx_dropout.cuh): dy [M, K_red], w = W0 [K_red, N],
// u = s·(dy·B) [M, r], v = A [r, N], keep = mask v2 on out's [M, N] grid with `seed`.
void cutlass_lora_dx_dropout(const Tensor& dy, const Tensor& w, const Tensor& u, const Tensor& v,
                             double dropout_p, int64_t seed, Tensor& out) {
  TORCH_CHECK(dy.is_cuda(), "dy must be a CUDA tensor, got a tensor on ", dy.device());
  const auto dev = dy.device();
  const auto dt = dy.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "cuda_cutlass_lora_dx_dropout takes float16/bfloat16, got ", dt);
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, "dropout_p must be in (0, 1) (p = 0 is cuda_cutlass_lora_gemm), got ",
              dropout_p);
  lk::LowRankDropoutParams d;
  lk::LowRankGemmParams& p = d.gemm;
  p.lda = row_stride(dy, "dy"); p.ldw = row_stride(w, "w"); p.ldu = row_stride(u, "u");
  p.ldv = row_stride(v, "v"); p.ldo = row_stride(out, "out");
  p.M = dy.size(0); p.K = dy.size(1); p.N = w.size(1);
  const int64_t r = u.size(1);
  TORCH_CHECK(w.size(0) == p.K, "w must be [K, N] with K = dy.size(1) = ", p.K, ", got ", w.sizes());
  TORCH_CHECK(u.size(0) == p.M && r >= 1, "u must be [M, r] with M = ", p.M, " and r >= 1, got ", u.sizes());
  TORCH_CHECK(v.size(0) == r && v.size(1) == p.N, "v must be [r, N] with r = ", r, ", N = ", p.N, ", got ", v.sizes());
  TORCH_CHECK(out.sizes() == c10::IntArrayRef({p.M, p.N}), "out must have shape [", p.M, ", ", p.N, "], got ",
              out.sizes());
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&w, "w"}, {&u, "u"}, {&v, "v"}, {&out, "out"}}) {
    TORCH_CHECK(t->device() == dev, name, " is on ", t->device(), " but dy is on ", dev);
    TORCH_CHECK(t->scalar_type() == dt, name, " must be ", dt, " like dy, got ", t->scalar_type());
  }
  p.r = static_cast<int>(r);
  p.a = dy.data_ptr(); p.w = w.data_ptr(); p.out = out.data_ptr(); p.u = u.data_ptr(); p.v = v.data_ptr();
  d.seed = static_cast<uint64_t>(seed);
  d.threshold = lk::keep_threshold(dropout_p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  TORCH_CHECK(lk::lowrank_dx_dropout_sm90_supported(d),
              "cuda_cutlass_lora_dx_dropout needs TMA-compatible dy, w and out (lowrank_dx_dropout_sm90_supported): "
              "16-byte aligned data pointers, K, N and their row strides multiples of 8 elements, K >= 1, "
              "1 <= r <= 4096, dropout_p < 1 - 2^-16; got M = ", p.M, ", N = ", p.N, ", K = ", p.K, ", r = ", r,
              " (lora_kernels._ext routes other shapes to cuda_fused_lora_gemm)");
  if (p.M == 0 || p.N == 0) return;
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dt == at::kHalf ? lk::launch_lowrank_dx_dropout_sm90<__half>(d, stream)
                                          : lk::launch_lowrank_dx_dropout_sm90<__nv_bfloat16>(d, stream);
  TORCH_CHECK(err == cudaSuccess, "cuda_cutlass_lora_dx_dropout: CUDA error: ", cudaGetErrorString(err));
}
#endif  // LK_WITH_CUTLASS

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.set_python_module("lora_kernels._ext.fakes");  // home of the fake kernel
  m.def("cuda_cutlass_lora_gemm(Tensor a, Tensor w, Tensor? bias, Tensor u, Tensor v, bool trans_b, "
        "Tensor(a!) out) -> ()");
  m.def("cuda_cutlass_lora_dx_dropout(Tensor dy, Tensor w, Tensor u, Tensor v, float dropout_p, int seed, "
        "Tensor(a!) out) -> ()");
}

#ifdef LK_WITH_CUTLASS
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_cutlass_lora_gemm", &cutlass_lora_gemm);
  m.impl("cuda_cutlass_lora_dx_dropout", &cutlass_lora_dx_dropout);
}
#endif
