// A CUTLASS sm90 TMA warp-specialized mainloop whose K loop runs over two operand pairs:
//
//   acc = [a | u] · [w | v]ᵀ  =  a·wᵀ  +  u·vᵀ
//
// k-tiles 0 .. kt_base-1 come from (a, w) through one pair of TMA descriptors, the last
// ceil(r / BLK_K) k-tiles from the low-rank pair (u, v) through a second pair. Both pairs land in
// the same shared-memory stages and feed the same wgmma consumer, so the low-rank term costs
// ceil(r / BLK_K) extra k-tiles of MMA and no concatenated copy of anything in memory. TMA
// zero-fills the box past each descriptor's K (the ragged last base tile, and u/v's r < BLK_K
// columns), so the padded products are exact zeros.
//
// Only the producer side differs from CUTLASS's collective: this type derives from it, keeps its
// shared storage, pipeline and consumer (`mma`, `mma_tail`) as they are, and replaces the
// arguments, the TMA setup and `load`. The kernel is launched with problem K' = kt_base·BLK_K + r,
// so the kernel layer's k-tile count (ceil(K' / BLK_K)) is exactly the concatenated loop.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>

namespace lk::cutlass_sm90 {

using namespace cute;

template <class Base>
struct LowRankMainloop : Base {
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using BaseParams = typename Base::Params;

  // Multicast would need the cluster masks of the base collective; one CTA per cluster keeps the
  // producer a plain two-pair loop (the persistent scheduler's swizzle gives the L2 reuse).
  static_assert(size(ClusterShape{}) == 1, "LowRankMainloop is written for 1x1x1 clusters");

  struct Arguments {
    ElementA const* ptr_a;  StrideA da;  // [M, K_base] (K-major)
    ElementB const* ptr_w;  StrideB dw;  // (N, K_base) in CUTLASS's B convention
    ElementA const* ptr_u;  StrideA du;  // [M, r]
    ElementB const* ptr_v;  StrideB dv;  // (N, r)
    int k_base;                          // K of the (a, w) pair
    int rank;                            // K of the (u, v) pair
  };

  struct Params : BaseParams {
    typename BaseParams::TMA_A tma_load_u;
    typename BaseParams::TMA_B tma_load_v;
    int kt_base;  // k-tiles of the (a, w) pair; later k-tiles read (u, v)
  };

  static constexpr int kBlockK = size<2>(TileShape{});

  // Rank 0 still gets a valid (never read) descriptor: TMA wants every extent >= 1 and CUTLASS's
  // alignment rule a contiguous extent that is a multiple of 8 (the caller then points u, v at
  // the base operands, whose K >= 8).
  static int descriptor_rank(int rank) { return rank > 0 ? rank : 8; }

  // Problem K' that makes the kernel layer iterate over both pairs.
  static int concatenated_k(int k_base, int rank) {
    return (k_base + kBlockK - 1) / kBlockK * kBlockK + rank;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)K;
    Params p;
    static_cast<BaseParams&>(p) = Base::to_underlying_arguments(
        make_shape(M, N, args.k_base, L),
        typename Base::Arguments{args.ptr_a, args.da, args.ptr_w, args.dw}, workspace);
    // Same shared-memory box as the base pair: the stages do not know which pair filled them.
    const int r_box = descriptor_rank(args.rank);
    Tensor u = make_tensor(reinterpret_cast<InternalElementA const*>(args.ptr_u),
                           make_layout(make_shape(M, r_box, L), args.du));
    Tensor v = make_tensor(reinterpret_cast<InternalElementB const*>(args.ptr_v),
                           make_layout(make_shape(N, r_box, L), args.dv));
    p.tma_load_u = make_tma_copy_A_sm90(GmemTiledCopyA{}, u, SmemLayoutA{}(_, _, Int<0>{}),
                                        TileShape{}, ClusterShape{});
    p.tma_load_v = make_tma_copy_B_sm90(GmemTiledCopyB{}, v, SmemLayoutB{}(_, _, Int<0>{}),
                                        TileShape{}, ClusterShape{});
    p.kt_base = (args.k_base + kBlockK - 1) / kBlockK;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    if (args.k_base < 0 || args.rank < 0 || K != concatenated_k(args.k_base, args.rank)) return false;
    // TMA alignment (16-byte strides) of each pair, checked by the base collective's rule.
    return Base::can_implement(make_shape(M, N, args.k_base, L),
                               typename Base::Arguments{args.ptr_a, args.da, args.ptr_w, args.dw}) &&
           Base::can_implement(make_shape(M, N, descriptor_rank(args.rank), L),
                               typename Base::Arguments{args.ptr_u, args.du, args.ptr_v, args.dv});
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p);
    cute::prefetch_tma_descriptor(p.tma_load_u.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_v.get_tma_descriptor());
  }

  // (gA, gB) over the whole concatenated K (the kernel layer takes its k-tile iterator from gA's
  // k mode), then the low-rank pair's tiled views. TMA tensors are coordinate tensors: their
  // extent only sets how far the iterator runs; the descriptors bound the real reads.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor gA = local_tile(p.tma_load_a.get_tma_tensor(make_shape(M, K, L)), TileShape{},
                           make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gB = local_tile(p.tma_load_b.get_tma_tensor(make_shape(N, K, L)), TileShape{},
                           make_coord(_, _, _), Step<X, _1, _1>{});
    Tensor gU = local_tile(p.tma_load_u.get_tma_tensor(make_shape(M, K, L)), TileShape{},
                           make_coord(_, _, _), Step<_1, X, _1>{});
    Tensor gV = local_tile(p.tma_load_v.get_tma_tensor(make_shape(N, K, L)), TileShape{},
                           make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(gA, gB, gU, gV);
  }

  // Producer: one elected thread issues, per k-tile, the two TMA loads of whichever pair owns it.
  template <class TensorA, class TensorB, class TensorU, class TensorV, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorU, TensorV> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t /*block_rank_in_cluster*/,
                           TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    auto [m, n, k, l] = blk_coord;
    (void)k;
    // A 1x1 cluster has one slice per descriptor.
    auto tma_a = p.tma_load_a.get_slice(0);
    auto tma_b = p.tma_load_b.get_slice(0);
    auto tma_u = p.tma_load_u.get_slice(0);
    auto tma_v = p.tma_load_v.get_slice(0);
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m, _, l));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n, _, l));
    Tensor tUgU = tma_u.partition_S(get<2>(load_inputs)(_, _, m, _, l));
    Tensor tVgV = tma_v.partition_S(get<3>(load_inputs)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBsB = tma_b.partition_D(sB);

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int kt = *k_tile_iter;
      if (kt < p.kt_base) {
        copy(p.tma_load_a.with(*barrier), tAgA(_, _, _, kt), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*barrier), tBgB(_, _, _, kt), tBsB(_, _, _, stage));
      } else {
        copy(p.tma_load_u.with(*barrier), tUgU(_, _, _, kt - p.kt_base), tAsA(_, _, _, stage));
        copy(p.tma_load_v.with(*barrier), tVgV(_, _, _, kt - p.kt_base), tBsB(_, _, _, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace lk::cutlass_sm90
