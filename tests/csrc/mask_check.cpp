// Host build of the CUDA kernels' dropout-mask functions (csrc/kernels/philox.h), for
// tests/test_ext_mask_host.py: prints the [rows, cols] keep-mask as each kernel draws it, so a
// CPU run proves the CUDA definition equals lora_kernels.reference.dropout_keep_mask.
//
//   mask_check MODE SEED ROWS COLS P ROW_OFFSET
//     MODE words : the 4 Philox words of counters 0..ROWS-1 (SEED as key), one line each
//     MODE one   : keep_one per element (the unaligned leftovers of the shrink kernels)
//     MODE bits  : keep_byte per group: the packed mask, ceil(COLS/8) bytes per row
//     MODE vec8  : keep_vec<8> per 8 columns (dropout_mask_kernel; fp16/bf16 shrink vectors)
//     MODE vec4  : keep_vec<4> per 4 columns (fp32 shrink vectors)
//     MODE quad  : mma_pair_keep in the fused GEMM's accumulator layout, the 4 lanes of each quad
//                  run as 4 threads in lock step, their shuffles through shared slots
//   mask rows print as strings of '0'/'1'.
#include <barrier>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "philox.h"

namespace {

// Four "lanes" of a quad. shfl_xor(v, mask): every lane publishes v, waits for all, reads lane
// (q ^ mask)'s value, waits again (so the slot is not overwritten before everyone read it).
struct Quad {
  std::barrier<> sync{4};
  uint32_t slot[4] = {0, 0, 0, 0};
};

struct LockStepShfl {
  Quad* quad;
  int q;
  uint32_t operator()(uint32_t v, int mask) const {
    quad->slot[q] = v;
    quad->sync.arrive_and_wait();
    const uint32_t got = quad->slot[q ^ mask];
    quad->sync.arrive_and_wait();
    return got;
  }
};

void print_mask(const std::vector<char>& mask, int64_t rows, int64_t cols) {
  for (int64_t m = 0; m < rows; ++m) {
    fwrite(mask.data() + m * cols, 1, static_cast<size_t>(cols), stdout);
    fputc('\n', stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s words|bits|one|vec8|vec4|quad SEED ROWS COLS P ROW_OFFSET\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  const uint64_t seed = strtoull(argv[2], nullptr, 0);
  const int64_t rows = strtoll(argv[3], nullptr, 0), cols = strtoll(argv[4], nullptr, 0);
  const double p = strtod(argv[5], nullptr);
  const int64_t off = strtoll(argv[6], nullptr, 0);
  const uint32_t thr = lk::keep_threshold(p);
  std::vector<char> mask(static_cast<size_t>(rows * cols), '?');
  auto set = [&](int64_t m, int64_t k, bool keep) {
    if (m < rows && k < cols) mask[m * cols + k] = keep ? '1' : '0';
  };

  if (mode == "words") {
    for (int64_t c = 0; c < rows; ++c) {
      const lk::Philox4 r = lk::philox4x32_10(seed, static_cast<uint64_t>(c));
      printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 "\n", r.x, r.y, r.z, r.w);
    }
    return 0;
  }
  if (mode == "bits") {  // packed mask: one line of ceil(cols/8) bytes per row
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t g = 0; g < lk::keep_groups(cols); ++g)
        printf("%u ", static_cast<unsigned>(lk::keep_byte(seed, thr, m + off, cols, g)));
      printf("\n");
    }
    return 0;
  }
  printf("threshold %" PRIu32 "\n", thr);
  if (mode == "one") {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < cols; ++k) set(m, k, lk::keep_one(seed, thr, m + off, cols, k));
  } else if (mode == "vec8" || mode == "vec4") {
    const int V = mode == "vec8" ? 8 : 4;
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k0 = 0; k0 < cols; k0 += V) {
        if (V == 8) {
          bool keep[8];
          lk::keep_vec<8>(seed, thr, m + off, cols, k0, keep);
          for (int i = 0; i < 8; ++i) set(m, k0 + i, keep[i]);
        } else {
          bool keep[4];
          lk::keep_vec<4>(seed, thr, m + off, cols, k0, keep);
          for (int i = 0; i < 4; ++i) set(m, k0 + i, keep[i]);
        }
      }
  } else if (mode == "quad") {
    // The fused GEMM walks the grid in 16-row × 16-column pairs of mma tiles; lane 4·rq + q holds
    // rows row0 + rq (+8) and columns col0 + 2q (+1) of each tile (fused_gemm.cuh).
    for (int64_t row0 = 0; row0 < rows; row0 += 16)
      for (int64_t col0 = 0; col0 < cols; col0 += 16)
        for (int rq = 0; rq < 8; ++rq) {
          Quad quad;
          bool keep[4][2][4];
          std::vector<std::thread> lanes;
          for (int q = 0; q < 4; ++q)
            lanes.emplace_back([&, q] {
              lk::mma_pair_keep(seed, thr, row0 + rq + off, col0, cols, q, LockStepShfl{&quad, q}, keep[q]);
            });
          for (auto& t : lanes) t.join();
          for (int q = 0; q < 4; ++q)
            for (int dn = 0; dn < 2; ++dn)
              for (int e = 0; e < 4; ++e)
                set(row0 + rq + 8 * (e >> 1), col0 + 8 * dn + 2 * q + (e & 1), keep[q][dn][e]);
        }
  } else {
    fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  print_mask(mask, rows, cols);
  return 0;
}
