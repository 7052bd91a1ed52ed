// Fused single-adapter LoRA GEMM on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 acc):
//
//     out[M, N] = a[M, K]·op(w) + bias + drop(scaling · u[M, r]·op(v))
//
// The low-rank term lives in the GEMM's own accumulator: the k-loop first runs over the r
// columns of (u, v) — the accumulator then holds u·op(v) exactly, so scaling and the dropout
// mask (one Philox call per 8 elements, philox.h) are applied right there, in registers — and
// then over the K columns of (a, w). The output is written once; no M×N temporary, no second pass.
// (LoRAFusion's "seed the accumulator" idea; here the seed is computed by the same mma loop.)
//
// Pipeline: STAGES-deep cp.async ring of (A, B) tiles in XOR-swizzled shared memory, ldmatrix
// into fragments, warps tiled WARPS_M × WARPS_N over the block tile. Operands whose leading
// dimension or base is not 16-byte aligned (odd K, odd r) take a synchronous element-wise
// load path into the same tiles, so any shape is correct; aligned shapes get the fast path.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace lk {

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct GemmCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int NT = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;              // mma tiles per warp
  static constexpr size_t smem_bytes = size_t(STAGES) * (BM + BN) * BK * 2;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be whole 16x16 ldmatrix blocks");
  static_assert(BK == 64 && BN >= 64, "the swizzle assumes >= 128-byte tile rows");
};

// M <= 32 (decode): small tiles so a 4096-wide output still spreads over 64+ blocks.
using GemmSmall = GemmCfg<32, 64, 64, 2, 2, 4>;    // 128 threads, 48 KB
using GemmMedium = GemmCfg<64, 128, 64, 2, 2, 3>;  // 128 threads, 72 KB
using GemmLarge = GemmCfg<128, 128, 64, 2, 4, 3>;  // 256 threads, 96 KB
static_assert(GemmSmall::BN == kGemmNarrowestBN && GemmMedium::BN >= kGemmNarrowestBN &&
                  GemmLarge::BN >= kGemmNarrowestBN, "the bindings check the grid with kGemmNarrowestBN");

// Element offset of (row, col) in a tile of ROW_ELEMS-element rows. The 16-byte chunk index is
// XORed with row % 8, so the 8 rows one ldmatrix phase reads hit 8 different bank groups.
template <int ROW_ELEMS>
__device__ __forceinline__ int swz(int row, int col) {
  return row * ROW_ELEMS + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// Rows [row0, row0+ROWS) x cols [col0, col0+COLS) of a row-major matrix (leading dim ld,
// bounds nrows x ncols) into a swizzled tile; zeros outside the bounds. `vec` promises a
// 16-byte aligned base, ld % 8 == 0 and ncols % 8 == 0, so each 8-element chunk is all in or out.
template <int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* g, int64_t ld, int64_t row0,
                                          int64_t nrows, int64_t col0, int64_t ncols, bool vec, int tid) {
  constexpr int CH = COLS / 8, TOTAL = ROWS * CH;
  #pragma unroll
  for (int i = 0; i < ceil_div(TOTAL, NT); ++i) {
    const int c = tid + i * NT;
    if (TOTAL % NT != 0 && c >= TOTAL) break;
    const int r = c / CH, ch = c % CH;
    const int64_t gr = row0 + r, gc = col0 + ch * 8;
    uint16_t* dst = tile + swz<COLS>(r, ch * 8);
    if (vec) {
      const bool in = gr < nrows && gc < ncols;
      cp_async16(dst, in ? g + gr * ld + gc : g, in ? 16 : 0);
    } else {
      union { uint4 u; uint16_t e[8]; } buf;
      #pragma unroll
      for (int e = 0; e < 8; ++e) buf.e[e] = (gr < nrows && gc + e < ncols) ? g[gr * ld + gc + e] : uint16_t(0);
      *reinterpret_cast<uint4*>(dst) = buf.u;
    }
  }
}

// vec bits: which operands may use cp.async
enum : uint32_t { kVecA = 1, kVecW = 2, kVecU = 4, kVecV = 8 };

template <typename T, bool TRANS_B, typename C>
__global__ void __launch_bounds__(C::NT)
fused_lora_gemm_kernel(GemmParams p, uint32_t vec) {
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, STAGES = C::STAGES, NT = C::NT;
  constexpr int MI = C::MI, NI = C::NI;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);  // [STAGES][BM][BK]
  uint16_t* sB = sA + STAGES * BM * BK;                   // [STAGES][BN][BK] or [STAGES][BK][BN]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / C::WARPS_N) * C::WM, wn0 = (warp % C::WARPS_N) * C::WN;
  const int64_t bm0 = static_cast<int64_t>(blockIdx.x) * BM, bn0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t rt = (p.r > 0 && p.u && p.v) ? ceil_div<int64_t>(p.r, BK) : 0;  // low-rank k-tiles
  const int64_t total = rt + ceil_div<int64_t>(p.K, BK);

  auto load_stage = [&](int64_t kt, int stage) {
    const bool low = kt < rt;
    const int64_t k0 = (low ? kt : kt - rt) * BK, kext = low ? p.r : p.K;
    const uint16_t* ga = static_cast<const uint16_t*>(low ? p.u : p.a);
    const uint16_t* gb = static_cast<const uint16_t*>(low ? p.v : p.w);
    const int64_t lda = low ? p.ldu : p.lda, ldb = low ? p.ldv : p.ldw;
    const bool va = vec & (low ? kVecU : kVecA), vb = vec & (low ? kVecV : kVecW);
    load_tile<BM, BK, NT>(sA + stage * BM * BK, ga, lda, bm0, p.M, k0, kext, va, tid);
    if constexpr (!TRANS_B)
      load_tile<BN, BK, NT>(sB + stage * BN * BK, gb, ldb, bn0, p.N, k0, kext, vb, tid);
    else
      load_tile<BK, BN, NT>(sB + stage * BN * BK, gb, ldb, k0, kext, bn0, p.N, vb, tid);
  };

  float acc[MI][NI][4];
  #pragma unroll
  for (int mi = 0; mi < MI; ++mi)
    #pragma unroll
    for (int ni = 0; ni < NI; ++ni)
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Fragment coordinates (PTX ISA, mma.m16n8k16): accumulator e of tile (mi, ni) sits at
  // row wm0 + mi*16 + lane/4 + 8*(e/2), column wn0 + ni*8 + 2*(lane%4) + e%2.
  // Dropout (mask v2, philox.h): the tile column bn0 + wn0 + ni*8 is a multiple of 8, so per
  // pair of 8-column mma tiles a quad holds 4 mask groups; mma_pair_keep draws one Philox call
  // per lane and shuffles the words: one call per 8 elements. p.drop.threshold is uniform, so
  // every lane reaches the shuffles together.
  static_assert(NI % 2 == 0, "mma_pair_keep takes the mma tiles in pairs");
  auto scale_low_rank = [&]() {
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
      #pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        const int64_t row = bm0 + wm0 + mi * 16 + (lane >> 2);
        const int64_t col0 = bn0 + wn0 + ni * 8;
        bool keep[2][4];
        if (p.drop.threshold)
          mma_pair_keep(p.drop.seed, p.drop.threshold, row, col0, p.N, lane & 3, WarpShflXor{}, keep);
        #pragma unroll
        for (int dn = 0; dn < 2; ++dn)
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = acc[mi][ni + dn][e] * p.scaling;
            if (p.drop.threshold) {
              const int64_t m = row + ((e >> 1) << 3);
              const int64_t n = col0 + dn * 8 + ((lane & 3) << 1) + (e & 1);
              // select, not multiply: a dropped NaN must read as 0, like torch.where
              v = (m < p.M && n < p.N && keep[dn][e]) ? v * p.drop.scale : 0.f;
            }
            acc[mi][ni + dn][e] = v;
          }
      }
  };

  auto compute_stage = [&](int stage) {
    const uint16_t* tA = sA + stage * BM * BK;
    const uint16_t* tB = sB + stage * BN * BK;
    #pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4], bf[NI][2];
      #pragma unroll
      for (int mi = 0; mi < MI; ++mi)  // lanes 0-15: rows 0-15 at k, lanes 16-31: rows 0-15 at k+8
        ldmatrix_x4(af[mi], tA + swz<BK>(wm0 + mi * 16 + (lane & 15), kk + ((lane >> 4) << 3)));
      #pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        // matrix q = lane/8 of the x4 load: n block (q/2), k half (q%2) -> b[ni + q/2][q%2]
        uint32_t r[4];
        if constexpr (!TRANS_B)  // tile [n][k]: rows are n, plain ldmatrix gives the col-major B fragment
          ldmatrix_x4(r, tB + swz<BK>(wn0 + ni * 8 + ((lane >> 4) << 3) + (lane & 7), kk + (((lane >> 3) & 1) << 3)));
        else  // tile [k][n]: rows are k, the transposing load gives the same fragment
          ldmatrix_x4_trans(r, tB + swz<BN>(kk + (((lane >> 3) & 1) << 3) + (lane & 7), wn0 + ni * 8 + ((lane >> 4) << 3)));
        bf[ni][0] = r[0]; bf[ni][1] = r[1]; bf[ni + 1][0] = r[2]; bf[ni + 1][1] = r[3];
      }
      #pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bf[ni]);
    }
  };

  // Prologue: STAGES-1 tiles in flight. A commit per slot, even an empty one, keeps the
  // wait_group arithmetic uniform.
  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < total) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < total; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's copies)...
    __syncthreads();              // ...for everyone's, and stage (kt-1) % STAGES is free again
    const int64_t nxt = kt + STAGES - 1;
    if (nxt < total) load_stage(nxt, static_cast<int>(nxt % STAGES));
    cp_async_commit();
    compute_stage(static_cast<int>(kt % STAGES));
    if (kt == rt - 1) scale_low_rank();  // accumulator == u·op(v) exactly here
  }
  cp_async_wait<0>();

  // Epilogue: + bias, round once, store (pairs of columns when the row stride allows).
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const bool pair_ok = (p.ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(p.out) % 4 == 0);
  #pragma unroll
  for (int mi = 0; mi < MI; ++mi)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = bm0 + wm0 + mi * 16 + (lane >> 2) + h * 8;
      if (m >= p.M) continue;
      T* orow = out + m * p.ldo;
      #pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int64_t n = bn0 + wn0 + ni * 8 + ((lane & 3) << 1);
        if (n >= p.N) continue;
        float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        const bool two = n + 1 < p.N;
        if (bias) {
          v0 += to_f(bias[n]);
          if (two) v1 += to_f(bias[n + 1]);
        }
        if (two && pair_ok) {
          *reinterpret_cast<typename Pack2<T>::type*>(orow + n) = Pack2<T>::make(v0, v1);
        } else {
          orow[n] = from_f<T>(v0);
          if (two) orow[n + 1] = from_f<T>(v1);
        }
      }
    }
}

template <typename T, bool TRANS_B, typename C>
cudaError_t run_fused_gemm(const GemmParams& p, uint32_t vec, cudaStream_t stream) {
  auto kernel = fused_lora_gemm_kernel<T, TRANS_B, C>;
  const int64_t gx = ceil_div<int64_t>(p.M, C::BM), gy = ceil_div<int64_t>(p.N, C::BN);
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidValue;
  if (C::smem_bytes > 48 * 1024) {
    // Opt in to > 48 KB of dynamic shared memory, once per device (harmless if raced).
    static bool done[64] = {};
    int dev = 0;
    cudaGetDevice(&dev);
    if (dev >= 64 || !done[dev]) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(C::smem_bytes));
      if (err != cudaSuccess) return err;
      if (dev < 64) done[dev] = true;
    }
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), C::NT, C::smem_bytes, stream>>>(p, vec);
  return cudaGetLastError();
}

// Tile choice: small tiles for decode-sized M; large tiles once they alone fill the GPU.
template <typename T, bool TRANS_B>
cudaError_t launch_fused_gemm_layout(const GemmParams& p, cudaStream_t stream) {
  auto ok = [](const void* ptr, int64_t ld, int64_t cols) {
    return ptr != nullptr && aligned16(ptr) && ld % 8 == 0 && cols % 8 == 0;
  };
  uint32_t vec = 0;
  if (ok(p.a, p.lda, p.K)) vec |= kVecA;
  if (ok(p.w, p.ldw, TRANS_B ? p.N : p.K)) vec |= kVecW;
  if (ok(p.u, p.ldu, p.r)) vec |= kVecU;
  if (ok(p.v, p.ldv, TRANS_B ? p.N : p.r)) vec |= kVecV;
  const int sms = num_sms();
  if (p.M <= GemmSmall::BM) return run_fused_gemm<T, TRANS_B, GemmSmall>(p, vec, stream);
  const int64_t large_blocks = ceil_div<int64_t>(p.M, GemmLarge::BM) * ceil_div<int64_t>(p.N, GemmLarge::BN);
  if (large_blocks >= sms) return run_fused_gemm<T, TRANS_B, GemmLarge>(p, vec, stream);
  return run_fused_gemm<T, TRANS_B, GemmMedium>(p, vec, stream);
}

}  // namespace lk

// fused_gemm_<dtype>_<layout>.cu: one (dtype, layout) pair per translation unit.
#define LK_INSTANTIATE_FUSED_GEMM(T, TRANS_B) \
  template cudaError_t lk::launch_fused_gemm_layout<T, TRANS_B>(const lk::GemmParams&, cudaStream_t);
