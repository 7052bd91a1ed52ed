// Host-side interface of the CUDA kernels: parameter structs and launchers.
//
// Deliberately free of torch and of device code, so torch_bindings.cpp (g++) and the .cu files
// (nvcc) share it, and the .cu files compile without the ATen headers (which is what keeps the
// extension build short). Pointers are raw device pointers, sizes are int64, every launcher
// takes the stream and returns the launch status instead of throwing. philox.h (the dropout mask
// definition) is host+device code without CUDA headers: the bindings use its keep_threshold.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "philox.h"

namespace lk {

// Packed projections (qkv = 3, gate_up = 2) have a handful of slices; 16 bounds the per-launch
// slice table that travels inside the kernel parameters.
constexpr int kMaxSlices = 16;

// Counter-based dropout on a [rows, cols] grid, definition v2 (philox.h, docs/BACKENDS.md):
// element (m, k) is kept iff 16-bit half (k%8)%2 of word (k%8)/2 of
// philox4x32_10(seed, m*ceil(cols/8) + k/8) is >= threshold, with threshold = ceil(p * 2^16)
// computed on the host in double (keep_threshold). That integer compare is exactly the
// reference's float64 test `bits * 2^-16 >= p`. threshold == 0 means "no dropout".
struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float scale = 1.f;  // 1 / (1 - p), applied to kept elements
};

// LoRABatch on the device. adapter_ids == nullptr means "single adapter": every token uses
// slot 0 and the whole batch is one segment (used by the single-adapter forward).
struct BatchMeta {
  const int32_t* adapter_ids = nullptr;       // [T], -1 = base only
  const int32_t* sorted_token_ids = nullptr;  // [T], stably sorted by slot, -1 tokens first
  const int32_t* seg_offsets = nullptr;       // [S + 2]
  const int32_t* active_slots = nullptr;      // [num_active]
  int num_slots = 1;
  int num_active = 1;
  int64_t max_seg_len = 0;
};

// Per-slot (and optionally per-slice) ranks; ranks == nullptr means every rank is R.
struct Ranks {
  const int32_t* ranks = nullptr;
  bool per_slice = false;  // ranks is [S, n_slices] rather than [S]
};

struct ShrinkParams {
  const void* x = nullptr;         // [T, K], dtype T
  const void* lora_a = nullptr;    // [S, n_slices*R, K]
  const float* scalings = nullptr; // [S] or nullptr (= 1)
  float* out = nullptr;            // [T, n_slices*R] float32
  int64_t T = 0, K = 0;
  int R = 0, n_slices = 1;
  Ranks ranks;
  BatchMeta batch;
  Dropout drop;                    // on x (single-adapter training); grid [T, K]
};

struct ExpandParams {
  void* y = nullptr;               // [T, N], dtype T, updated in place
  const float* xa = nullptr;       // [T, n_slices*R] float32
  const void* lora_b = nullptr;    // [S, N, R]
  int64_t T = 0, N = 0;
  int R = 0, n_slices = 1;
  int64_t slice_start[kMaxSlices + 1] = {};  // column where slice j starts; [n_slices] = N
  Ranks ranks;
  BatchMeta batch;
};

// Decode-shaped shrink+expand in one launch: y[t] += (s_i * x[t]·A_iᵀ)·B_iᵀ, and the scaled
// shrink result goes to xa (the backward reuses it).
struct FusedDecodeParams {
  void* y = nullptr;               // [T, N]
  const void* x = nullptr;         // [T, K]
  const void* lora_a = nullptr;    // [S, n_slices*R, K]
  const void* lora_b = nullptr;    // [S, N, R]
  const float* scalings = nullptr; // [S]
  float* xa = nullptr;             // [T, n_slices*R] float32
  int64_t T = 0, K = 0, N = 0;
  int R = 0, n_slices = 1;
  int64_t slice_start[kMaxSlices + 1] = {};
  Ranks ranks;
  const int32_t* adapter_ids = nullptr;
  int num_slots = 0;
  int64_t cols_per_block = 256;    // chosen by the launcher
};

// out[M, N] = a[M, K]·op(w) + bias + mask(scaling * u[M, r]·op(v))   (fp16/bf16, fp32 acc)
//   trans_b == false: w is [N, K], v is [N, r]   (forward:  x·Wᵀ + s·xa·Bᵀ)
//   trans_b == true:  w is [K, N], v is [r, N]   (dX:       dy·W + drop(s·(dy·B)·A))
// Every operand is row-major with unit inner stride and its own leading dimension.
struct GemmParams {
  const void* a = nullptr; int64_t lda = 0;
  const void* w = nullptr; int64_t ldw = 0;
  const void* u = nullptr; int64_t ldu = 0;
  const void* v = nullptr; int64_t ldv = 0;
  const void* bias = nullptr;
  void* out = nullptr; int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;
  int r = 0;
  float scaling = 1.f;
  Dropout drop;                    // on the low-rank term; grid [M, N]
};

// path: 0 = pick by shape, 1 = decode (per token), 2 = prefill (per sorted segment).
template <typename T> cudaError_t launch_shrink(const ShrinkParams& p, int path, cudaStream_t s);
template <typename T> cudaError_t launch_expand(const ExpandParams& p, int path, cudaStream_t s);
template <typename T> cudaError_t launch_fused_decode(const FusedDecodeParams& p, cudaStream_t s);
// T is __half or __nv_bfloat16 (no fp32 tensor-core path: fp32 goes through cuBLAS in _ext.py).
template <typename T> cudaError_t launch_fused_gemm(const GemmParams& p, bool trans_b, cudaStream_t s);

cudaError_t launch_dropout_mask(bool* out, int64_t rows, int64_t cols, int64_t row_offset,
                                const Dropout& d, cudaStream_t s);

constexpr int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest xa footprint (n_slices * R floats) the fused decode kernel keeps in shared memory.
constexpr int64_t kFusedDecodeMaxRankRows = 8192;

// Tile widths the launch grids are built from; the bindings check grid limits with the same
// numbers (they were literals there and could drift from the kernels).
constexpr int kShrinkWarps = 8;      // shrink decode: rank rows per block (one warp each)
constexpr int kPR = 16;              // shrink prefill: rank rows per block
constexpr int kExpandCols = 128;     // expand decode: output columns per block
constexpr int kFusedThreads = 256;   // fused decode: threads = fewest columns per block
constexpr int kGemmNarrowestBN = 64; // fused GEMM: narrowest column tile of any config

}  // namespace lk
