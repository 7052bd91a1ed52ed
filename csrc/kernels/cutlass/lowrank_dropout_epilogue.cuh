// EVT node for the CUTLASS dX with dropout (design (b) of notes/cutlass.md):
//
//   D = child + keep(m, n) · (u[m, :] · v[:, n]) · inv_keep
//
// child = the base accumulator dy·W0 (Sm90AccFetch), u = s·(dy·B) [M, r8], v = A [r8, K_out]
// (row-major), keep = mask v2 on the [M, N] grid of dx (docs/BACKENDS.md), inv_keep = 1/(1-p).
// The mask applies to the low-rank product alone, so it cannot share the mainloop's
// accumulator (the concatenated-K trick of lowrank_mainloop.cuh); this node recomputes the
// rank-r product per output element in the epilogue instead, reading u and v through L1 (the
// tile's u rows and v columns are 128·r8 + r8·256 elements, reused by every thread of the tile).
//
// The mask source is ONE device function, dx_keep_draw / dx_keep_lane below (regenerated from
// Philox now): a packed 1-bit keep mask written by the forward would replace only those two.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>

#include "kernels/philox.h"

namespace lk::cutlass_sm90 {

// The keep-mask source of the CUTLASS dX (mask v2, regenerated). dx_keep_draw is the group's
// draw (one Philox call per 8 columns), dx_keep_lane reads element k's bit from it. __host__
// __device__: tests/cuda/cutlass_dx_mask.cu runs these same functions on the CPU against
// lora_kernels.reference.dropout_keep_mask.
struct DxKeep {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // ceil(p·2^16); 0 = keep everything
  int64_t cols = 0;        // the mask grid's columns: dx's N (in_features)
};
LK_HD uint64_t dx_keep_group(const DxKeep& k, int64_t m, int64_t n) { return keep_counter(m, k.cols, n); }
LK_HD Philox4 dx_keep_draw(const DxKeep& k, uint64_t group) { return philox4x32_10(k.seed, group); }
LK_HD bool dx_keep_lane(const DxKeep& k, const Philox4& draw, int64_t n) {
  return keep_lane(draw, static_cast<int>(n % kKeepGroup), k.threshold);
}

template <class ElementLowRank>
struct LowRankDropoutArgs {
  ElementLowRank const* ptr_u = nullptr; int64_t ldu = 0;  // [M, r]
  ElementLowRank const* ptr_v = nullptr; int64_t ldv = 0;  // [r, N]
  int rank = 0;
  DxKeep keep{};
  float inv_keep = 1.f;  // 1/(1-p)
};

// Element (m, n)'s masked low-rank term keep(m, n)·(u[m, :]·v[:, n])·inv_keep. (last, draw)
// carry the previous element's Philox draw: consecutive elements of one 8-column group (the
// accumulator's column pairs) reuse it. Host+device: tests/cuda/cutlass_dx_dropout_check.cu
// runs this same function on the CPU.
template <class ElementLowRank>
LK_HD float dx_dropout_term(const LowRankDropoutArgs<ElementLowRank>& a, int m, int n, uint64_t& last,
                            Philox4& draw) {
  const uint64_t g = dx_keep_group(a.keep, m, n);
  if (g != last) { draw = dx_keep_draw(a.keep, g); last = g; }
  if (!dx_keep_lane(a.keep, draw, n)) return 0.f;
  const ElementLowRank* u = a.ptr_u + static_cast<int64_t>(m) * a.ldu;
  const ElementLowRank* v = a.ptr_v + n;
  float acc = 0.f;
  for (int j = 0; j < a.rank; ++j)
    acc += static_cast<float>(u[j]) * static_cast<float>(v[static_cast<int64_t>(j) * a.ldv]);
  return acc * a.inv_keep;
}

template <class ElementOutput, class ElementCompute, class ElementLowRank>
struct Sm90LowRankDropoutAdd {
  struct SharedStorage {};
  using Arguments = LowRankDropoutArgs<ElementLowRank>;
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& a, void*) { return a; }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& a) {
    return a.rank == 0 || (a.ptr_u != nullptr && a.ptr_v != nullptr);
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE Sm90LowRankDropoutAdd() {}
  CUTLASS_HOST_DEVICE Sm90LowRankDropoutAdd(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor, class Origin>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor c, Origin o, int m_max, int n_max, Params const& p)
        : tCcD(c), origin(o), M(m_max), N(n_max), params(p) {}
    CTensor tCcD;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N): coordinates relative to this thread's first
    Origin origin; // this thread's first (m, n) in the problem
    int M, N;
    Params const& params;

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementOutput, FragmentSize>
    visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
          cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      cutlass::NumericArrayConverter<ElementCompute, ElementInput, FragmentSize> to_compute;
      cutlass::NumericArrayConverter<ElementOutput, ElementCompute, FragmentSize> to_output;
      cutlass::Array<ElementCompute, FragmentSize> out = to_compute(frg_input);
      auto c_mn = tCcD(cute::_, cute::_, cute::_, epi_m, epi_n);
      // Consecutive fragment elements share a mask group (wgmma holds column pairs): the draw
      // is reused while the group stays the same (one Philox call per pair at worst).
      uint64_t last = ~uint64_t(0);
      Philox4 draw{0, 0, 0, 0};
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        auto c = c_mn(epi_v * FragmentSize + i);
        const int m = static_cast<int>(cute::get<0>(origin)) + static_cast<int>(cute::get<0>(c));
        const int n = static_cast<int>(cute::get<1>(origin)) + static_cast<int>(cute::get<1>(c));
        if (m >= M || n >= N) continue;  // the TMA store clips these
        out[i] += static_cast<ElementCompute>(dx_dropout_term(params, m, n, last, draw));
      }
      return to_output(out);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    // residue_tCcD = (M, N) - this thread's first coordinate (sm90 collective epilogue)
    auto origin = cute::make_coord(static_cast<int>(M) - static_cast<int>(cute::get<0>(args.residue_tCcD)),
                                   static_cast<int>(N) - static_cast<int>(cute::get<1>(args.residue_tCcD)));
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(origin)>(args.tCcD, origin, static_cast<int>(M),
                                                                         static_cast<int>(N), params);
  }
};

}  // namespace lk::cutlass_sm90
