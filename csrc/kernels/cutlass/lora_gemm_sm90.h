// Host interface of the CUTLASS sm90 fused LoRA GEMM (no torch, no CUTLASS types).
//
//   out = a·op(w) + u·op(v) + bias         op(t) = tᵀ (trans_b = false) or t (trans_b = true)
//
// Forward:  a = x [M, K], w = W0 [N, K], u = s·drop(x)·Aᵀ [M, r], v = B [N, r], bias [N] or null.
// dX:       a = dy [M, N], w = W0 [N, K] (trans_b), u = s·(dy·B) [M, r], v = A [r, K] (trans_b),
//           no bias. The LoRA scaling is folded into u by the caller (an M·r operand), because the
//           low-rank term shares the base term's accumulator (see lowrank_mainloop.cuh).
// TMA needs 16-byte aligned base pointers and leading dimensions that are multiples of 8
// elements; lowrank_gemm_sm90_supported() says whether a call qualifies.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lk {

struct LowRankGemmParams {
  const void* a = nullptr; int64_t lda = 0;
  const void* w = nullptr; int64_t ldw = 0;
  const void* u = nullptr; int64_t ldu = 0;
  const void* v = nullptr; int64_t ldv = 0;
  const void* bias = nullptr;  // [N] or nullptr; forward only
  void* out = nullptr; int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;  // out is [M, N]; K is the base pair's reduction length
  int r = 0;                   // the low-rank pair's reduction length (0: plain GEMM + bias)
};

// Pointer/stride/size conditions of the TMA descriptors (dtype and device are the caller's):
// 16-byte aligned bases, leading dimensions and K, N, r multiples of 8 elements (r = 0 is
// fine), sizes that fit int32, K >= 1. The caller pads r (lora_kernels/_ext/cutlass_gemm.py).
inline bool lowrank_gemm_sm90_supported(const LowRankGemmParams& p, bool trans_b) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto ld_ok = [](int64_t ld, int64_t inner) { return ld % 8 == 0 && ld >= inner; };
  constexpr int64_t kMax = 2147483647;
  // K >= 1: a TMA descriptor needs every extent >= 1 (K = 0 would be out = bias alone)
  if (p.M > kMax || p.N > kMax || p.K < 1 || p.K + 256 > kMax || p.r < 0 || p.r > 4096) return false;
  // CUTLASS's TMA rule also wants each operand's contiguous extent a multiple of 8 elements
  if (p.K % 8 != 0 || p.N % 8 != 0 || p.r % 8 != 0) return false;
  if (!aligned(p.a) || !aligned(p.w) || !aligned(p.out) || !ld_ok(p.lda, p.K) || !ld_ok(p.ldo, p.N))
    return false;
  if (!ld_ok(p.ldw, trans_b ? p.N : p.K)) return false;
  if (p.bias != nullptr && !aligned(p.bias)) return false;
  if (p.r > 0 && (!aligned(p.u) || !aligned(p.v) || !ld_ok(p.ldu, p.r) || !ld_ok(p.ldv, trans_b ? p.N : p.r)))
    return false;
  return true;
}

// T is __half or __nv_bfloat16; each (T, TRANS_B) lives in its own translation unit.
template <typename T, bool TRANS_B>
cudaError_t launch_lowrank_gemm_sm90(const LowRankGemmParams& p, cudaStream_t stream);

// dX with dropout (lora_gemm_dx_dropout.cuh): out = a·w + keep∘(u·v)·inv_keep, trans_b layout
// (a = dy [M, N_red], w = W0 [N_red, N], u = s·(dy·B) [M, r8], v = A [r8, N]); keep = mask v2
// on out's [M, N] grid with `seed`, threshold = ceil(p·2^16), inv_keep = 1/(1-p). K is the
// base reduction length (no concatenated k-tiles: the product is added in the epilogue).
struct LowRankDropoutParams {
  LowRankGemmParams gemm;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float inv_keep = 1.f;
};

// The fused kernel's TMA rule for the base pair, plus the epilogue's reads of u and v (plain
// loads: any strides, r <= 4096) and no bias. A mask needs r > 0 (r = 0 is the plain kernel).
inline bool lowrank_dx_dropout_sm90_supported(const LowRankDropoutParams& d) {
  LowRankGemmParams base = d.gemm;
  base.r = 0;
  if (!lowrank_gemm_sm90_supported(base, true) || d.gemm.bias != nullptr) return false;
  const LowRankGemmParams& p = d.gemm;
  if (p.r < 1 || p.r > 4096 || p.u == nullptr || p.v == nullptr || p.ldu < p.r || p.ldv < p.N) return false;
  return d.threshold < (1u << 16) && d.inv_keep > 0.f;
}

template <typename T>
cudaError_t launch_lowrank_dx_dropout_sm90(const LowRankDropoutParams& d, cudaStream_t stream);

}  // namespace lk
