// Host-only check, run by tests/test_cutlass.py (no GPU needed): for each "M N K r trans_b" line
// on stdin, print whether lk::lowrank_gemm_sm90_supported (the torch-free rule the op checks)
// and CUTLASS's own Kernel::can_implement accept the call, the global workspace it asks for and
// the kernel's shared memory. No CUDA API call is made: can_implement is host arithmetic.
#include <cstdio>

#include "kernels/cutlass/lora_gemm_sm90.cuh"

namespace {

template <typename T, bool TB>
void check(int M, int N, int K, int r) {
  using G = lk::cutlass_sm90::LoraGemm<T, TB>;
  using E = typename G::Element;
  alignas(16) static E buf[64];  // addresses only: nothing is read
  lk::LowRankGemmParams p;
  p.a = p.w = p.u = p.v = buf;
  p.out = buf;
  p.lda = K; p.ldw = TB ? N : K; p.ldo = N;
  p.ldu = r; p.ldv = TB ? N : r;
  p.M = M; p.N = N; p.K = K; p.r = r;
  typename G::Mainloop::Arguments ml{};
  ml.ptr_a = ml.ptr_w = ml.ptr_u = ml.ptr_v = buf;
  ml.da = lk::cutlass_sm90::k_major<typename G::StrideA>(p.lda);
  ml.dw = lk::cutlass_sm90::b_stride<typename G::StrideB, TB>(p.ldw);
  // as launch does: r = 0 points the low-rank pair at the base operands
  ml.du = lk::cutlass_sm90::k_major<typename G::StrideA>(r > 0 ? p.ldu : p.lda);
  ml.dv = lk::cutlass_sm90::b_stride<typename G::StrideB, TB>(r > 0 ? p.ldv : p.ldw);
  ml.k_base = K;
  ml.rank = r;
  typename G::Epilogue::Arguments ep{};
  ep.thread = {{}, {nullptr, E(0), {}}, {}};
  ep.dC = ep.dD = lk::cutlass_sm90::k_major<typename G::StrideD>(N);
  ep.ptr_D = buf;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, G::Mainloop::concatenated_k(K, r), 1}, ml, ep,
                                   cutlass::KernelHardwareInfo{0, 132}};
  std::printf("%d %d %d %d %d supported=%d can_implement=%d workspace=%zu smem=%d\n", M, N, K, r,
              int(TB), int(lk::lowrank_gemm_sm90_supported(p, TB)), int(G::Kernel::can_implement(args)),
              G::Gemm::get_workspace_size(args), int(G::Kernel::SharedStorageSize));
}

}  // namespace

int main() {
  int M, N, K, r, tb;
  while (std::scanf("%d %d %d %d %d", &M, &N, &K, &r, &tb) == 5) {
    if (tb) check<__nv_bfloat16, true>(M, N, K, r);
    else check<__half, false>(M, N, K, r);
  }
  return 0;
}
