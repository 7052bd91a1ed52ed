"""The Triton draw of the v2 dropout mask (#13 item 4, notes/maskdraw.md): the Philox4x32-10
written with 32x32->64 products, the wrap-around half compares, the byte pack from lane masks
and the 16-bit pair masking of x must give the reference's bits exactly.

Runs in the interpreter (fp32/fp16: the interpreter gets bf16 wrong); the compiled forms are
checked on a GPU by the GPU-marked test at the end.
"""

import pytest
import torch
import triton
import triton.language as tl

from lora_kernels import reference as ref

DR = pytest.importorskip("lora_kernels.triton.dropout")
from lora_kernels.triton.lowrank import shrink  # noqa: E402


@triton.jit
def _philox_words_kernel(lo_ptr, hi_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n
    lo = tl.load(lo_ptr + i, mask=ok, other=0).to(tl.uint32)
    hi = tl.load(hi_ptr + i, mask=ok, other=0).to(tl.uint32)
    w0, w1, w2, w3 = DR._philox4x32_10(lo, hi, seed)
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=ok)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 3, 2**63 + 5, 2**64 - 1])
def test_philox_matches_reference_words(seed):
    # counters with a nonzero high word (g >= 2^32) and the lane-0 known-answer counter 0
    g = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 17, 2**40 + 12345, 2**62 + 9],
                     dtype=torch.int64)
    out = torch.empty(g.numel(), 4, dtype=torch.int64)
    _philox_words_kernel[(1,)](g & 0xFFFFFFFF, g >> 32, out, g.numel(), DR.seed_arg(seed),
                               BLOCK=8)
    want = torch.stack(ref.philox4x32(seed, g), dim=1)
    assert torch.equal(out, want)


def test_philox_known_answer():
    # Random123 kat_vectors: philox4x32_10, key 0, counter 0
    out = torch.empty(1, 4, dtype=torch.int64)
    _philox_words_kernel[(1,)](torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                               out, 1, 0, BLOCK=1)
    assert [hex(v) for v in out[0].tolist()] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c",
                                                  "0x9b00dbd8"]


@triton.jit
def _keep_tile_kernel(out_ptr, rows, cols, row0, seed, threshold, ROWS: tl.constexpr,
                      COLS: tl.constexpr):
    rr = tl.arange(0, ROWS)
    cc = tl.arange(0, COLS)
    keep = DR.keep_tile(seed, row0, 0, cols, threshold, ROWS, COLS)
    tl.store(out_ptr + rr[:, None] * cols + cc[None, :], keep.to(tl.int8),
             mask=(rr < rows)[:, None] & (cc < cols)[None, :])


# 16x128: the wide (32x32->64) Philox products; 128x256: the narrow ones keep_tile takes for
# the 128x256 dX epilogue (the wide ones spilled there): the same words either way
@pytest.mark.parametrize("ROWS,COLS,rows,cols", [(16, 128, 13, 125), (128, 256, 128, 250)])
def test_keep_tile_both_product_forms(ROWS, COLS, rows, cols):
    seed, p, row0 = 2**63 + 21, 0.3, 2**29 + 7  # row0·G passes 2^32: counter high word
    out = torch.empty(rows, cols, dtype=torch.int8)
    _keep_tile_kernel[(1,)](out, rows, cols, row0, DR.seed_arg(seed), DR.drop_threshold(p),
                            ROWS=ROWS, COLS=COLS)
    want = ref.dropout_keep_mask(seed, rows, cols, p, row_offset=row0)
    assert torch.equal(out.bool(), want)


# p at the threshold edges: T = 1 (tiny p), T = 2^16 - 1, T = 2^15 (a half straddles the
# carry bit), and ordinary rates
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 1 - 2**-16])
@pytest.mark.parametrize("rows,cols", [(5, 37), (16, 128), (9, 200), (3, 8)])
def test_bits_kernel_at_threshold_edges(p, rows, cols):
    seed = 2**63 + 11
    got = DR.dropout_keep_packed(seed, rows, cols, p, row_offset=4)
    assert torch.equal(got, ref.dropout_keep_packed(seed, rows, cols, p, row_offset=4))
    mask = DR.dropout_keep_mask(seed, rows, cols, p, row_offset=4)
    assert torch.equal(mask, ref.dropout_keep_mask(seed, rows, cols, p, row_offset=4))


def test_bits_kernel_drop_all():
    # p = 1: T = 2^16, the wrap-around constant is 0xFFFF0000: nothing is kept
    got = DR.dropout_keep_packed(5, 4, 21, 1.0)
    assert torch.equal(got, torch.zeros(4, 3, dtype=torch.uint8))
    assert torch.equal(got, ref.dropout_keep_packed(5, 4, 21, 1.0))


# K % 8 == 0 with a partial last K tile (no padding bits: PARTIAL_GROUPS off), K % 8 != 0
# (padding cleared), a K of one group; fp16 takes the 32-bit pair masking, fp32 the select;
# fp16 at K % 16 == 0 runs the two half tiles per K step (HALF_TILES), 240 with the second
# half of the last step wholly past K
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-4)])
@pytest.mark.parametrize("M,K", [(33, 200), (17, 203), (8, 8), (40, 256), (19, 240)])
@pytest.mark.parametrize("p", [0.05, 0.5, 1 - 2**-16])
def test_shrink_draw_equals_reference(dtype, tol, M, K, p):
    torch.manual_seed(K)
    seed, r = 2**63 + 3, 6
    x = torch.randn(M, K).to(dtype)
    a = (torch.randn(r, K) / K**0.5).to(dtype)
    bits = torch.full((M, (K + 7) // 8), 0x5A, dtype=torch.uint8)
    u = shrink(x, a, torch.empty(M, r, dtype=dtype), p, seed, keep_bits=bits)
    assert torch.equal(bits, ref.dropout_keep_packed(seed, M, K, p))
    want = ref.apply_dropout(x.double(), seed, p) @ a.double().t()
    torch.testing.assert_close(u.double(), want, rtol=tol, atol=tol)
    # without bits the same mask is applied
    u2 = shrink(x, a, torch.empty(M, r, dtype=dtype), p, seed)
    assert torch.equal(u, u2)


def test_shrink_masks_by_bits_not_by_value():
    # the pair masking ANDs bit patterns: a kept -1.5 (sign bit set) survives exactly
    M, K, p, seed = 4, 16, 0.5, 99
    x = torch.tensor([[3.0, -0.0, -1.5, 2.0] * 4] * M, dtype=torch.float16)
    a = torch.zeros(1, K, dtype=torch.float16)
    a[0, 2] = 1.0  # u picks column 2 (-1.5) where kept
    u = shrink(x, a, torch.empty(M, 1, dtype=torch.float16), p, seed)
    keep = ref.dropout_keep_mask(seed, M, K, p)
    want = torch.where(keep[:, 2], torch.tensor(-1.5 / (1 - p)), torch.tensor(0.0))
    assert torch.equal(u[:, 0].float(), want.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,p", [(8192, 4096, 0.05), (300, 1003, 0.1), (64, 200, 1 - 2**-16)])
def test_gpu_shrink_draw_equals_reference(dtype, M, K, p):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    seed, r = 2**63 + 7, 16
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    a = torch.randn(r, K, device="cuda", dtype=dtype) / K**0.5
    bits = torch.empty(M, (K + 7) // 8, device="cuda", dtype=torch.uint8)
    u = shrink(x, a, torch.empty(M, r, device="cuda", dtype=dtype), p, seed, keep_bits=bits)
    want_bits = ref.dropout_keep_packed(seed, M, K, p)
    assert torch.equal(bits.cpu(), want_bits)
    assert torch.equal(DR.dropout_keep_packed(seed, M, K, p, device="cuda").cpu(), want_bits)
    assert torch.equal(DR.dropout_keep_mask(seed, M, K, p, device="cuda").cpu(),
                       ref.dropout_keep_mask(seed, M, K, p))
    want = ref.apply_dropout(x.double().cpu(), seed, p) @ a.double().cpu().t()
    torch.testing.assert_close(u.double().cpu(), want, rtol=2e-2, atol=2e-2)
