// The CUTLASS 3.x sm90 kernel behind launch_lowrank_gemm_sm90 (lora_gemm_sm90.h):
//
//   mainloop   LowRankMainloop over CUTLASS's TMA warp-specialized collective (two operand pairs)
//   schedule   KernelTmaWarpSpecializedCooperative: one producer warp group issuing TMA, two
//              consumer warp groups splitting the 128x256 tile's rows, wgmma from shared memory
//   scheduler  PersistentScheduler: one CTA per SM walking the output tiles (swizzled raster)
//   epilogue   an EVT  D = convert(acc + bias[n])  (bias row broadcast, nullptr -> 0), TMA store
//
// Included only by the per-(dtype, layout) instantiation files, so each compiles on its own.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cutlass/lora_gemm_sm90.h"
#include "kernels/cutlass/lowrank_mainloop.cuh"

namespace lk::cutlass_sm90 {

template <typename T> struct CutlassType;
template <> struct CutlassType<__half> { using type = cutlass::half_t; };
template <> struct CutlassType<__nv_bfloat16> { using type = cutlass::bfloat16_t; };

// One tile configuration for every instantiation (few instantiations keep the CI build short).
using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
constexpr int kAlign = 8;  // elements per 16 bytes: the TMA stride rule for 16-bit types

template <typename T, bool TRANS_B>
struct LoraGemm {
  using Element = typename CutlassType<T>::type;
  using LayoutA = cutlass::layout::RowMajor;  // a [M, K] row-major
  // forward: w [N, K] row-major = B (K x N) column-major (K-major);
  // dX: w [K_red, N_out] row-major = B row-major (N-major, transposed view, no copy)
  using LayoutB = std::conditional_t<TRANS_B, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using LayoutD = cutlass::layout::RowMajor;

  using BiasRow = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float>;
  using AddBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, BiasRow>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,     // no C source
      Element, LayoutD, kAlign,  // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, AddBias>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element,
      LayoutB, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = LowRankMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using StrideD = typename Epilogue::StrideD;
};

// (rows, reduction) strides of a row-major [rows, red] matrix (K-major) ...
template <class Stride> Stride k_major(int64_t ld) {
  Stride s{};
  cute::get<0>(s) = ld;
  return s;
}
// ... and of B: forward w [N, K] is K-major; dX's w [K_red, N_out] is read as (N_out, K_red),
// the transposed view (MN-major), with no copy.
template <class Stride, bool TRANS_B> Stride b_stride(int64_t ld) {
  Stride s{};
  if constexpr (TRANS_B) cute::get<1>(s) = ld;
  else cute::get<0>(s) = ld;
  return s;
}

inline int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cached[device] == 0) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

// can_implement, no workspace, initialize, run: the launch every CUTLASS GEMM here shares.
// The persistent (non-stream-K) scheduler and these epilogues need no global workspace.
template <typename Gemm>
cudaError_t launch_gemm(const typename Gemm::Arguments& args, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorNotSupported;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

template <typename T, bool TRANS_B>
cudaError_t run(const LowRankGemmParams& p, cudaStream_t stream) {
  using G = LoraGemm<T, TRANS_B>;
  using E = typename G::Element;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!lowrank_gemm_sm90_supported(p, TRANS_B)) return cudaErrorInvalidValue;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  const int kp = G::Mainloop::concatenated_k(K, p.r);

  typename G::Mainloop::Arguments mainloop{};
  mainloop.ptr_a = static_cast<const E*>(p.a);
  mainloop.da = k_major<typename G::StrideA>(p.lda);
  mainloop.ptr_w = static_cast<const E*>(p.w);
  mainloop.dw = b_stride<typename G::StrideB, TRANS_B>(p.ldw);
  // r == 0: the low-rank descriptors point at the base operands; no k-tile ever reads them.
  mainloop.ptr_u = static_cast<const E*>(p.r > 0 ? p.u : p.a);
  mainloop.du = k_major<typename G::StrideA>(p.r > 0 ? p.ldu : p.lda);
  mainloop.ptr_v = static_cast<const E*>(p.r > 0 ? p.v : p.w);
  mainloop.dv = b_stride<typename G::StrideB, TRANS_B>(p.r > 0 ? p.ldv : p.ldw);
  mainloop.k_base = K;
  mainloop.rank = p.r;

  typename G::Epilogue::Arguments epilogue{};
  epilogue.thread = {{}, {static_cast<const E*>(p.bias), E(0), {}}, {}};
  epilogue.ptr_C = nullptr;
  epilogue.dC = k_major<typename G::StrideD>(p.ldo);
  epilogue.ptr_D = static_cast<E*>(p.out);
  epilogue.dD = k_major<typename G::StrideD>(p.ldo);

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  cutlass::KernelHardwareInfo hw{device, sm_count(device)};

  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {M, N, kp, 1},
                                   mainloop, epilogue, hw};
  args.scheduler.max_swizzle_size = 8;  // groups of 8 tiles share their a/w panels in L2

  return launch_gemm<typename G::Gemm>(args, stream);
}

}  // namespace lk::cutlass_sm90

// One explicit instantiation per translation unit: LK_LORA_GEMM_INSTANTIATE(__half, false).
#define LK_LORA_GEMM_INSTANTIATE(T, TRANS_B)                                                  \
  namespace lk {                                                                              \
  template <>                                                                                 \
  cudaError_t launch_lowrank_gemm_sm90<T, TRANS_B>(const LowRankGemmParams& p, cudaStream_t s) { \
    return cutlass_sm90::run<T, TRANS_B>(p, s);                                              \
  }                                                                                           \
  }
