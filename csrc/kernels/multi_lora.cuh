// Heterogeneous multi-adapter shrink / expand kernels (SIMT, fp32 accumulation), templated on
// the element type; multi_lora_{f32,f16,bf16}.cu instantiate one dtype each so the build
// parallelises. Semantics: docs/BACKENDS.md (lora_shrink, lora_expand).
//
// Two shapes of work:
//  * decode (few tokens, often one per adapter): one block per token. Shrink = one warp per
//    rank row, 16-byte loads along K unrolled kDotUnroll deep (8 in flight per thread),
//    warp-shuffle sum. Expand = a thread per kExpandColsPerThread output columns, each reading
//    its contiguous row of B_i (16-byte loads, all issued before the FMAs), xa broadcast from L1.
//  * prefill (long runs of tokens per adapter): blocks walk the segments of the sorted token
//    order, so each block reads one adapter's weights once for a whole tile of tokens.
#pragma once

#include "common.cuh"

namespace lk {

// ------------------------------------------------------------------------------------------
// dot products
// ------------------------------------------------------------------------------------------
// The dropout-free lane dot (all of serving): the same partial sums as lane_dot, but the
// vector loop issues kDotUnroll 16-byte loads of x and of a (2·kDotUnroll outstanding per
// thread, 8 at the default) before the first FMA that consumes them. Decode is latency bound
// unless every thread keeps several loads in flight; lane_dot (below, with dropout) keeps one
// pair per iteration.
constexpr int kDotUnroll = 4;

template <typename T>
__device__ __forceinline__ float lane_dot_nodrop(const T* __restrict__ x, const T* __restrict__ a,
                                                int64_t K, bool vec, int lane) {
  constexpr int V = Vec<T>::N;
  constexpr int64_t kStep = 32 * V;  // elements one vector load covers across the warp
  float acc = 0.f;
  int64_t k = lane;
  if (vec) {
    int64_t kv = static_cast<int64_t>(lane) * V;
    for (; kv + (kDotUnroll - 1) * kStep + V <= K; kv += kDotUnroll * kStep) {
      float xv[kDotUnroll][V], av[kDotUnroll][V];
      #pragma unroll
      for (int u = 0; u < kDotUnroll; ++u) {  // all loads first: they are independent
        load_vec(x + kv + u * kStep, xv[u]);
        load_vec(a + kv + u * kStep, av[u]);
      }
      #pragma unroll
      for (int u = 0; u < kDotUnroll; ++u) {
        #pragma unroll
        for (int i = 0; i < V; ++i) acc = fmaf(xv[u][i], av[u][i], acc);
      }
    }
    for (; kv + V <= K; kv += kStep) {  // the tail: fewer than kDotUnroll vectors per lane
      float xv[V], av[V];
      load_vec(x + kv, xv);
      load_vec(a + kv, av);
      #pragma unroll
      for (int i = 0; i < V; ++i) acc = fmaf(xv[i], av[i], acc);
    }
    k = K;  // vec implies K % V == 0: nothing left
  }
  for (; k < K; k += 32) acc = fmaf(to_f(x[k]), to_f(a[k]), acc);
  return acc;
}

// Lane-strided partial dot of x[0:K] (times the dropout factor of row m) with a[0:K]; the
// caller sums the 32 partials. `vec`: both rows 16-byte aligned and K a multiple of VEC.
template <typename T>
__device__ __forceinline__ float lane_dot(const T* __restrict__ x, const T* __restrict__ a,
                                         int64_t K, bool vec, const Dropout& d, int64_t m, int lane) {
  constexpr int V = Vec<T>::N;
  float acc = 0.f;
  int64_t k = lane;
  if (vec) {
    for (int64_t kv = static_cast<int64_t>(lane) * V; kv + V <= K; kv += 32 * V) {
      float xv[V], av[V], f[V];
      load_vec(x + kv, xv);
      load_vec(a + kv, av);
      dropout_factors<V>(d, m, K, kv, f);  // kv % V == 0: one Philox call for the vector
      #pragma unroll
      for (int i = 0; i < V; ++i) acc = fmaf(xv[i] * f[i], av[i], acc);
    }
    k = K;  // vec implies K % V == 0: nothing left
  }
  for (; k < K; k += 32) acc = fmaf(to_f(x[k]) * dropout_factor(d, m, K, k), to_f(a[k]), acc);
  return acc;
}

// Σ_{q < rank} xa[q]·b[q] for one output column; xa is float (global or shared), b a row of B_i.
// The vector loop is unrolled so a rank-16/32/64 row's 16-byte loads are all issued together.
template <typename T>
__device__ __forceinline__ float column_dot(const float* xa, const T* __restrict__ b, int rank, bool vec) {
  constexpr int V = Vec<T>::N;
  float acc = 0.f;
  int q = 0;
  if (vec) {
    for (; q + 4 * V <= rank; q += 4 * V) {
      float bv[4][V];
      #pragma unroll
      for (int u = 0; u < 4; ++u) load_vec(b + q + u * V, bv[u]);
      #pragma unroll
      for (int u = 0; u < 4; ++u) {
        #pragma unroll
        for (int i = 0; i < V; ++i) acc = fmaf(xa[q + u * V + i], bv[u][i], acc);
      }
    }
    for (; q + V <= rank; q += V) {
      float bv[V];
      load_vec(b + q, bv);
      #pragma unroll
      for (int i = 0; i < V; ++i) acc = fmaf(xa[q + i], bv[i], acc);
    }
  }
  for (; q < rank; ++q) acc = fmaf(xa[q], to_f(b[q]), acc);
  return acc;
}

// ------------------------------------------------------------------------------------------
// shrink, decode: grid (T, ceil(RR / kShrinkWarps)), one warp per (token, rank row)
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kShrinkWarps * 32)
shrink_decode_kernel(ShrinkParams p, bool vec) {
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int RR = p.R * p.n_slices;
  const int row = blockIdx.y * kShrinkWarps + warp;
  if (row >= RR) return;  // warp-uniform; the kernel has no block-wide barrier
  const int slot = slot_of(p.batch.adapter_ids, t, p.batch.num_slots);
  float* dst = p.out + t * RR + row;
  const int j = row / p.R, q = row - j * p.R;
  if (slot < 0 || q >= rank_of(p.ranks, slot, j, p.n_slices, p.R)) {
    if (lane == 0) *dst = 0.f;  // -1 tokens and rank rows past the slot's rank are zero
    return;
  }
  const T* x = static_cast<const T*>(p.x) + t * p.K;
  const T* a = static_cast<const T*>(p.lora_a) + (static_cast<int64_t>(slot) * RR + row) * p.K;
  const float part = p.drop.threshold ? lane_dot(x, a, p.K, vec, p.drop, t, lane)
                                      : lane_dot_nodrop(x, a, p.K, vec, lane);
  const float acc = warp_sum(part);
  if (lane == 0) *dst = acc * (p.scalings ? p.scalings[slot] : 1.f);
}

// ------------------------------------------------------------------------------------------
// shrink, prefill: grid (ceil(max_seg_len / kPT), n_slices * ceil(R / kPR), num_active)
// A block owns kPT tokens of one slot's segment (one thread per token) and kPR rank rows of
// one slice; K is staged through shared memory in kPK-wide chunks. Each thread keeps kPR
// accumulators; the A chunk is read as float4 broadcasts (all lanes read the same rank row),
// the x chunk lane-contiguous, so the inner loop is 5 shared loads per 16 FMAs. Rank tiles at
// or past the slot's rank exit at once: the cost follows the real rank (in steps of kPR).
// `out` is zeroed by the launcher, so -1 tokens and rows past the rank need no writes.
// ------------------------------------------------------------------------------------------
constexpr int kPT = 128, kPK = 32;  // kPR: lora_kernels.h

template <typename T>
__global__ void __launch_bounds__(kPT)
shrink_prefill_kernel(ShrinkParams p, bool vec) {
  constexpr int V = Vec<T>::N;
  int slot;
  int64_t seg_begin, seg_end;
  segment_of(p.batch, blockIdx.z, p.T, slot, seg_begin, seg_end);
  const int64_t tile0 = seg_begin + static_cast<int64_t>(blockIdx.x) * kPT;
  if (slot < 0 || tile0 >= seg_end) return;
  const int tiles_per_slice = ceil_div(p.R, kPR);
  const int j = blockIdx.y / tiles_per_slice;
  const int r0 = (blockIdx.y - j * tiles_per_slice) * kPR;
  const int rank = rank_of(p.ranks, slot, j, p.n_slices, p.R);
  if (r0 >= rank) return;
  const int nrows = min(kPR, rank - r0);
  const int ntok = static_cast<int>(min64(kPT, seg_end - tile0));
  const int RR = p.R * p.n_slices;
  const int64_t K = p.K;

  __shared__ float xs[kPK][kPT + 1];                  // +1: the transposing stores hit 32 banks
  __shared__ __align__(16) float as[kPK][kPR + 4];    // +4 keeps float4 rows, cuts store conflicts
  __shared__ int64_t tok[kPT];
  const int tid = threadIdx.x;
  tok[tid] = tid < ntok ? token_at(p.batch, tile0 + tid, p.T) : -1;
  __syncthreads();

  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.lora_a) + (static_cast<int64_t>(slot) * RR + j * p.R + r0) * K;
  float acc[kPR];
  #pragma unroll
  for (int i = 0; i < kPR; ++i) acc[i] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kPK) {
    // x chunk -> xs[k][token], dropout applied on the way in
    if (vec) {
      for (int c = tid; c < kPT * (kPK / V); c += kPT) {
        const int ti = c / (kPK / V), kc = (c % (kPK / V)) * V;
        const int64_t t = tok[ti];
        float v[V];
        if (t >= 0 && k0 + kc < K) {  // vec => K % V == 0: the chunk is all in or all out
          float f[V];
          load_vec(x + t * K + k0 + kc, v);
          dropout_factors<V>(p.drop, t, K, k0 + kc, f);  // (k0 + kc) % V == 0: one Philox call
          #pragma unroll
          for (int e = 0; e < V; ++e) v[e] *= f[e];
        } else {
          #pragma unroll
          for (int e = 0; e < V; ++e) v[e] = 0.f;
        }
        #pragma unroll
        for (int e = 0; e < V; ++e) xs[kc + e][ti] = v[e];
      }
    } else {
      for (int c = tid; c < kPT * kPK; c += kPT) {
        const int ti = c / kPK, kk = c % kPK;
        const int64_t t = tok[ti];
        float v = 0.f;
        if (t >= 0 && k0 + kk < K) v = to_f(x[t * K + k0 + kk]) * dropout_factor(p.drop, t, K, k0 + kk);
        xs[kk][ti] = v;
      }
    }
    // A chunk -> as[k][rank row]
    for (int c = tid; c < kPR * kPK; c += kPT) {
      const int rr = c / kPK, kk = c % kPK;
      as[kk][rr] = (rr < nrows && k0 + kk < K) ? to_f(a[rr * K + k0 + kk]) : 0.f;
    }
    __syncthreads();
    #pragma unroll 8
    for (int kk = 0; kk < kPK; ++kk) {
      const float xv = xs[kk][tid];
      const float4* a4 = reinterpret_cast<const float4*>(&as[kk][0]);
      #pragma unroll
      for (int q4 = 0; q4 < kPR / 4; ++q4) {
        const float4 w = a4[q4];
        acc[4 * q4 + 0] = fmaf(xv, w.x, acc[4 * q4 + 0]);
        acc[4 * q4 + 1] = fmaf(xv, w.y, acc[4 * q4 + 1]);
        acc[4 * q4 + 2] = fmaf(xv, w.z, acc[4 * q4 + 2]);
        acc[4 * q4 + 3] = fmaf(xv, w.w, acc[4 * q4 + 3]);
      }
    }
    __syncthreads();
  }
  const int64_t t = tok[tid];
  if (tid < ntok && t >= 0) {
    const float s = p.scalings ? p.scalings[slot] : 1.f;
    float* o = p.out + t * RR + j * p.R + r0;
    #pragma unroll
    for (int i = 0; i < kPR; ++i)
      if (i < nrows) o[i] = s * acc[i];
  }
}

// ------------------------------------------------------------------------------------------
// expand, decode: grid (T, ceil(N / (kExpandCols·kExpandColsPerThread))); each thread owns
// kExpandColsPerThread output columns kExpandCols apart (the warp's loads stay coalesced) and
// issues all their B-row loads before the FMAs: several 16-byte loads in flight per thread.
// ------------------------------------------------------------------------------------------
constexpr int kExpandColsPerThread = 2;

template <typename T>
__global__ void __launch_bounds__(kExpandCols)
expand_decode_kernel(ExpandParams p, bool vec) {
  const int64_t t = blockIdx.x;
  const int slot = slot_of(p.batch.adapter_ids, t, p.batch.num_slots);
  if (slot < 0) return;  // -1 rows stay bit-identical
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandCols * kExpandColsPerThread + threadIdx.x;
  const float* xa_row = p.xa + t * (static_cast<int64_t>(p.R) * p.n_slices);
  T* y = static_cast<T*>(p.y) + t * p.N;
  float acc[kExpandColsPerThread];
  #pragma unroll
  for (int c = 0; c < kExpandColsPerThread; ++c) {
    const int64_t n = n0 + c * kExpandCols;
    acc[c] = 0.f;
    if (n >= p.N) continue;
    const int j = slice_of(p.slice_start, p.n_slices, n);
    const int rank = rank_of(p.ranks, slot, j, p.n_slices, p.R);
    const T* b = static_cast<const T*>(p.lora_b) + (static_cast<int64_t>(slot) * p.N + n) * p.R;
    acc[c] = rank == 0 ? 0.f : column_dot(xa_row + j * p.R, b, rank, vec);
  }
  #pragma unroll
  for (int c = 0; c < kExpandColsPerThread; ++c) {
    const int64_t n = n0 + c * kExpandCols;
    if (n >= p.N) continue;
    const int j = slice_of(p.slice_start, p.n_slices, n);
    if (rank_of(p.ranks, slot, j, p.n_slices, p.R) == 0) continue;  // rank 0: y untouched
    y[n] = from_f<T>(to_f(y[n]) + acc[c]);  // one rounding of (y + delta)
  }
}

// ------------------------------------------------------------------------------------------
// expand, prefill: grid (ceil(max_seg_len / kET), ceil(N / kExpandCols), num_active)
// A block owns kET tokens of one segment and kExpandCols columns (one thread each). Per
// kEQ-wide rank chunk, the tokens' xa values for the slices this column tile touches are
// staged in shared memory (read back as float4 broadcasts) and each thread holds its column's
// kEQ B values in registers: kET·kEQ FMAs per kEQ global loads.
// ------------------------------------------------------------------------------------------
constexpr int kET = 16, kEQ = 16;

template <typename T>
__global__ void __launch_bounds__(kExpandCols)
expand_prefill_kernel(ExpandParams p) {
  int slot;
  int64_t seg_begin, seg_end;
  segment_of(p.batch, blockIdx.z, p.T, slot, seg_begin, seg_end);
  const int64_t tile0 = seg_begin + static_cast<int64_t>(blockIdx.x) * kET;
  if (slot < 0 || tile0 >= seg_end) return;
  const int ntok = static_cast<int>(min64(kET, seg_end - tile0));
  const int64_t n_first = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int64_t n = n_first + threadIdx.x;
  const int j_lo = slice_of(p.slice_start, p.n_slices, n_first);
  const int j_hi = slice_of(p.slice_start, p.n_slices, min64(p.N, n_first + kExpandCols) - 1);
  const int nsl = j_hi - j_lo + 1;
  int max_rank = 0;  // block-uniform loop bound
  for (int jj = j_lo; jj <= j_hi; ++jj) max_rank = max(max_rank, rank_of(p.ranks, slot, jj, p.n_slices, p.R));
  if (max_rank == 0) return;

  const bool col_ok = n < p.N;
  const int j = col_ok ? slice_of(p.slice_start, p.n_slices, n) : j_lo;
  const int my_rank = col_ok ? rank_of(p.ranks, slot, j, p.n_slices, p.R) : 0;
  const int64_t RR = static_cast<int64_t>(p.R) * p.n_slices;
  const T* b = static_cast<const T*>(p.lora_b) + (static_cast<int64_t>(slot) * p.N + (col_ok ? n : 0)) * p.R;

  __shared__ __align__(16) float xs[kET][kMaxSlices][kEQ];
  __shared__ int64_t tok[kET];
  const int tid = threadIdx.x;
  if (tid < kET) tok[tid] = tid < ntok ? token_at(p.batch, tile0 + tid, p.T) : -1;

  float acc[kET];
  #pragma unroll
  for (int i = 0; i < kET; ++i) acc[i] = 0.f;

  for (int q0 = 0; q0 < max_rank; q0 += kEQ) {
    __syncthreads();  // tok is visible; the previous chunk's xs reads are done
    for (int c = tid; c < kET * nsl * kEQ; c += kExpandCols) {
      const int ti = c / (nsl * kEQ), rem = c % (nsl * kEQ);
      const int jj = rem / kEQ, qq = rem % kEQ;
      const int64_t t = tok[ti];
      xs[ti][jj][qq] = (t >= 0 && q0 + qq < p.R) ? p.xa[t * RR + (j_lo + jj) * p.R + q0 + qq] : 0.f;
    }
    __syncthreads();
    const int nq = min(kEQ, my_rank - q0);  // <= 0: this column's rank is used up
    float bv[kEQ];
    #pragma unroll
    for (int qq = 0; qq < kEQ; ++qq) bv[qq] = qq < nq ? to_f(b[q0 + qq]) : 0.f;
    if (nq > 0) {
      #pragma unroll
      for (int ti = 0; ti < kET; ++ti) {
        const float4* x4 = reinterpret_cast<const float4*>(&xs[ti][j - j_lo][0]);
        #pragma unroll
        for (int q4 = 0; q4 < kEQ / 4; ++q4) {
          const float4 w = x4[q4];
          // xa past a column's rank is skipped, not multiplied by 0: a NaN there must not leak
          if (4 * q4 + 0 < nq) acc[ti] = fmaf(w.x, bv[4 * q4 + 0], acc[ti]);
          if (4 * q4 + 1 < nq) acc[ti] = fmaf(w.y, bv[4 * q4 + 1], acc[ti]);
          if (4 * q4 + 2 < nq) acc[ti] = fmaf(w.z, bv[4 * q4 + 2], acc[ti]);
          if (4 * q4 + 3 < nq) acc[ti] = fmaf(w.w, bv[4 * q4 + 3], acc[ti]);
        }
      }
    }
  }
  if (!col_ok || my_rank == 0) return;
  T* y = static_cast<T*>(p.y);
  #pragma unroll
  for (int ti = 0; ti < kET; ++ti) {
    const int64_t t = tok[ti];
    if (ti < ntok && t >= 0) y[t * p.N + n] = from_f<T>(to_f(y[t * p.N + n]) + acc[ti]);
  }
}

// ------------------------------------------------------------------------------------------
// fused decode shrink+expand: grid (T, ceil(N / cols_per_block)), kFusedThreads threads.
// Phase 1: the block computes s_i·x[t]·A_iᵀ for the slices its column range touches (warp per
// rank row) into shared memory. Phase 2: each thread expands its columns from there. The
// shrink is recomputed by every column block of a token — A_i comes from L2 after the first —
// in exchange for one launch and no xa round trip; the launcher sizes cols_per_block so the
// recomputation stays a small multiple. The block holding a slice's first column also writes
// that slice's xa (scaled, zeros past the rank) for the backward.
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
fused_decode_kernel(FusedDecodeParams p, bool vec_a, bool vec_b) {
  extern __shared__ float xs[];  // [(j_hi - j_lo + 1) * R]
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t RR = static_cast<int64_t>(p.R) * p.n_slices;
  const int slot = slot_of(p.adapter_ids, t, p.num_slots);
  if (slot < 0) {
    if (blockIdx.y == 0 && p.xa)
      for (int64_t i = tid; i < RR; i += kFusedThreads) p.xa[t * RR + i] = 0.f;
    return;
  }
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * p.cols_per_block;
  const int64_t n_end = min64(p.N, n_begin + p.cols_per_block);
  if (n_begin >= n_end) return;
  const int j_lo = slice_of(p.slice_start, p.n_slices, n_begin);
  const int j_hi = slice_of(p.slice_start, p.n_slices, n_end - 1);
  const float s = p.scalings[slot];
  const T* x = static_cast<const T*>(p.x) + t * p.K;

  const int rows = (j_hi - j_lo + 1) * p.R;
  for (int rr = warp; rr < rows; rr += kFusedThreads / 32) {
    const int jj = rr / p.R, q = rr - jj * p.R, j = j_lo + jj;
    float v = 0.f;
    if (q < rank_of(p.ranks, slot, j, p.n_slices, p.R)) {  // warp-uniform
      const T* a = static_cast<const T*>(p.lora_a) + (static_cast<int64_t>(slot) * RR + j * p.R + q) * p.K;
      v = s * warp_sum(lane_dot_nodrop(x, a, p.K, vec_a, lane));
    }
    if (lane == 0) {
      xs[rr] = v;
      if (p.xa && p.slice_start[j] >= n_begin) p.xa[t * RR + j * p.R + q] = v;
    }
  }
  __syncthreads();

  T* y = static_cast<T*>(p.y) + t * p.N;
  for (int64_t n = n_begin + tid; n < n_end; n += kFusedThreads) {
    const int j = slice_of(p.slice_start, p.n_slices, n);
    const int rank = rank_of(p.ranks, slot, j, p.n_slices, p.R);
    if (rank == 0) continue;
    const T* b = static_cast<const T*>(p.lora_b) + (static_cast<int64_t>(slot) * p.N + n) * p.R;
    const float acc = column_dot(xs + (j - j_lo) * p.R, b, rank, vec_b);
    y[n] = from_f<T>(to_f(y[n]) + acc);
  }
}

// ------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------
// Prefill tiles are 128 (shrink) / 16 (expand) tokens of one adapter: worth it once the
// average segment is long; below that the per-token decode kernels waste nothing.
inline bool use_prefill(const BatchMeta& b, int64_t T, int path) {
  if (path == 1) return false;
  const bool have_segments = b.adapter_ids == nullptr || (b.sorted_token_ids && b.seg_offsets && b.active_slots);
  if (!have_segments) return false;
  if (path == 2) return true;
  return T > 64 && T >= 32 * static_cast<int64_t>(b.num_active);
}

template <typename T>
cudaError_t launch_shrink_impl(const ShrinkParams& p, int path, cudaStream_t stream) {
  const int RR = p.R * p.n_slices;
  if (p.T == 0 || RR == 0) return cudaSuccess;
  constexpr int V = Vec<T>::N;
  const bool vec = p.K % V == 0 && aligned16(p.x) && aligned16(p.lora_a);
  if (use_prefill(p.batch, p.T, path)) {
    cudaError_t err = cudaMemsetAsync(p.out, 0, sizeof(float) * p.T * RR, stream);
    if (err != cudaSuccess) return err;
    const int nact = p.batch.adapter_ids ? p.batch.num_active : 1;
    const int64_t seg = p.batch.adapter_ids ? p.batch.max_seg_len : p.T;
    if (nact == 0 || seg == 0) return cudaSuccess;
    dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(seg, kPT)),
              static_cast<unsigned>(p.n_slices * ceil_div(p.R, kPR)), static_cast<unsigned>(nact));
    shrink_prefill_kernel<T><<<grid, kPT, 0, stream>>>(p, vec);
  } else {
    dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(ceil_div(RR, kShrinkWarps)));
    shrink_decode_kernel<T><<<grid, kShrinkWarps * 32, 0, stream>>>(p, vec);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand_impl(const ExpandParams& p, int path, cudaStream_t stream) {
  if (p.T == 0 || p.N == 0 || p.R == 0) return cudaSuccess;
  if (use_prefill(p.batch, p.T, path)) {
    if (p.batch.num_active == 0 || p.batch.max_seg_len == 0) return cudaSuccess;
    dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.batch.max_seg_len, kET)),
              static_cast<unsigned>(ceil_div<int64_t>(p.N, kExpandCols)),
              static_cast<unsigned>(p.batch.num_active));
    expand_prefill_kernel<T><<<grid, kExpandCols, 0, stream>>>(p);
  } else {
    const bool vec = p.R % Vec<T>::N == 0 && aligned16(p.lora_b);
    dim3 grid(static_cast<unsigned>(p.T),
              static_cast<unsigned>(ceil_div<int64_t>(p.N, kExpandCols * kExpandColsPerThread)));
    expand_decode_kernel<T><<<grid, kExpandCols, 0, stream>>>(p, vec);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused_decode_impl(FusedDecodeParams p, cudaStream_t stream) {
  if (p.T == 0 || p.N == 0) return cudaSuccess;
  const int64_t RR = static_cast<int64_t>(p.R) * p.n_slices;
  if (RR == 0) return cudaSuccess;  // nothing to add, xa is [T, 0]
  if (RR > kFusedDecodeMaxRankRows) return cudaErrorInvalidValue;
  // Aim for ~2 blocks per SM; more column blocks per token mean more shrink recomputation,
  // so widen the column range (up to 8 columns per thread) once there are enough tokens.
  const int sms = num_sms();
  int64_t cols = kFusedThreads;
  while (cols < 8 * kFusedThreads && p.T * ceil_div<int64_t>(p.N, 2 * cols) >= 2 * sms) cols *= 2;
  p.cols_per_block = cols;
  constexpr int V = Vec<T>::N;
  const bool vec_a = p.K % V == 0 && aligned16(p.x) && aligned16(p.lora_a);
  const bool vec_b = p.R % V == 0 && aligned16(p.lora_b);
  dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(ceil_div<int64_t>(p.N, cols)));
  const size_t smem = sizeof(float) * RR;
  fused_decode_kernel<T><<<grid, kFusedThreads, smem, stream>>>(p, vec_a, vec_b);
  return cudaGetLastError();
}

}  // namespace lk

// One dtype per translation unit: multi_lora_<dtype>.cu defines LK_MULTI_LORA_DTYPE and
// includes this file.
#define LK_INSTANTIATE_MULTI_LORA(T)                                                          \
  namespace lk {                                                                              \
  template <> cudaError_t launch_shrink<T>(const ShrinkParams& p, int path, cudaStream_t s) { \
    return launch_shrink_impl<T>(p, path, s);                                                 \
  }                                                                                           \
  template <> cudaError_t launch_expand<T>(const ExpandParams& p, int path, cudaStream_t s) { \
    return launch_expand_impl<T>(p, path, s);                                                 \
  }                                                                                           \
  template <> cudaError_t launch_fused_decode<T>(const FusedDecodeParams& p, cudaStream_t s) {\
    return launch_fused_decode_impl<T>(p, s);                                                 \
  }                                                                                           \
  }
