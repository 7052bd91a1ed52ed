"""Quantized weight formats of the GEMM core: the in-register decode of one ``w`` K-step tile.

NF4 (bitsandbytes / QLoRA storage, lora_kernels/ops/nf4.py documents the layout): element
``f = n·K0 + k`` of the frozen ``W [N0, K0]`` sits in byte ``f // 2`` of ``codes`` (high nibble
for even ``f``), its scale is block ``f // QBLOCK``'s absmax, fp32 or (nested) ``code2[q]·
absmax2[b // QBLOCK2] + offset``. The tile's flat indices come from the logical strides
``(stride_wn, stride_wk)`` of the view the GEMM reads: ``(K0, 1)`` for the forward's W and
``(1, K0)`` for dX's Wᵀ — the same packed bytes serve both, no transposed copy.

Decode = one byte gather + shift/mask + a 16-entry table gather (L1-resident) + the block
scale gather (one per 64 elements, mostly the same address across a tile row) + one fp32
multiply; rounded to the storage dtype (bitsandbytes rounds there) before the MMA dtype, so the
tile equals ``dequantize_4bit(...)`` bit for bit. Never more than a ``[BLOCK_K, BLOCK_N]`` tile.
"""

import triton
import triton.language as tl

from lora_kernels.triton.gemm.modes import (WEIGHT_FP8_E4M3, WEIGHT_NF4, WEIGHT_NF4_NESTED)

# Storage dtype of a quantized weight (QROUND): what bitsandbytes rounds the fp32 product to.
QROUND_FP32: tl.constexpr = tl.constexpr(0)
QROUND_FP16: tl.constexpr = tl.constexpr(1)
QROUND_BF16: tl.constexpr = tl.constexpr(2)
# QROUND also carries the two layout facts the NF4 decode specialises on (PackedWeight sets
# them from the shape, so no new kernel argument): QROUND % 4 is the storage dtype above,
# K0 even: a byte never straddles two rows, the decode reads one byte per nibble pair,
QFLAG_PAIRS: tl.constexpr = tl.constexpr(4)
# K0 % QBLOCK == 0: blocks never straddle rows, one scale per (row, QBLOCK chunk).
QFLAG_ALIGNED: tl.constexpr = tl.constexpr(8)
# FP8 e4m3: the device converts e4m3 in hardware (sm_89+, device.hw_cvt_ok), the K loop uses it.
QFLAG_HW_CVT: tl.constexpr = tl.constexpr(16)

# The launcher's table: the 16 NF4 values, then (nested) the 256 absmax codes.
LUT_CODE2: tl.constexpr = tl.constexpr(16)


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, blk, ok, WEIGHT: tl.constexpr,
                 QBLOCK2: tl.constexpr):
    """fp32 absmax of blocks ``blk`` (nested: ``code2[q]·absmax2[b // QBLOCK2] + offset``, the
    order bitsandbytes computes it in)."""
    if WEIGHT == WEIGHT_NF4_NESTED:
        am_code = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = (tl.load(lut_ptr + LUT_CODE2 + am_code)
                 * tl.load(absmax2_ptr + blk // QBLOCK2, mask=ok, other=0.0) + offset)
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    return scale


@triton.jit
def _tile_elements(col0, k, col_ok, k_ok, stride_wn, stride_wk, EVEN_K: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flat element indices (int64) and the in-bounds mask of the ``[BLOCK_K, BLOCK_N]`` tile
    of wᵀ at K offset ``k``: what every packed format decodes from."""
    rk = (k + tl.arange(0, BLOCK_K)).to(tl.int64)
    rn = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    flat = rn[None, :] * stride_wn + rk[:, None] * stride_wk
    if EVEN_K:
        ok = col_ok[None, :] & (rk[:, None] >= 0)
    else:
        ok = col_ok[None, :] & k_ok[:, None]
    return flat, ok


@triton.jit
def _round_storage(w, QROUND: tl.constexpr):
    """fp32 ``q·absmax`` rounded to the storage dtype, as bitsandbytes rounds it."""
    if QROUND % 4 == QROUND_FP16:
        w = w.to(tl.float16)
    elif QROUND % 4 == QROUND_BF16:
        w = w.to(tl.bfloat16)
    return w


@triton.jit
def _nf4_elements(codes_ptr, wq, col0, k, col_ok, k_ok, WEIGHT: tl.constexpr,
                  QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Odd K0 (a nibble pair may straddle two rows of W): one byte, table and scale gather
    per element of the ``[BLOCK_K, BLOCK_N]`` tile, fp32."""
    absmax_ptr, absmax2_ptr, lut_ptr, offset, stride_wn, stride_wk = wq
    flat, ok = _tile_elements(col0, k, col_ok, k_ok, stride_wn, stride_wk, EVEN_K, BLOCK_K,
                              BLOCK_N)
    byte = tl.load(codes_ptr + (flat >> 1), mask=ok, other=0).to(tl.int32)
    nib = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    q = tl.load(lut_ptr + nib)
    scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, flat // QBLOCK, ok, WEIGHT,
                         QBLOCK2)
    return tl.where(ok, q * scale, 0.0)


@triton.jit
def _lut16(lut_ptr, nib, R: tl.constexpr, NB: tl.constexpr, HALF: tl.constexpr):
    """The 16 NF4 values at ``nib`` (a ``[R, NB, HALF]`` tile): the table is loaded once per
    tile and gathered in-register with ``tl.gather`` (triton.language since 3.2). In the sm_90a
    forward (128x128x64 / 8 warps) the K loop fell from 856 to 683 SASS instructions per thread
    against a pointer gather per element (which the pipeliner turned into one 4-byte cp.async
    plus an LDS per element); the gather along a broadcast [R, NB, 16] table lowered to one
    SHFL per element and 740 instructions."""
    table = tl.load(lut_ptr + tl.arange(0, 16))
    flat = tl.gather(table, tl.reshape(nib, (R * NB * HALF,)), 0)
    return tl.reshape(flat, (R, NB, HALF))


@triton.jit
def _nf4_rows(codes_ptr, wq, row0, row_ok, c0, c_lim, ROW_MASK: tl.constexpr,
              C_MASK: tl.constexpr, WEIGHT: tl.constexpr, QBLOCK: tl.constexpr,
              QBLOCK2: tl.constexpr, QROUND: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
              PAIRS_OUT: tl.constexpr = False):
    """``W[row0 : row0+R, c0 : c0+C]`` of an even-K0 W, decoded ``[R, C]`` (rounded to the
    storage dtype), zero outside ``row_ok`` / ``c < c_lim``; ``PAIRS_OUT``: the even and odd
    columns apart, two ``[R, C/2]`` tiles, no interleave (:func:`nf4_row_pairs`).

    K0 even and c0 even: elements ``c, c+1`` (c even) of a row share one byte (high nibble
    first), so the tile is read as ``[R, C/2]`` bytes, contiguous along C (vector loads: the
    address arithmetic is per vector, not per element), split into two nibble tiles and
    interleaved back with ``tl.join`` + ``reshape``. Both nibbles of a byte share a block
    (QBLOCK even). The C axis is viewed as ``[NB, SUB/2]`` byte chunks, ``SUB = min(C,
    QBLOCK)``: with K0 % QBLOCK == 0 (QROUND's QFLAG_ALIGNED) a chunk lies in one block, so the
    scale is one load per (row, chunk) broadcast over the chunk; otherwise one per byte."""
    absmax_ptr, absmax2_ptr, lut_ptr, offset, stride_wn, stride_wk = wq
    k0 = tl.maximum(stride_wn, stride_wk)
    SUB: tl.constexpr = C if C < QBLOCK else QBLOCK
    NB: tl.constexpr = C // SUB
    HALF: tl.constexpr = SUB // 2
    rows = (row0 + tl.arange(0, R)).to(tl.int64)
    row_byte = rows * (k0 // 2) + c0 // 2                       # [R] int64
    chunk = tl.arange(0, NB)
    jb = chunk[:, None] * HALF + tl.arange(0, HALF)[None, :]    # [NB, HALF] byte in the tile
    idx = row_byte[:, None, None] + jb[None, :, :]
    if (QROUND // QFLAG_ALIGNED) % 2 == 1:
        idx = tl.max_contiguous(tl.multiple_of(idx, [1, 1, HALF]), [1, 1, HALF])
    ok = (rows >= 0)[:, None, None] & (jb >= 0)[None, :, :]
    if ROW_MASK:
        ok = ok & row_ok[:, None, None]
    if C_MASK:
        ok = ok & ((c0 + 2 * jb) < c_lim)[None, :, :]
    byte = tl.load(codes_ptr + idx, mask=ok, other=0).to(tl.int32)
    q_hi = _lut16(lut_ptr, byte >> 4, R, NB, HALF)
    q_lo = _lut16(lut_ptr, byte & 0xF, R, NB, HALF)
    if (QROUND // QFLAG_ALIGNED) % 2 == 1:
        # One block per (row, chunk): K0 % QBLOCK == 0 and chunk starts are multiples of SUB,
        # which divides QBLOCK; chunk and block bounds coincide, so the chunk mask is exact.
        cblk = rows[:, None] * (k0 // QBLOCK) + ((c0 + chunk * SUB) // QBLOCK)[None, :]
        cok = (rows >= 0)[:, None] & (chunk >= 0)[None, :]
        if ROW_MASK:
            cok = cok & row_ok[:, None]
        if C_MASK:
            cok = cok & ((c0 + chunk * SUB) < c_lim)[None, :]
        scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, cblk, cok, WEIGHT,
                             QBLOCK2)
        scale = tl.where(cok, scale, 0.0)[:, :, None]
    else:
        blk = idx // (QBLOCK // 2)  # byte idx·2 = the pair's first flat element
        scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, blk, ok, WEIGHT,
                             QBLOCK2)
        scale = tl.where(ok, scale, 0.0)
    w_hi = _round_storage(q_hi * scale, QROUND)
    w_lo = _round_storage(q_lo * scale, QROUND)
    if PAIRS_OUT:
        res = (tl.reshape(w_hi, (R, C // 2)), tl.reshape(w_lo, (R, C // 2)))
    else:
        res = tl.reshape(tl.join(w_hi, w_lo), (R, C))
    return res


@triton.jit
def nf4_row_pairs(codes_ptr, wq, row0, row_ok, c0, WEIGHT: tl.constexpr, QBLOCK: tl.constexpr,
                  QBLOCK2: tl.constexpr, QROUND: tl.constexpr, R: tl.constexpr,
                  C: tl.constexpr, MASK: tl.constexpr = True):
    """Rows ``row0 ..`` (masked by ``row_ok``), columns ``c0 .. c0+C`` (c0 even, masked at K0)
    of an even-K0 W as ``(even columns, odd columns)``, each ``[R, C/2]`` in the storage dtype:
    the same decode as :func:`nf4_tile`'s pair path, for a consumer that stores both halves
    of a byte as one word (lora_kernels/triton/nf4_slabs.py) instead of interleaving them.
    ``MASK=False``: the caller guarantees the whole tile lies inside W."""
    return _nf4_rows(codes_ptr, wq, row0, row_ok, c0, tl.maximum(wq[4], wq[5]), MASK, MASK,
                     WEIGHT, QBLOCK, QBLOCK2, QROUND, R, C, True)


@triton.jit
def nf4_tile(codes_ptr, wq, col0, k, col_ok, k_ok, WEIGHT: tl.constexpr, QBLOCK: tl.constexpr,
             QBLOCK2: tl.constexpr, QROUND: tl.constexpr, EVEN_K: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of the (logical) wᵀ at K offset ``k``, decoded; zero
    outside the matrix. ``wq = (absmax, absmax2, lut, offset, stride_wn, stride_wk)``.

    Even K0 (QFLAG_PAIRS): the tile is a block of rows of W — the forward's ``W[col0:, k:]``
    (transposed: K runs along W's rows) or dX's ``W[k:, col0:]`` (the Wᵀ view: rows of W are
    its K) — decoded by :func:`_nf4_rows`, one byte per nibble pair. Odd K0: per element."""
    stride_wn = wq[4]
    stride_wk = wq[5]
    if (QROUND // QFLAG_PAIRS) % 2 == 1:
        if stride_wk == 1:  # the forward's W [N0, K0]: tile rows = W rows col0.., C = BLOCK_K
            c_lim = k + BLOCK_K
            if not EVEN_K:
                c_lim = k + tl.sum(k_ok.to(tl.int32), axis=0)
            w = tl.trans(_nf4_rows(codes_ptr, wq, col0, col_ok, k, c_lim, True, not EVEN_K,
                                   WEIGHT, QBLOCK, QBLOCK2, QROUND, BLOCK_N, BLOCK_K))
        else:  # dX's Wᵀ view: tile rows = W rows k.., C = BLOCK_N columns of W from col0
            w = _nf4_rows(codes_ptr, wq, k, k_ok, col0, stride_wk, not EVEN_K, True, WEIGHT,
                          QBLOCK, QBLOCK2, QROUND, BLOCK_K, BLOCK_N)
    else:
        w = _round_storage(_nf4_elements(codes_ptr, wq, col0, k, col_ok, k_ok, WEIGHT, QBLOCK,
                                         QBLOCK2, EVEN_K, BLOCK_K, BLOCK_N), QROUND)
    return w


@triton.jit
def e4m3_to_f32(b):
    """float8 e4m3fn codes (integers 0..255) to fp32, bit-exact, by integer arithmetic (no
    float8 type needed: the interpreter runs it, every GPU too). Normal: exponent e - 7,
    mantissa 1.m (fp32 bits assembled directly); subnormal (e = 0): m·2⁻⁹; 0x7f/0xff: NaN."""
    b = b.to(tl.int32)
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = ((e + 120) << 23) | (m << 20)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def e4m3_as_f16(byte):
    """float8 e4m3fn codes (uint8) to the fp16 values ``code·2⁻⁸``, exact, by two shifts and
    masks: e4m3's 4 exponent bits (bias 7) and 3 mantissa bits land in fp16's low exponent bits
    and top mantissa bits (bias 15), so every e4m3 value, subnormals included (they become fp16
    subnormals), is that fp16 times 2⁸. The NaN codes 0x7f/0xff give ±1.875 (±480 after the
    2⁸): quantized weights hold no NaN (``ops.fp8.quantize_fp8`` saturates). No float8 type:
    the interpreter and sm_80 run it; against :func:`e4m3_to_f32`'s ~10 integer operations and
    two selects per element it is 3, and its ``.to(tl.float32)`` is one conversion."""
    # sign-extended, the sign lands on bits 15 and 14 after the shift; bit 14 (fp16's top
    # exponent bit, always 0 here) is masked off
    h = (byte.to(tl.int8, bitcast=True).to(tl.int16) << 7) & -16385  # 0xbfff
    return h.to(tl.float16, bitcast=True)


@triton.jit
def fp8_tile(byte, wq, col0, k, col_ok, k_ok, SCALE_ALONG_N: tl.constexpr,
             QROUND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of the (logical) wᵀ of an e4m3 W ``[N0, K0]`` (one byte
    per element, row-major) with an fp32 scale per row of W, decoded to ``code·scale`` in fp32
    (then the MMA dtype). ``byte``: the code tile, loaded by ``operands.load_w`` through the
    kernel's own pointer tile like a dense w (bytes are elements, so the dense path's 64-bit
    advances serve as they are and the loads vectorize along the unit-stride axis; masked
    bytes are 0). The scale of W's row is one vector per K step: along the tile's N axis for
    the forward's W (``SCALE_ALONG_N``), along its K axis for dX's Wᵀ view.
    ``(code·2⁻⁸)·(scale·2⁸)`` is the product ``code·scale`` rounded once, bit for bit the old
    ``e4m3_to_f32(code)·scale``. ``QROUND & QFLAG_HW_CVT`` (sm_89+): the code to fp16 by the
    hardware conversion instead (two codes an instruction; exact, no 2⁻⁸). ``wq[0]``: the
    scale vector.

    Static sm_90a (bench/sass_report.py, 128x128x64 / 8 warps forward K loop): the per-element
    int64 ``flat // K0`` scale gather, the flat-index arithmetic and the integer e4m3 assembly
    cost 42.1 SASS per element of each 128-row tile; this form 9.1, and 6.3 with the hardware
    conversion (NOTES.md, session 6)."""
    scale_ptr = wq[0]
    HW: tl.constexpr = (QROUND // QFLAG_HW_CVT) % 2 == 1
    if HW:
        q = byte.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(tl.float32)
    else:
        q = e4m3_as_f16(byte).to(tl.float32)
    UNIT: tl.constexpr = 1.0 if HW else 256.0
    if SCALE_ALONG_N:
        s = tl.load(scale_ptr + col0 + tl.arange(0, BLOCK_N), mask=col_ok, other=0.0)
        w = q * (s * UNIT)[None, :]
    else:
        s = tl.load(scale_ptr + k + tl.arange(0, BLOCK_K), mask=k_ok, other=0.0)
        w = q * (s * UNIT)[:, None]
    return w


_FORMAT_NAMES = {int(WEIGHT_NF4): "nf4", int(WEIGHT_NF4_NESTED): "nf4_nested",
                 int(WEIGHT_FP8_E4M3): "fp8_e4m3"}


class PackedWeight:
    """Host-side handle of a quantized w for ``fused_gemm(..., wq=)``: the packed storage, its
    launch arguments, and the logical ``[rows, cols]`` view the GEMM reads (``t()`` gives dX's
    ``Wᵀ`` view of the same bytes). Built by lora_kernels/triton/quant_lora.py."""

    def __init__(self, codes, absmax, absmax2, lut, offset, weight, qblock, qblock2, qround,
                 shape, transposed=False):
        self.codes, self.absmax, self.absmax2, self.lut = codes, absmax, absmax2, lut
        self.offset, self.weight, self.qblock, self.qblock2 = offset, weight, qblock, qblock2
        self.qround, self.base_shape, self.transposed = qround, tuple(shape), transposed

    @property
    def format(self) -> str:
        """The spec's weight-axis value."""
        return _FORMAT_NAMES[int(self.weight)]

    @property
    def shape(self):
        n0, k0 = self.base_shape
        return (k0, n0) if self.transposed else (n0, k0)

    def t(self):
        return PackedWeight(self.codes, self.absmax, self.absmax2, self.lut, self.offset,
                            self.weight, self.qblock, self.qblock2, self.qround, self.base_shape,
                            not self.transposed)

    def strides(self):
        """Logical element strides ``(stride_n, stride_k)`` of the view (row-major base)."""
        k0 = self.base_shape[1]
        return (1, k0) if self.transposed else (k0, 1)

    def layout_flags(self) -> int:
        """QFLAG_PAIRS / QFLAG_ALIGNED of an NF4 weight (QROUND's layout bits, formats.py)."""
        if self.weight not in (int(WEIGHT_NF4), int(WEIGHT_NF4_NESTED)):
            return 0
        k0 = self.base_shape[1]
        if k0 % 2:
            return 0
        return int(QFLAG_PAIRS) | (int(QFLAG_ALIGNED) if k0 % self.qblock == 0 else 0)

    def launch_args(self, hw_cvt: bool = False):
        """The kernel's ``wq_*`` / ``WEIGHT`` / ``Q*`` arguments; ``hw_cvt``: the launch device
        converts e4m3 in hardware (``device.hw_cvt_ok``), an FP8 weight's K loop uses it."""
        flags = self.layout_flags()
        if hw_cvt and self.weight == int(WEIGHT_FP8_E4M3):
            flags |= int(QFLAG_HW_CVT)
        return dict(wq_absmax=self.absmax, wq_absmax2=self.absmax2, wq_lut=self.lut,
                    wq_offset=float(self.offset), WEIGHT=int(self.weight), QBLOCK=self.qblock,
                    QBLOCK2=self.qblock2, QROUND=int(self.qround) | flags)


def prune_packed(prune):
    """``prune`` (a config list's early pruner) followed, for a quantized w, by a register
    budget: the accumulator ≤ 64 fp32 per thread and the decoded ``[BLOCK_K, BLOCK_N]`` tile
    ≤ 32 values per thread, ≤ 16 with the dX dropout epilogue, the nested absmax decode or on
    16-row decode tiles. In sm_90a compiles (bench/sass_report.py) 128x256x64 / 8 warps spilled
    112-248 B with NF4, 128x128x64 nested / dX with dropout 12-204 B and 16x32x128 / 4 warps
    4 B (seeded split-K); 128x128x64, 128x128x32 (tight) and 16x32x64 compiled spill-free.
    FP8 without the dropout epilogue: ≤ 64 values (its decode is light since session 6); plain
    NF4 on 16-row tiles: ≤ 32.
    Dense w: ``prune`` only."""
    def pruned(configs, named_args, **kwargs):
        configs = prune(configs, named_args, **kwargs)
        weight = kwargs.get("WEIGHT", 0)
        if not weight:
            return configs
        tight = kwargs.get("DROPOUT") or weight == int(WEIGHT_NF4_NESTED)

        def fits(c):
            threads = 32 * c.num_warps
            acc = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / threads
            w = c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] / threads
            # decode tiles (16 rows) keep num_stages byte tiles in flight: half the budget
            w_cap = 16 if tight or c.kwargs["BLOCK_M"] <= 16 else 32
            if weight == int(WEIGHT_NF4) and c.kwargs["BLOCK_M"] <= 16 and not tight:
                # plain NF4 on 16-row tiles (M 3–16 since session 6): 16x32x128 / 4 warps
                # compiled spill-free (118–127 regs) at 8.4–9.9 SASS per W element, 16x32x64
                # 10.4–12.0
                w_cap = 32
            if weight == int(WEIGHT_FP8_E4M3) and not kwargs.get("DROPOUT"):
                # the byte-per-element decode is 3 operations and a scale vector: every config
                # up to 64 values a thread compiled spill-free (≤ 170 regs; sass_report, all
                # FP8 forms); 16x64x128 cut the decode form from 8.69 to 6.06 SASS per element,
                # 128x128x128 the forward from 6.31 to 5.61
                w_cap = 64
            # nested decode + the dX dropout epilogue: 128x128 (64 accumulators) spilled 8 B
            # even at 3 stages
            return w <= w_cap and acc <= (32 if both else 64)
        nested = weight == int(WEIGHT_NF4_NESTED)
        both = nested and kwargs.get("DROPOUT")
        keep = [c for c in configs if fits(c)]

        def shallow(c):
            # Fewer stages where the in-flight byte tiles and the decode share the registers:
            # in-loop u + la tiles on 16-row decode tiles (16x32x64 / 4 warps, 5 stages: 4 B
            # spilled at 255 registers; 3 stages: none), the nested decode on 16-row tiles
            # (16x32x64 / 4 warps, 5 stages: 4 B) and nested + the dX dropout epilogue
            # (128x128x32 / 8 warps, 4 stages: 12 B).
            small = c.kwargs["BLOCK_M"] <= 16
            return both or (small and (kwargs.get("LORA") == 2 or nested))
        keep = [triton.Config(dict(c.kwargs), num_warps=c.num_warps,
                              num_stages=min(c.num_stages, 3)) if shallow(c) else c
                for c in keep]
        if keep:
            return keep
        # Nothing in the list fits: the smallest config, its row tile halved until the
        # accumulator fits (what nested + dropout needs from the 128-row dX lists).
        c = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
                * c.kwargs["BLOCK_K"] / c.num_warps)
        kw = dict(c.kwargs)
        while kw["BLOCK_M"] > 16 and kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * c.num_warps) > \
                (32 if both else 64):
            kw["BLOCK_M"] //= 2
        c = triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)
        return [triton.Config(kw, num_warps=c.num_warps, num_stages=min(c.num_stages, 3))
                if shallow(c) else c]
    return pruned
