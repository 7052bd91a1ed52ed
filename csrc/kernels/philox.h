// The dropout keep-mask, definition v2 (docs/BACKENDS.md "Dropout"), as host+device functions:
// Philox4x32-10 and the map from a mask element to its 16 random bits.
//
// Element (m, k) of a [rows, cols] mask grid, G = ceil(cols / 8):
//   g = m·G + k / 8          (64-bit counter; counter words = (g lo32, g hi32, 0, 0))
//   r = philox4x32_10(key = (seed lo32, seed hi32), g)
//   v = 16-bit half (k % 8) % 2 of word (k % 8) / 2 of r   (half 0 = the low 16 bits)
//   kept iff v >= ceil(p · 2^16)
// — exactly lora_kernels.reference.dropout_keep_mask. One Philox call covers 8 consecutive
// columns of a row, so a kernel holding 8-aligned column groups pays ~1/8 of a Philox
// evaluation per element.
//
// Free of CUDA headers: nvcc compiles these as __host__ __device__, g++ as plain inline
// functions, which is how tests/csrc/mask_check.cpp proves on a CPU that the kernels' definition
// equals the reference's (tests/test_ext_mask_host.py).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lk {

constexpr int kKeepGroup = 8;            // mask elements per Philox call (4 words × 2 halves)
constexpr uint32_t kKeepOne = 1u << 16;  // threshold of p = 1: no 16-bit value reaches it

struct Philox4 { uint32_t x, y, z, w; };

LK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10, counter = (lo32, hi32, 0, 0), key = (seed lo32, seed hi32): the rounds of
// lora_kernels.reference.philox4x32, Triton's tl.randint4x and curand's Philox.
LK_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0; c1 = lo_b; c2 = n2; c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{c0, c1, c2, c3};
}

// Word j (0..3) of r. Selects, not an array index: a run-time index into a register array
// would send it to local memory.
LK_HD uint32_t philox_word(const Philox4& r, int j) {
  return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w;
}

// ceil(p · 2^16), computed in double (p·2^16 is exact, so the integer compare equals the
// reference's float64 test bits·2^-16 >= p); 0 means "no dropout" (p <= 0).
inline uint32_t keep_threshold(double p) {
  if (!(p > 0.0)) return 0;
  const double t = std::ceil(p * 65536.0);
  return t >= 65536.0 ? kKeepOne : static_cast<uint32_t>(t);
}

LK_HD int64_t keep_groups(int64_t cols) { return (cols + kKeepGroup - 1) / kKeepGroup; }

// Philox counter of the group holding element (m, k).
LK_HD uint64_t keep_counter(int64_t m, int64_t cols, int64_t k) {
  return static_cast<uint64_t>(m) * static_cast<uint64_t>(keep_groups(cols)) +
         static_cast<uint64_t>(k / kKeepGroup);
}

// Is lane j (= k % 8) of a group kept, given the group's draw r?
LK_HD bool keep_lane(const Philox4& r, int j, uint32_t threshold) {
  const uint32_t word = philox_word(r, j >> 1);
  const uint32_t bits = (j & 1) ? (word >> 16) : (word & 0xFFFFu);
  return bits >= threshold;
}

// One element (one Philox call for it alone: for unaligned leftovers only).
LK_HD bool keep_one(uint64_t seed, uint32_t threshold, int64_t m, int64_t cols, int64_t k) {
  return keep_lane(philox4x32_10(seed, keep_counter(m, cols, k)), static_cast<int>(k % kKeepGroup),
                   threshold);
}

// V consecutive elements (m, k0 .. k0+V-1) from one Philox call. Requires V | 8 and k0 % V == 0,
// so they lie in one group (16-byte vector loads: V = 8 for fp16/bf16, 4 for fp32).
template <int V>
LK_HD void keep_vec(uint64_t seed, uint32_t threshold, int64_t m, int64_t cols, int64_t k0,
                    bool (&keep)[V]) {
  static_assert(V >= 1 && kKeepGroup % V == 0, "a vector must not straddle two mask groups");
  const Philox4 r = philox4x32_10(seed, keep_counter(m, cols, k0));
  const int j0 = static_cast<int>(k0 % kKeepGroup);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < V; ++i) keep[i] = keep_lane(r, j0 + i, threshold);
}

// The packed keep mask (docs/BACKENDS.md, #13 item 4): byte g of row m holds the 8 elements of
// group g, bit j (LSB first) = column 8g + j, bits at or past `cols` 0 — one Philox call per
// byte. The Triton forward writes these bytes for the backward; the CUDA kernels still redraw
// the same bits from the seed (tests/test_ext_mask_host.py checks both against the reference).
LK_HD uint8_t keep_byte(uint64_t seed, uint32_t threshold, int64_t m, int64_t cols, int64_t g) {
  bool keep[kKeepGroup];
  keep_vec<kKeepGroup>(seed, threshold, m, cols, g * kKeepGroup, keep);
  uint32_t byte = 0;
  for (int j = 0; j < kKeepGroup; ++j)
    byte |= (keep[j] && g * kKeepGroup + j < cols ? 1u : 0u) << j;
  return static_cast<uint8_t>(byte);
}

// The mma.sync m16n8k16 accumulator layout: lane 4·rq + q of a warp holds, of the 16×8 tile at
// (row0, col0), rows row0 + rq and row0 + rq + 8 and columns col0 + 2q, col0 + 2q + 1 (elements
// e = 0..3: row + 8·(e >> 1), column + (e & 1)). With col0 % 8 == 0 the 4 lanes of a quad hold one
// mask group per row: lane q needs word q of its draw. For two tiles side by side (col0 and
// col0 + 8) a quad needs 4 groups; each lane draws ONE of them (group j = q) and three xor
// shuffles inside the quad hand every lane its word of the other three: one Philox call per
// 8 elements instead of one per 2.
//   keep[dn][e]: element e of the tile at column col0 + 8·dn, for the calling lane (row = row0+rq).
// `shfl_xor(v, mask)` returns lane (lane ^ mask)'s v: __shfl_xor_sync on the device (every lane
// of the warp must call this together), a lock-step emulation in the host test.
template <class ShflXor>
LK_HD void mma_pair_keep(uint64_t seed, uint32_t threshold, int64_t row, int64_t col0, int64_t cols,
                         int q, const ShflXor& shfl_xor, bool (&keep)[2][4]) {
  // group j = 2·dn + h: rows row + 8h, column group col0/8 + dn
  const int64_t dn = q >> 1, h = q & 1;
  const Philox4 mine = philox4x32_10(seed, keep_counter(row + 8 * h, cols, col0 + 8 * dn));
  uint32_t got[4] = {0, 0, 0, 0};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int s = 0; s < 4; ++s) {
    // round s: lane q receives from lane q ^ s, which drew group q ^ s and sends the word that
    // the receiver's q needs: word (sender ^ s) = q.
    uint32_t v = philox_word(mine, q ^ s);
    if (s != 0) v = shfl_xor(v, s);
    const int j = q ^ s;  // group just received; compile-time slots filled by selects
    got[0] = j == 0 ? v : got[0];
    got[1] = j == 1 ? v : got[1];
    got[2] = j == 2 ? v : got[2];
    got[3] = j == 3 ? v : got[3];
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < 2; ++d)
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 4; ++e) {
      const uint32_t word = got[2 * d + (e >> 1)];
      const uint32_t bits = (e & 1) ? (word >> 16) : (word & 0xFFFFu);
      keep[d][e] = bits >= threshold;
    }
}

}  // namespace lk
