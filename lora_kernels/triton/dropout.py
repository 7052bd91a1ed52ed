"""Counter-based dropout mask (definition v2) for the LoRA branch: the @triton.jit tile helper
every kernel calls, and the mask kernel behind the backend's ``dropout_keep_mask``.

Element (m, k) of a ``[rows, cols]`` grid, with ``G = ceil(cols/8)``: Philox4x32-10 keyed by
the seed at counter ``g = m·G + k // 8`` gives four 32-bit words; lane ``j = k % 8`` takes the
16-bit half ``j % 2`` of word ``j // 2``, and the element is kept iff that value is
``>= ceil(p·2¹⁶)`` (docs/BACKENDS.md; the oracle is ``reference.dropout_keep_mask``).

A kernel holding a tile whose first column is a multiple of 8 draws ONE Philox call per 8
elements on the tile's ``[ROWS, COLS/8]`` counter grid (:func:`_philox4x32_10`, written here
with one 32x32->64 product per multiply and round 1 folded for counter words 2, 3 = 0: ~42
SASS per call, against ~60 for ``tl.randint4x``; same words). Two compare forms, the same
``v >= T``: int1 lanes for :func:`keep_tile` (3 ops per word) and 16-bit lane masks for
:func:`drop_and_bits_tile` / :func:`keep_bits_tile` (:func:`_keep_masks`, 5 ops per word), which
mask a 16-bit x tile as 32-bit pairs and pack the byte in 5 ops per group.

Packed mask (#13 item 4): one byte per Philox call, bit j = lane j (:func:`keep_bits_tile`).
The forward shrink writes it (:func:`drop_and_bits_tile`) and the backward's dX epilogue and dA
load the byte tile and spread it to lanes in registers (:func:`spread_bits`,
:func:`spread_bits_t`) instead of redrawing. Static sm_90a SASS per element of x
(notes/maskdraw.md): shrink writing bits 15.9 → 10.5, shrink without bits 13.5 → 8.6, dX redraw
19.2 → 17.8, dA redraw 14.5 → 12.5; reading bits: dX 3.5, dA 6.5. Without bits (CUDA backend,
DoRA, NF4) the mask is redrawn, same bits.

This module is the runtime's own copy of the definition: it does not import the oracle
(``lora_kernels.reference``), which tests compare it against bit for bit.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from lora_kernels.runtime import seed_int64

__all__ = ["keep_tile", "keep_bits_tile", "drop_and_bits_tile", "load_bits_tile", "spread_bits",
           "spread_bits_t", "store_bits_tile", "drop_threshold", "drop_scale", "seed_arg", "dropout_keep_mask",
           "dropout_keep_packed", "KEEP_GROUP"]

# Elements per Philox call: 4 words × 2 16-bit halves. Tiles passed to keep_tile are a
# multiple of this wide and start at a multiple of it.
KEEP_GROUP = 8


def drop_threshold(p: float) -> int:
    """``ceil(p·2¹⁶)``: an element is kept iff its 16 random bits are ``>=`` this. Passing p to
    a kernel would round it to fp32 and could flip single mask bits; ``p·2¹⁶`` is exact in
    float64 and the integer compare is bit-for-bit the reference's. 0 (keep all) for p <= 0."""
    if p <= 0.0:
        return 0
    return int(math.ceil(float(p) * 65536.0))


def drop_scale(p: float) -> float:
    """The inverted-dropout factor ``1/(1 − p)`` (1 without dropout)."""
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


# The seed as the signed int64 carrying the same 64 bits (``seed & (2⁶⁴ − 1)`` in two's
# complement): Triton types ints past int64 as uint64, and :func:`_philox4x32_10` (like
# ``tl.randint4x``) widens any int seed to uint64 two's-complement, so both spellings key
# Philox identically.
seed_arg = seed_int64


# Philox4x32 constants (Salmon et al. 2011; the ones tl.randint4x and reference.philox4x32 use).
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _mulhilo(a, M: tl.constexpr, WIDE: tl.constexpr):
    """(hi, lo) 32-bit halves of ``a·M``. ``WIDE``: as ONE 32x32→64 product, which ptxas emits
    as a single IMAD.WIDE.U32 (``umulhi`` + ``mul``, as in tl.randint4x, cost IMAD.HI.U32 +
    IMAD); the narrow form holds no register pairs (see :func:`keep_tile`)."""
    if WIDE:
        p = a.to(tl.uint64) * M
        return (p >> 32).to(tl.uint32), p.to(tl.uint32)
    else:
        return tl.umulhi(a, M), a * M


@triton.jit
def _philox4x32_10(c0, c1, seed, WIDE: tl.constexpr = True):
    """Philox4x32-10 of the counter ``(c0, c1, 0, 0)`` (uint32 tensors) under the 64-bit
    ``seed`` (key = (lo32, hi32)): the words ``tl.randint4x(seed, c1·2³² + c0)`` returns. The
    key schedule is scalar (uniform registers, hoisted by ptxas); round 1 is written out with
    counter words 2 and 3 = 0 (two products and an XOR with 0 dropped)."""
    s = seed.to(tl.uint64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    # round 1: c2 = c3 = 0, so hi(B·c2) = lo(B·c2) = 0
    hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A, WIDE)
    x0 = c1 ^ k0
    x2 = hi_a ^ k1
    x3 = lo_a
    k0 = k0 + _PHILOX_KEY_A
    k1 = k1 + _PHILOX_KEY_B
    # round 2: x1 = 0
    hi_b, lo_b = _mulhilo(x2, _PHILOX_ROUND_B, WIDE)
    hi_a, lo_a = _mulhilo(x0, _PHILOX_ROUND_A, WIDE)
    x0 = hi_b ^ k0
    x2 = hi_a ^ x3 ^ k1
    x1 = lo_b
    x3 = lo_a
    for _ in tl.static_range(8):
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
        hi_b, lo_b = _mulhilo(x2, _PHILOX_ROUND_B, WIDE)
        hi_a, lo_a = _mulhilo(x0, _PHILOX_ROUND_A, WIDE)
        x0 = hi_b ^ x1 ^ k0
        x2 = hi_a ^ x3 ^ k1
        x1 = lo_b
        x3 = lo_a
    return x0, x1, x2, x3


@triton.jit
def _halves_keep(word, threshold, hi_threshold):
    """(keep of the low 16-bit half, keep of the high half) of one uint32 Philox word. The
    high half is compared on the whole word: ``word >> 16 >= T  ⟺  word > T·2¹⁶ − 1`` (one
    instruction less; ``hi_threshold`` is that bound, wrapping to 2³² − 1 for T = 2¹⁶)."""
    return (word & 0xFFFF) >= threshold, word > hi_threshold


@triton.jit
def _philox_grid(seed, row0, col0, cols, ROWS: tl.constexpr, COLS: tl.constexpr,
                 WIDE: tl.constexpr = True):
    """The four Philox words of every group of the tile, on its ``[ROWS, COLS/8]`` counter
    grid: counter ``g = row·ceil(cols/8) + col // 8`` (int64: it may pass 2³²)."""
    groups = (cols + 7) // 8
    g_rows = (row0 + tl.arange(0, ROWS)).to(tl.int64)
    g_cols = (col0 // 8 + tl.arange(0, COLS // 8)).to(tl.int64)
    counter = g_rows[:, None] * groups + g_cols[None, :]
    return _philox4x32_10(counter.to(tl.uint32), (counter >> 32).to(tl.uint32), seed, WIDE)


@triton.jit
def _draw_halves(seed, row0, col0, cols, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The eight keep compares (int1) of each Philox call of the tile: (low, high) half of
    words 0..3, lane ``j = 2·word + half``. For int1 lanes this beats :func:`_keep_masks`
    (3 ops per word against 5). Tiles of 2¹⁵ elements or more (the 128x256 dX epilogue, next
    to 128 fp32 accumulators per thread) take the narrow products: the wide ones spilled 96 B
    there (static sm_90a, 255 registers)."""
    w0, w1, w2, w3 = _philox_grid(seed, row0, col0, cols, ROWS, COLS, ROWS * COLS < 32768)
    # T ≥ 1 whenever a mask is drawn (p > 0), so the bound below never wraps to "drop all".
    hi = (threshold.to(tl.uint32) << 16) - 1
    l0, h0 = _halves_keep(w0, threshold, hi)
    l1, h1 = _halves_keep(w1, threshold, hi)
    l2, h2 = _halves_keep(w2, threshold, hi)
    l3, h3 = _halves_keep(w3, threshold, hi)
    return l0, h0, l1, h1, l2, h2, l3, h3


@triton.jit
def _keep_masks(seed, row0, col0, cols, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The draw as four lane masks on the ``[ROWS, COLS/8]`` counter grid: mask ``w`` holds
    lane ``2w``'s keep spread over its low 16 bits and lane ``2w + 1``'s over its high 16
    (0xFFFF = keep): the AND mask of x's 32-bit pair of those lanes, and what
    :func:`_pack_masks` packs. Per word (ptxas, static sm_90a): with ``C' = 2¹⁶ − T +
    0xFFFF0000``, ``half + C'`` wraps past 2³² iff ``half >= T``, leaving bits 16.. = 0 (kept)
    or 0xFFFF (dropped): ``(w & 0xFFFF) + C'`` (2 ops) and ``(w >> 16) + C'`` (one LEA.HI);
    the two high halves are merged into the drop mask in 2 ops and inverted for free by the
    consumers' LOP3s. (The v2 compare is unchanged: ``v >= T`` exactly, T in [1, 2¹⁶].)"""
    w0, w1, w2, w3 = _philox_grid(seed, row0, col0, cols, ROWS, COLS)
    # T in [1, 2¹⁶] whenever a mask is drawn (p > 0): 2¹⁶ − T fits in 16 bits (0: drop all).
    c = (65536 - threshold.to(tl.uint32)) + 0xFFFF0000
    return _word_mask(w0, c), _word_mask(w1, c), _word_mask(w2, c), _word_mask(w3, c)


@triton.jit
def _word_mask(w, c):
    drop_lo = (w & 0xFFFF) + c
    drop_hi = (w >> 16) + c
    # ^ 0xFFFFFFFF, not ~: the interpreter's ~ on uint32 overflows (xor with Python -1)
    return ((drop_lo >> 16) | (drop_hi & 0xFFFF0000)) ^ 0xFFFFFFFF


@triton.jit
def _pack_masks(m0, m1, m2, m3):
    """The byte of one group from its 4 lane masks (bit j = lane j; bits 8.. are garbage, the
    uint8 store drops them). Every bit of a mask half holds that lane's keep, so disjoint ANDs
    take bit 2w from mask w's low half and bit 17 + 2w from its high half (ptxas: an AND and
    three and-or LOP3s); ``z + (z >> 16)`` then lands bits 17.. on the odd bits (no carries:
    the bits are disjoint). Bit-select forms cost more: LLVM narrows their masks by known bits
    and ptxas no longer sees one LOP3 (static sm_90a)."""
    z = ((m0 & 0x00020001) | (m1 & 0x00080004)) | ((m2 & 0x00200010) | (m3 & 0x00800040))
    return z + (z >> 16)


@triton.jit
def _tail_mask(bytes_, col0, cols, COLS: tl.constexpr):
    """Clear the bits at or past ``cols`` (only the last group of a row is partial)."""
    left = cols - (col0 + tl.arange(0, COLS // 8) * 8)
    valid = (1 << tl.minimum(tl.maximum(left, 0), 8)) - 1
    return bytes_ & valid[None, :]


@triton.jit
def _drop_pairs(x, m0, m1, m2, m3, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``where(keep, x, 0)`` of a 16-bit ``[ROWS, COLS]`` tile from the lane masks of its
    groups: lanes 2w, 2w + 1 of a group are one 32-bit pair of x, ANDed with mask w."""
    m = tl.join(tl.join(m0, m2), tl.join(m1, m3))  # [ROWS, COLS/8, 2, 2] = words 0..3
    m = tl.reshape(m, (ROWS, COLS // 8, 4))
    lo, hi = tl.split(tl.reshape(x.to(tl.uint16, bitcast=True), (ROWS, COLS // 8, 4, 2)))
    pair = (lo.to(tl.uint32) | (hi.to(tl.uint32) << 16)) & m
    out = tl.join(pair.to(tl.uint16), (pair >> 16).to(tl.uint16))
    return tl.reshape(out, (ROWS, COLS)).to(x.dtype, bitcast=True)


@triton.jit
def drop_and_bits_tile(x, seed, row0, col0, cols, threshold, ROWS: tl.constexpr,
                       COLS: tl.constexpr, PARTIAL_GROUPS: tl.constexpr):
    """``(where(keep, x, 0), keep_bits_tile)`` of one draw for the x tile ``[ROWS, COLS]`` at
    grid rows ``row0 ..``, columns ``col0 ..`` (the forward shrink). ``PARTIAL_GROUPS``
    (``cols % 8 != 0``) clears the padding bits; without it bits past ``cols`` are garbage
    but every group with one is wholly past ``cols`` (callers do not store it)."""
    m0, m1, m2, m3 = _keep_masks(seed, row0, col0, cols, threshold, ROWS, COLS)
    bits = _pack_masks(m0, m1, m2, m3)
    if PARTIAL_GROUPS:
        bits = _tail_mask(bits, col0, cols, COLS)
    if x.dtype.primitive_bitwidth == 16:
        x = _drop_pairs(x, m0, m1, m2, m3, ROWS, COLS)
    else:
        x = tl.where(spread_bits(bits.to(tl.uint8), ROWS, COLS), x, 0.0)
    return x, bits.to(tl.uint8)


@triton.jit
def keep_tile(seed, row0, col0, cols, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Keep-mask ``[ROWS, COLS]`` (int1) of the grid rows ``row0 + i``, columns ``col0 + j``
    of a ``[*, cols]`` mask. ``col0`` and ``COLS`` must be multiples of 8; ``row0`` may be any
    int (int64 offsets: rows·ceil(cols/8) may pass 2³¹). Columns past ``cols`` come out as
    whatever their counter gives: callers mask them on load/store.

    One Philox call per 8 elements on a ``[ROWS, COLS/8]`` grid; the eight 16-bit halves
    are compared there and spread back to lanes with ``tl.join`` (j = 2·word + half)."""
    l0, h0, l1, h1, l2, h2, l3, h3 = _draw_halves(seed, row0, col0, cols, threshold, ROWS, COLS)
    return _spread(l0, h0, l1, h1, l2, h2, l3, h3, ROWS, COLS)


@triton.jit
def _spread(l0, h0, l1, h1, l2, h2, l3, h3, ROWS: tl.constexpr, COLS: tl.constexpr):
    # join appends a minor axis: join(join(w0, w2), join(w1, w3)) orders words 0,1,2,3 along
    # [.., 2, 2] (index 2·a + b), and the last join puts the half innermost.
    lows = tl.join(tl.join(l0, l2), tl.join(l1, l3))
    highs = tl.join(tl.join(h0, h2), tl.join(h1, h3))
    lanes = tl.join(lows, highs)  # [ROWS, COLS/8, 2, 2, 2] = (word pair, word, half)
    return tl.reshape(lanes, (ROWS, COLS))


@triton.jit
def keep_bits_tile(seed, row0, col0, cols, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Packed keep bits ``[ROWS, COLS/8]`` (uint8) of the same tile as :func:`keep_tile`
    (docs/BACKENDS.md: byte g bit j = column 8g + j, LSB first, bits past ``cols`` 0)."""
    m0, m1, m2, m3 = _keep_masks(seed, row0, col0, cols, threshold, ROWS, COLS)
    return _tail_mask(_pack_masks(m0, m1, m2, m3), col0, cols, COLS).to(tl.uint8)


@triton.jit
def load_bits_tile(bits_ptr, stride_row, rows64, row_ok, col0, groups, COLS: tl.constexpr):
    """The packed bytes ``[ROWS, COLS/8]`` of rows ``rows64``, groups ``col0/8 ..`` (0 outside)."""
    gg = col0 // 8 + tl.arange(0, COLS // 8)
    return tl.load(bits_ptr + rows64[:, None] * stride_row + gg[None, :],
                   mask=row_ok[:, None] & (gg < groups)[None, :], other=0)


@triton.jit
def spread_bits(bits, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Keep ``[ROWS, COLS]`` (int1) of a byte tile ``[ROWS, COLS/8]``: lane j of group g is bit
    j of byte g (the same spread to lanes as :func:`keep_tile`, without the draw)."""
    lanes = (bits.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(lanes, (ROWS, COLS)) != 0


@triton.jit
def spread_bits_t(bits_t, COLS: tl.constexpr, ROWS: tl.constexpr):
    """Transposed :func:`spread_bits`: keep ``[COLS, ROWS]`` of a ``[COLS/8, ROWS]`` byte tile
    (dA's x tile is [K-side, M]: no transpose of the mask afterwards)."""
    lanes = (bits_t.to(tl.int32)[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
    return tl.reshape(lanes, (COLS, ROWS)) != 0


@triton.jit
def store_bits_tile(bits_ptr, stride_row, rows64, row_ok, col0, bits, groups,
                    COLS: tl.constexpr):
    """Store a ``[ROWS, COLS/8]`` byte tile at packed rows ``rows64``, groups ``col0/8 ..``."""
    gg = col0 // 8 + tl.arange(0, COLS // 8)
    tl.store(bits_ptr + rows64[:, None] * stride_row + gg[None, :], bits,
             mask=row_ok[:, None] & (gg < groups)[None, :])


@triton.jit(do_not_specialize=["seed", "threshold", "row_offset"])
def _keep_mask_kernel(out_ptr, rows, cols, row_offset, seed, threshold,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m0, m1, m2, m3 = _keep_masks(seed, row_offset + pid_r * BLOCK_R, pid_c * BLOCK_C, cols,
                                 threshold, BLOCK_R, BLOCK_C)
    m = tl.reshape(tl.join(tl.join(m0, m2), tl.join(m1, m3)), (BLOCK_R, BLOCK_C // 8, 4))
    keep = tl.reshape(tl.join(m & 1, (m >> 16) & 1), (BLOCK_R, BLOCK_C))
    offs = rr.to(tl.int64)[:, None] * cols + cc[None, :]
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=(rr < rows)[:, None] & (cc < cols)[None, :])


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None,
                      row_offset: int = 0) -> torch.Tensor:
    """The boolean mask ``[rows, cols]`` (rows ``row_offset..``) every Triton kernel here draws
    for ``(seed, p)``."""
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    if p <= 0.0:
        return out.fill_(True)
    if rows * cols == 0:
        return out
    block_r, block_c = 16, 128
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _keep_mask_kernel[grid](out.view(torch.int8), rows, cols, int(row_offset),
                                seed_arg(seed), drop_threshold(p),
                                BLOCK_R=block_r, BLOCK_C=block_c)
    return out


@triton.jit(do_not_specialize=["seed", "threshold", "row_offset"])
def _keep_bits_kernel(out_ptr, rows, cols, row_offset, seed, threshold,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bits = keep_bits_tile(seed, row_offset + pid_r * BLOCK_R, pid_c * BLOCK_C, cols, threshold,
                          BLOCK_R, BLOCK_C)
    store_bits_tile(out_ptr, (cols + 7) // 8, rr.to(tl.int64), rr < rows, pid_c * BLOCK_C, bits,
                    (cols + 7) // 8, BLOCK_C)


def dropout_keep_packed(seed: int, rows: int, cols: int, p: float, device=None,
                        row_offset: int = 0) -> torch.Tensor:
    """The mask of :func:`dropout_keep_mask` packed: uint8 ``[rows, ceil(cols/8)]``
    (``reference.pack_keep_bits``), drawn straight into bytes (no spread to lanes)."""
    groups = (cols + KEEP_GROUP - 1) // KEEP_GROUP
    out = torch.empty(rows, groups, dtype=torch.uint8, device=device)
    if rows * groups == 0:
        return out
    if p <= 0.0:
        out.fill_(0xFF)
        if cols % KEEP_GROUP:
            out[:, -1] = (1 << (cols % KEEP_GROUP)) - 1
        return out
    block_r, block_c = 16, 128
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _keep_bits_kernel[grid](out, rows, cols, int(row_offset), seed_arg(seed),
                                drop_threshold(p), BLOCK_R=block_r, BLOCK_C=block_c)
    return out
