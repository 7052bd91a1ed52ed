// torch glue for the CUDA kernels: op schemas, input validation, dispatch to the launchers.
//
// The ops here are *kernel-level* (docs/BACKENDS.md): outputs are preallocated by
// lora_kernels/_ext/backend.py, which turns them into the backend API. Every check is a TORCH_CHECK so
// misuse raises a RuntimeError naming the argument instead of faulting on the GPU. The
// extension is a plain module with no Python bindings of its own: importing lora_kernels._C
// runs the static registrations below, and the ops appear under torch.ops.lora_kernels.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "kernels/lora_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// ---- validation helpers (each message names the argument) ------------------------------------
void check_on(const Tensor& t, const char* name, const c10::Device& dev) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), " but the first input is on ", dev);
}

void check_shape(const Tensor& t, const char* name, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

void check_dense(const Tensor& t, const char* name, at::ScalarType dtype, const c10::Device& dev,
                 c10::IntArrayRef sizes) {
  check_on(t, name, dev);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  check_shape(t, name, sizes);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_float_dtype(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_dropout(double p, bool allow_one) {
  TORCH_CHECK(std::isfinite(p) && p >= 0.0 && (allow_one ? p <= 1.0 : p < 1.0),
              "dropout_p must be in [0, 1", allow_one ? "]" : ")", ", got ", p);
}

lk::Dropout make_dropout(double p, int64_t seed) {
  lk::Dropout d;
  d.seed = static_cast<uint64_t>(seed);
  if (p > 0.0) {
    // mask v2: ceil(p * 2^16) is exact in double, so bits16 >= threshold <=> bits16 * 2^-16 >= p
    d.threshold = lk::keep_threshold(p);
    d.scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
  }
  return d;
}

lk::Ranks make_ranks(const OptTensor& ranks, int64_t S, int64_t n_slices, const c10::Device& dev) {
  lk::Ranks r;
  if (!ranks.has_value()) return r;
  const Tensor& t = *ranks;
  check_on(t, "ranks", dev);
  TORCH_CHECK(t.scalar_type() == at::kInt, "ranks must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "ranks must be contiguous");
  const bool flat = t.dim() == 1 && t.size(0) == S;
  const bool per_slice = t.dim() == 2 && t.size(0) == S && t.size(1) == n_slices;
  TORCH_CHECK(flat || per_slice, "ranks must have shape [S] = [", S, "] or [S, n_slices] = [", S, ", ",
              n_slices, "], got ", t.sizes());
  r.ranks = t.data_ptr<int32_t>();
  r.per_slice = per_slice;
  return r;
}

// LoRABatch tensors: adapter_ids [T], sorted_token_ids [T], seg_offsets [S+2], active_slots [>= A].
lk::BatchMeta make_batch(const Tensor& ids, const Tensor& order, const Tensor& offsets,
                         const Tensor& active, int64_t T, int64_t S, int64_t num_active,
                         int64_t max_seg_len, const c10::Device& dev) {
  check_dense(ids, "adapter_ids", at::kInt, dev, {T});
  check_dense(order, "sorted_token_ids", at::kInt, dev, {T});
  check_dense(offsets, "seg_offsets", at::kInt, dev, {S + 2});
  check_on(active, "active_slots", dev);
  TORCH_CHECK(active.scalar_type() == at::kInt && active.dim() == 1 && active.is_contiguous(),
              "active_slots must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(num_active >= 0 && num_active <= S && active.size(0) >= num_active,
              "num_active must be in [0, S] and at most len(active_slots); got ", num_active);
  TORCH_CHECK(num_active <= kMaxGridYZ, "at most ", kMaxGridYZ, " active slots per batch, got ", num_active);
  TORCH_CHECK(max_seg_len >= 0 && max_seg_len <= T, "max_seg_len must be in [0, T], got ", max_seg_len);
  lk::BatchMeta b;
  b.adapter_ids = ids.data_ptr<int32_t>();
  b.sorted_token_ids = order.data_ptr<int32_t>();
  b.seg_offsets = offsets.data_ptr<int32_t>();
  b.active_slots = active.data_ptr<int32_t>();
  b.num_slots = static_cast<int>(S);
  b.num_active = static_cast<int>(num_active);
  b.max_seg_len = max_seg_len;
  return b;
}

// out_slices (empty = one slice) -> slice start columns; returns n_slices.
int fill_slices(c10::IntArrayRef out_slices, int64_t N, int64_t* starts) {
  const int64_t n = out_slices.empty() ? 1 : static_cast<int64_t>(out_slices.size());
  TORCH_CHECK(n <= lk::kMaxSlices, "at most ", lk::kMaxSlices, " out_slices, got ", n);
  starts[0] = 0;
  if (out_slices.empty()) {
    starts[1] = N;
    return 1;
  }
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(out_slices[j] > 0, "out_slices must be positive widths, got ", out_slices);
    starts[j + 1] = starts[j] + out_slices[j];
  }
  TORCH_CHECK(starts[n] == N, "out_slices must sum to N = ", N, ", got ", out_slices);
  return static_cast<int>(n);
}

// Row stride of a row-major matrix with unit inner stride (views such as w[:, :K] are fine).
int64_t leading_dim(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride along dim 1, got strides ",
              t.strides());
  // a single row never uses its stride: report a 16-byte friendly one
  if (t.size(0) <= 1) return (t.size(1) + 7) / 8 * 8;
  TORCH_CHECK(t.stride(0) >= t.size(1), name, " rows overlap (strides ", t.strides(), ")");
  return t.stride(0);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

template <typename T> struct Tag { using type = T; };

template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
}

// ---- ops -----------------------------------------------------------------------------------
void dropout_keep_mask(Tensor& out, int64_t seed, double p, int64_t row_offset) {
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kBool && out.dim() == 2 && out.is_contiguous(),
              "out must be a contiguous 2-D bool tensor, got ", out.scalar_type(), " ", out.sizes());
  check_dropout(p, /*allow_one=*/true);
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(lk::launch_dropout_mask(out.data_ptr<bool>(), out.size(0), out.size(1), row_offset,
                                       make_dropout(p, seed), c10::cuda::getCurrentCUDAStream()),
               "cuda_dropout_keep_mask");
}

void lora_shrink(const Tensor& x, const Tensor& lora_a, const OptTensor& scalings,
                 const OptTensor& ranks, const OptTensor& adapter_ids, const OptTensor& sorted_token_ids,
                 const OptTensor& seg_offsets, const OptTensor& active_slots, int64_t num_active,
                 int64_t max_seg_len, int64_t n_slices, double dropout_p, int64_t seed, int64_t path,
                 Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got a tensor on ", x.device());
  const auto dev = x.device();
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [T, K], got ", x.sizes());
  TORCH_CHECK(lora_a.dim() == 3, "lora_a must be [S, n_slices*R, K], got ", lora_a.sizes());
  const int64_t T = x.size(0), K = x.size(1), S = lora_a.size(0), RR = lora_a.size(1);
  check_dense(x, "x", x.scalar_type(), dev, {T, K});
  check_dense(lora_a, "lora_a", x.scalar_type(), dev, {S, RR, K});
  TORCH_CHECK(n_slices >= 1 && RR % n_slices == 0, "n_slices must divide lora_a.shape[1] = ", RR,
              ", got ", n_slices);
  TORCH_CHECK(T <= kInt32Max && RR <= kInt32Max, "too many tokens or rank rows");
  check_dense(out, "out", at::kFloat, dev, {T, RR});
  check_dropout(dropout_p, false);
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (auto), 1 (decode) or 2 (prefill), got ", path);

  lk::ShrinkParams p;
  p.T = T; p.K = K; p.n_slices = static_cast<int>(n_slices); p.R = static_cast<int>(RR / n_slices);
  p.ranks = make_ranks(ranks, S, n_slices, dev);
  if (scalings.has_value()) {
    check_dense(*scalings, "scalings", at::kFloat, dev, {S});
    p.scalings = scalings->data_ptr<float>();
  }
  const bool batched = adapter_ids.has_value();
  TORCH_CHECK(batched == sorted_token_ids.has_value() && batched == seg_offsets.has_value() &&
                  batched == active_slots.has_value(),
              "adapter_ids, sorted_token_ids, seg_offsets and active_slots come together (a LoRABatch)");
  if (batched) {
    p.batch = make_batch(*adapter_ids, *sorted_token_ids, *seg_offsets, *active_slots, T, S, num_active,
                         max_seg_len, dev);
  } else {
    TORCH_CHECK(S == 1, "without adapter_ids (single-adapter mode) lora_a must hold one slot, got S = ", S);
  }
  TORCH_CHECK(lk::ceil_div_host(RR, lk::kShrinkWarps) <= kMaxGridYZ &&
                  n_slices * lk::ceil_div_host(p.R, lk::kPR) <= kMaxGridYZ,
              "too many rank rows: ", RR);
  p.drop = make_dropout(dropout_p, seed);
  p.x = x.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.out = out.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "cuda_lora_shrink", [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    check_launch(lk::launch_shrink<T_>(p, static_cast<int>(path), stream), "cuda_lora_shrink");
  });
}

void lora_expand(Tensor& y, const Tensor& xa, const Tensor& lora_b, const OptTensor& ranks,
                 const Tensor& adapter_ids, const Tensor& sorted_token_ids, const Tensor& seg_offsets,
                 const Tensor& active_slots, int64_t num_active, int64_t max_seg_len,
                 c10::IntArrayRef out_slices, int64_t path) {
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got a tensor on ", y.device());
  const auto dev = y.device();
  check_float_dtype(y, "y");
  TORCH_CHECK(y.dim() == 2, "y must be [T, N], got ", y.sizes());
  TORCH_CHECK(lora_b.dim() == 3, "lora_b must be [S, N, R], got ", lora_b.sizes());
  const int64_t T = y.size(0), N = y.size(1), S = lora_b.size(0), R = lora_b.size(2);
  check_dense(y, "y", y.scalar_type(), dev, {T, N});
  check_dense(lora_b, "lora_b", y.scalar_type(), dev, {S, N, R});
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (auto), 1 (decode) or 2 (prefill), got ", path);
  lk::ExpandParams p;
  p.n_slices = fill_slices(out_slices, N, p.slice_start);
  check_dense(xa, "xa", at::kFloat, dev, {T, p.n_slices * R});
  TORCH_CHECK(T <= kInt32Max && R <= kInt32Max, "too many tokens or ranks");
  TORCH_CHECK(lk::ceil_div_host(N, lk::kExpandCols) <= kMaxGridYZ, "N = ", N, " is too wide");
  p.T = T; p.N = N; p.R = static_cast<int>(R);
  p.ranks = make_ranks(ranks, S, p.n_slices, dev);
  p.batch = make_batch(adapter_ids, sorted_token_ids, seg_offsets, active_slots, T, S, num_active,
                       max_seg_len, dev);
  p.y = y.data_ptr();
  p.xa = xa.data_ptr<float>();
  p.lora_b = lora_b.data_ptr();
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(y.scalar_type(), "cuda_lora_expand", [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    check_launch(lk::launch_expand<T_>(p, static_cast<int>(path), stream), "cuda_lora_expand");
  });
}

void lora_shrink_expand(Tensor& y, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                        const Tensor& scalings, const OptTensor& ranks, const Tensor& adapter_ids,
                        c10::IntArrayRef out_slices, Tensor& xa) {
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got a tensor on ", y.device());
  const auto dev = y.device();
  check_float_dtype(y, "y");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2, "y must be [T, N] and x [T, K]");
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3, "lora_a must be [S, n_slices*R, K], lora_b [S, N, R]");
  const int64_t T = y.size(0), N = y.size(1), K = x.size(1), S = lora_b.size(0), R = lora_b.size(2);
  const auto dt = y.scalar_type();
  check_dense(y, "y", dt, dev, {T, N});
  check_dense(x, "x", dt, dev, {T, K});
  check_dense(lora_b, "lora_b", dt, dev, {S, N, R});
  lk::FusedDecodeParams p;
  p.n_slices = fill_slices(out_slices, N, p.slice_start);
  const int64_t RR = p.n_slices * R;
  check_dense(lora_a, "lora_a", dt, dev, {S, RR, K});
  check_dense(scalings, "scalings", at::kFloat, dev, {S});
  check_dense(adapter_ids, "adapter_ids", at::kInt, dev, {T});
  check_dense(xa, "xa", at::kFloat, dev, {T, RR});
  TORCH_CHECK(RR <= lk::kFusedDecodeMaxRankRows, "cuda_lora_shrink_expand keeps n_slices*R <= ",
              lk::kFusedDecodeMaxRankRows, " rank rows in shared memory, got ", RR,
              "; use cuda_lora_shrink + cuda_lora_expand");
  TORCH_CHECK(T <= kInt32Max && lk::ceil_div_host(N, lk::kFusedThreads) <= kMaxGridYZ, "T or N too large");
  p.T = T; p.K = K; p.N = N; p.R = static_cast<int>(R);
  p.ranks = make_ranks(ranks, S, p.n_slices, dev);
  p.adapter_ids = adapter_ids.data_ptr<int32_t>();
  p.num_slots = static_cast<int>(S);
  p.y = y.data_ptr();
  p.x = x.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.scalings = scalings.data_ptr<float>();
  p.xa = xa.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dt, "cuda_lora_shrink_expand", [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    check_launch(lk::launch_fused_decode<T_>(p, stream), "cuda_lora_shrink_expand");
  });
}

void fused_lora_gemm(const Tensor& a, const Tensor& w, const OptTensor& bias, const Tensor& u,
                     const Tensor& v, double scaling, double dropout_p, int64_t seed, bool trans_b,
                     Tensor& out) {
  TORCH_CHECK(a.is_cuda(), "a must be a CUDA tensor, got a tensor on ", a.device());
  const auto dev = a.device();
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16,
              "cuda_fused_lora_gemm runs on tensor cores in float16/bfloat16, got ", dt,
              " (lora_kernels._ext sends float32 through cuBLAS instead)");
  const int64_t lda = leading_dim(a, "a"), ldw = leading_dim(w, "w"), ldu = leading_dim(u, "u");
  const int64_t ldv = leading_dim(v, "v"), ldo = leading_dim(out, "out");
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = trans_b ? w.size(1) : w.size(0), r = u.size(1);
  const char* wdesc = trans_b ? "w must be [K, N] (trans_b=True)" : "w must be [N, K] (trans_b=False)";
  TORCH_CHECK((trans_b ? w.size(0) : w.size(1)) == K, wdesc, "; got a ", a.sizes(), " and w ", w.sizes());
  TORCH_CHECK(u.size(0) == M, "u must be [M, r] with M = ", M, ", got ", u.sizes());
  TORCH_CHECK(trans_b ? (v.size(0) == r && v.size(1) == N) : (v.size(0) == N && v.size(1) == r),
              trans_b ? "v must be [r, N]" : "v must be [N, r]", " with N = ", N, ", r = ", r, ", got ", v.sizes());
  check_shape(out, "out", {M, N});
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&w, "w"}, {&u, "u"}, {&v, "v"}, {&out, "out"}}) {
    check_on(*t, name, dev);
    TORCH_CHECK(t->scalar_type() == dt, name, " must be ", dt, " like a, got ", t->scalar_type());
  }
  if (bias.has_value()) check_dense(*bias, "bias", dt, dev, {N});
  check_dropout(dropout_p, false);
  TORCH_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  TORCH_CHECK(r <= kInt32Max, "rank too large: ", r);
  TORCH_CHECK(lk::ceil_div_host(N, lk::kGemmNarrowestBN) <= kMaxGridYZ, "N = ", N, " is too wide");

  lk::GemmParams p;
  p.a = a.data_ptr(); p.lda = lda;
  p.w = w.data_ptr(); p.ldw = ldw;
  p.u = r > 0 ? u.data_ptr() : nullptr; p.ldu = ldu;
  p.v = r > 0 ? v.data_ptr() : nullptr; p.ldv = ldv;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr(); p.ldo = ldo;
  p.M = M; p.N = N; p.K = K; p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  p.drop = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dt == at::kHalf ? lk::launch_fused_gemm<__half>(p, trans_b, stream)
                                          : lk::launch_fused_gemm<__nv_bfloat16>(p, trans_b, stream);
  check_launch(err, "cuda_fused_lora_gemm");
}

}  // namespace

// Schemas: defined here only. lora_kernels/_ext/fakes.py holds their fake kernels, one per op
// with the schema's argument names (tests/test_ext.py checks both ways). The Python-defined
// public ops share the namespace, hence FRAGMENT.
TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  // FakeTensor looks here for the fake (meta) kernels when it meets these ops.
  m.set_python_module("lora_kernels._ext.fakes");
  m.def("cuda_dropout_keep_mask(Tensor(a!) out, int seed, float p, int row_offset) -> ()");
  m.def("cuda_lora_shrink(Tensor x, Tensor lora_a, Tensor? scalings, Tensor? ranks, "
        "Tensor? adapter_ids, Tensor? sorted_token_ids, Tensor? seg_offsets, Tensor? active_slots, "
        "int num_active, int max_seg_len, int n_slices, float dropout_p, int seed, int path, "
        "Tensor(a!) out) -> ()");
  m.def("cuda_lora_expand(Tensor(a!) y, Tensor xa, Tensor lora_b, Tensor? ranks, Tensor adapter_ids, "
        "Tensor sorted_token_ids, Tensor seg_offsets, Tensor active_slots, int num_active, "
        "int max_seg_len, int[] out_slices, int path) -> ()");
  m.def("cuda_lora_shrink_expand(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, "
        "Tensor scalings, Tensor? ranks, Tensor adapter_ids, int[] out_slices, Tensor(b!) xa) -> ()");
  m.def("cuda_fused_lora_gemm(Tensor a, Tensor w, Tensor? bias, Tensor u, Tensor v, float scaling, "
        "float dropout_p, int seed, bool trans_b, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_dropout_keep_mask", &dropout_keep_mask);
  m.impl("cuda_lora_shrink", &lora_shrink);
  m.impl("cuda_lora_expand", &lora_expand);
  m.impl("cuda_lora_shrink_expand", &lora_shrink_expand);
  m.impl("cuda_fused_lora_gemm", &fused_lora_gemm);
}

// A module object for `import lora_kernels._C`; loading the .so is what registers the ops.
// Stable-ABI only (py_limited_api): one wheel serves every CPython >= 3.10.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "lora_kernels CUDA kernels; the ops live under torch.ops.lora_kernels.cuda_*", -1, nullptr,
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
