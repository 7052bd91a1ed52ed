// Host-only check of the CUTLASS dX-with-dropout kernel, run by tests/test_cutlass.py (no GPU):
//   "mask ROWS COLS SEED P"  -> ROWS lines of COLS characters '0'/'1': element (m, n)'s keep bit
//       as the kernel's epilogue computes it (dx_dropout_term, the same __host__ __device__
//       function, with u = v = 1, r = 1, inv_keep = 2: the term is 2·keep), columns walked in
//       order with the draw carried along as the epilogue carries it across a fragment;
//   "impl M N K R"            -> whether lowrank_dx_dropout_sm90_supported (the op's rule) and
//       CUTLASS's Kernel::can_implement accept the call, its workspace and shared memory.
// No CUDA API call is made.
#include <cstdio>
#include <vector>

#include "kernels/cutlass/lora_gemm_dx_dropout.cuh"

namespace {

using E = cutlass::bfloat16_t;
using G = lk::cutlass_sm90::LoraGemmDxDropout<__nv_bfloat16>;

int mask(int rows, int cols, unsigned long long seed, double p) {
  std::vector<E> u(rows, E(1.f)), v(cols, E(1.f));
  lk::cutlass_sm90::LowRankDropoutArgs<E> a;
  a.ptr_u = u.data(); a.ldu = 1;
  a.ptr_v = v.data(); a.ldv = cols;
  a.rank = 1;
  a.keep = lk::cutlass_sm90::DxKeep{seed, lk::keep_threshold(p), cols};
  a.inv_keep = 2.f;
  std::vector<char> line(cols + 1, 0);
  for (int m = 0; m < rows; ++m) {
    uint64_t last = ~uint64_t(0);
    lk::Philox4 draw{0, 0, 0, 0};
    for (int n = 0; n < cols; ++n) {
      const float t = lk::cutlass_sm90::dx_dropout_term(a, m, n, last, draw);
      if (t != 0.f && t != 2.f) return 1;  // the term is exactly keep·1·1·2
      line[n] = t == 2.f ? '1' : '0';
    }
    std::printf("%s\n", line.data());
  }
  return 0;
}

void impl(int M, int N, int K, int r) {
  alignas(16) static E buf[64];  // addresses only: nothing is read
  lk::LowRankDropoutParams d;
  lk::LowRankGemmParams& p = d.gemm;
  p.a = p.w = p.u = p.v = buf;
  p.out = buf;
  p.lda = K; p.ldw = N; p.ldo = N; p.ldu = r; p.ldv = N;
  p.M = M; p.N = N; p.K = K; p.r = r;
  d.seed = 7; d.threshold = lk::keep_threshold(0.1); d.inv_keep = 1.f / 0.9f;
  auto args = lk::cutlass_sm90::dx_dropout_arguments<__nv_bfloat16>(d, 132);
  std::printf("%d %d %d %d supported=%d can_implement=%d workspace=%zu smem=%d\n", M, N, K, r,
              int(lk::lowrank_dx_dropout_sm90_supported(d)), int(G::Kernel::can_implement(args)),
              G::Gemm::get_workspace_size(args), int(G::Kernel::SharedStorageSize));
}

}  // namespace

int main() {
  char mode[8];
  while (std::scanf("%7s", mode) == 1) {
    if (mode[0] == 'm') {
      int rows, cols; unsigned long long seed; double p;
      if (std::scanf("%d %d %llu %lf", &rows, &cols, &seed, &p) != 4) return 2;
      if (mask(rows, cols, seed, p) != 0) return 3;
    } else {
      int M, N, K, r;
      if (std::scanf("%d %d %d %d", &M, &N, &K, &r) != 4) return 2;
      impl(M, N, K, r);
    }
  }
  return 0;
}
