// The CUTLASS sm90 dX with dropout behind launch_lowrank_dx_dropout_sm90 (lora_gemm_sm90.h):
//
//   dx = dy·W0 + keep∘(u·A)·inv_keep        u = s·(dy·B) [M, r8], A [r8, K] (as v)
//
//   mainloop   CUTLASS's own TMA warp-specialized collective on dy·W0 (W0 read transposed,
//              MN-major, no copy): the base k-tiles only
//   schedule   KernelTmaWarpSpecializedCooperative, 128x128x64 (see below), PersistentScheduler,
//              as the fused kernel (lora_gemm_sm90.cuh) otherwise
//   epilogue   EVT  D = convert(acc + keep·(u·v)·inv_keep)  (Sm90LowRankDropoutAdd), TMA store
//
// Included only by the per-dtype instantiation files.
#pragma once

#include "kernels/cutlass/lora_gemm_sm90.cuh"
#include "kernels/cutlass/lowrank_dropout_epilogue.cuh"

namespace lk::cutlass_sm90 {

// 128x128: the epilogue holds the whole accumulator while it recomputes the rank-r product and
// draws Philox; at 128x256 (128 fp32 accumulators per consumer thread of the 168-register
// budget) ptxas spilled 1180 B per thread (measured here, -Xptxas -v), at 128x128 (64) it fits.
using DxDropoutTileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;

template <typename T>
struct LoraGemmDxDropout {
  using Element = typename CutlassType<T>::type;
  using LayoutA = cutlass::layout::RowMajor;  // dy [M, N_red]
  using LayoutB = cutlass::layout::RowMajor;  // W0 [N_red, K_out]: B N-major (transposed view)
  using LayoutD = cutlass::layout::RowMajor;

  using AddLowRank = cutlass::epilogue::fusion::Sm90EVT<Sm90LowRankDropoutAdd<Element, float, Element>,
                                                        cutlass::epilogue::fusion::Sm90AccFetch>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, DxDropoutTileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, AddLowRank>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element,
      LayoutB, kAlign, float, DxDropoutTileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using StrideD = typename Epilogue::StrideD;
};

template <typename T>
typename LoraGemmDxDropout<T>::Gemm::Arguments dx_dropout_arguments(const LowRankDropoutParams& d, int sms) {
  using G = LoraGemmDxDropout<T>;
  using E = typename G::Element;
  const LowRankGemmParams& p = d.gemm;
  typename G::Mainloop::Arguments mainloop{static_cast<const E*>(p.a), k_major<typename G::StrideA>(p.lda),
                                           static_cast<const E*>(p.w),
                                           b_stride<typename G::StrideB, true>(p.ldw)};
  typename G::Epilogue::Arguments epilogue{};
  typename Sm90LowRankDropoutAdd<E, float, E>::Arguments low_rank{};
  low_rank.ptr_u = static_cast<const E*>(p.u);
  low_rank.ldu = p.ldu;
  low_rank.ptr_v = static_cast<const E*>(p.v);
  low_rank.ldv = p.ldv;
  low_rank.rank = p.r;
  low_rank.keep = DxKeep{d.seed, d.threshold, p.N};
  low_rank.inv_keep = d.inv_keep;
  epilogue.thread = {{}, low_rank};
  epilogue.ptr_C = nullptr;
  epilogue.dC = k_major<typename G::StrideD>(p.ldo);
  epilogue.ptr_D = static_cast<E*>(p.out);
  epilogue.dD = k_major<typename G::StrideD>(p.ldo);
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {static_cast<int>(p.M), static_cast<int>(p.N), static_cast<int>(p.K), 1},
                                   mainloop, epilogue, cutlass::KernelHardwareInfo{0, sms}};
  args.scheduler.max_swizzle_size = 8;
  return args;
}

template <typename T>
cudaError_t run_dx_dropout(const LowRankDropoutParams& d, cudaStream_t stream) {
  using G = LoraGemmDxDropout<T>;
  if (d.gemm.M == 0 || d.gemm.N == 0) return cudaSuccess;
  if (!lowrank_dx_dropout_sm90_supported(d)) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  auto args = dx_dropout_arguments<T>(d, sm_count(device));
  args.hw_info.device_id = device;
  return launch_gemm<typename G::Gemm>(args, stream);
}

}  // namespace lk::cutlass_sm90

#define LK_LORA_DX_DROPOUT_INSTANTIATE(T)                                                     \
  namespace lk {                                                                              \
  template <>                                                                                 \
  cudaError_t launch_lowrank_dx_dropout_sm90<T>(const LowRankDropoutParams& d, cudaStream_t s) { \
    return cutlass_sm90::run_dx_dropout<T>(d, s);                                            \
  }                                                                                           \
  }
