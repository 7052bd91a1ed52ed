// Device helpers shared by every kernel: dtype conversion, 16-byte vector loads, warp sums,
// the dropout mask (philox.h), batch lookups. No torch here (see lora_kernels.h for why).
#pragma once

#include <atomic>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_kernels.h"

namespace lk {

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// torch compiles with __CUDA_NO_HALF_CONVERSIONS__ & co., so every conversion is explicit.
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return Num<T>::to_f(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return Num<T>::from_f(v); }

// Elements of T in one 16-byte load.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// One 16-byte load of VEC elements widened to float. `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[Vec<T>::N]) {
  union { uint4 u; T e[Vec<T>::N]; } buf;
  buf.u = __ldg(reinterpret_cast<const uint4*>(p));
  #pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) f[i] = to_f(buf.e[i]);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Dropout mask v2 (philox.h, docs/BACKENDS.md): one Philox4x32-10 call per 8 columns of a row.
__device__ __forceinline__ bool dropout_keep(const Dropout& d, int64_t m, int64_t cols, int64_t k) {
  return keep_one(d.seed, d.threshold, m, cols, k);
}

// Multiplier of x[m, k] on the LoRA branch: 1 without dropout, else 0 or 1/(1-p).
__device__ __forceinline__ float dropout_factor(const Dropout& d, int64_t m, int64_t cols, int64_t k) {
  if (d.threshold == 0) return 1.f;
  return dropout_keep(d, m, cols, k) ? d.scale : 0.f;
}

// Multipliers of x[m, k0 .. k0+V-1] from one Philox call (k0 % V == 0, V | 8: a 16-byte vector).
template <int V>
__device__ __forceinline__ void dropout_factors(const Dropout& d, int64_t m, int64_t cols, int64_t k0,
                                                float (&f)[V]) {
  if (d.threshold == 0) {
    #pragma unroll
    for (int i = 0; i < V; ++i) f[i] = 1.f;
    return;
  }
  bool keep[V];
  keep_vec<V>(d.seed, d.threshold, m, cols, k0, keep);
  #pragma unroll
  for (int i = 0; i < V; ++i) f[i] = keep[i] ? d.scale : 0.f;
}

// The quad shuffle mma_pair_keep exchanges words with (every lane of the warp calls it).
// Host-device like mma_pair_keep itself, so nvcc sees no device-only call in a host path; the host
// branch is never taken (the host test brings its own lock-step shuffle).
struct WarpShflXor {
  LK_HD uint32_t operator()(uint32_t v, int mask) const {
#if defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, v, mask);
#else
    return mask == 0 ? v : 0u;
#endif
  }
};

// Slot of token t. Ids outside [-1, S) are rejected by the ops layer; here they read as -1 so a
// bad batch can never index past the adapter stack.
__device__ __forceinline__ int slot_of(const int32_t* ids, int64_t t, int num_slots) {
  if (ids == nullptr) return 0;
  const int s = ids[t];
  return (s >= 0 && s < num_slots) ? s : -1;
}

__device__ __forceinline__ int rank_of(const Ranks& rk, int slot, int slice, int n_slices, int R) {
  if (rk.ranks == nullptr) return R;
  const int r = rk.per_slice ? rk.ranks[slot * n_slices + slice] : rk.ranks[slot];
  return min(max(r, 0), R);
}

// Slice holding output column n (slice_start is ascending, slice_start[n_slices] = N).
__device__ __forceinline__ int slice_of(const int64_t* slice_start, int n_slices, int64_t n) {
  int j = 0;
  while (j + 1 < n_slices && n >= slice_start[j + 1]) ++j;
  return j;
}

// Segment [begin, end) of the sorted token order that belongs to active slot number `a`
// (or the whole batch in single-adapter mode), clamped so a bad batch stays in bounds.
__device__ __forceinline__ void segment_of(const BatchMeta& b, int a, int64_t T, int& slot,
                                           int64_t& begin, int64_t& end) {
  if (b.adapter_ids == nullptr) { slot = 0; begin = 0; end = T; return; }
  slot = b.active_slots[a];
  if (slot < 0 || slot >= b.num_slots) { slot = -1; begin = end = 0; return; }
  begin = min64(max64(b.seg_offsets[slot + 1], 0), T);
  end = min64(max64(b.seg_offsets[slot + 2], begin), T);
}

// Token at sorted position i (identity in single-adapter mode); -1 if out of range.
__device__ __forceinline__ int64_t token_at(const BatchMeta& b, int64_t i, int64_t T) {
  const int64_t t = b.sorted_token_ids ? static_cast<int64_t>(b.sorted_token_ids[i]) : i;
  return (t >= 0 && t < T) ? t : -1;
}

template <typename T> __host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// SM count of the current device, asked once per device: every launch's tile heuristic needs it.
inline int num_sms() {
  static std::atomic<int> cache[64];  // zero-initialised (static storage); 0 = not asked yet
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 64 && cache[dev].load(std::memory_order_relaxed) > 0) return cache[dev].load(std::memory_order_relaxed);
  int sms = 132;  // H100 SXM, if the query fails
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

}  // namespace lk
