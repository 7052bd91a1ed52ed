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
def nf4_tile(codes_ptr, wq, col0, k, col_ok, k_ok, WEIGHT: tl.constexpr, QBLOCK: tl.constexpr,
             QBLOCK2: tl.constexpr, QROUND: tl.constexpr, EVEN_K: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of the (logical) wᵀ at K offset ``k``, decoded; zero
    outside the matrix. ``wq = (absmax, absmax2, lut, offset, stride_wn, stride_wk)``."""
    absmax_ptr, absmax2_ptr, lut_ptr, offset, stride_wn, stride_wk = wq
    flat, ok = _tile_elements(col0, k, col_ok, k_ok, stride_wn, stride_wk, EVEN_K, BLOCK_K,
                              BLOCK_N)
    byte = tl.load(codes_ptr + (flat >> 1), mask=ok, other=0).to(tl.int32)
    nib = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    q = tl.load(lut_ptr + nib)
    # The forward's W with K0 % QBLOCK == 0 and BLOCK_K | QBLOCK: one block per column of the
    # tile, so one scale per column (a [BLOCK_N] load broadcast down K) instead of a gather
    # per element. Otherwise (dX's Wᵀ view, ragged K0) each element's own block.
    col_blocks = (stride_wk == 1) & ((stride_wn % QBLOCK) == 0) & (QBLOCK % BLOCK_K == 0)
    if col_blocks:
        rn = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cblk = (rn * stride_wn + k) // QBLOCK
        scale = tl.broadcast_to(
            _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, cblk, col_ok, WEIGHT,
                         QBLOCK2)[None, :], (BLOCK_K, BLOCK_N))
    else:
        scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset, flat // QBLOCK, ok,
                             WEIGHT, QBLOCK2)
    w = tl.where(ok, q * scale, 0.0)
    if QROUND == QROUND_FP16:
        w = w.to(tl.float16)
    elif QROUND == QROUND_BF16:
        w = w.to(tl.bfloat16)
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
def fp8_tile(codes_ptr, wq, col0, k, col_ok, k_ok, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of the (logical) wᵀ of an e4m3 W ``[N0, K0]`` (one byte
    per element, row-major) with an fp32 scale per row of W, decoded to ``code·scale`` in fp32
    (then the MMA dtype). The scale's row is ``flat // K0`` (K0 = the larger logical stride),
    which serves the forward's W and dX's Wᵀ view alike. ``wq[0]``: the scale vector."""
    scale_ptr, _unused2, _unused_lut, _unused_off, stride_wn, stride_wk = wq
    flat, ok = _tile_elements(col0, k, col_ok, k_ok, stride_wn, stride_wk, EVEN_K, BLOCK_K,
                              BLOCK_N)
    byte = tl.load(codes_ptr + flat, mask=ok, other=0)
    k0 = tl.maximum(stride_wn, stride_wk)
    scale = tl.load(scale_ptr + flat // k0, mask=ok, other=0.0)
    return tl.where(ok, e4m3_to_f32(byte) * scale, 0.0)


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

    def launch_args(self):
        return dict(wq_absmax=self.absmax, wq_absmax2=self.absmax2, wq_lut=self.lut,
                    wq_offset=float(self.offset), WEIGHT=int(self.weight), QBLOCK=self.qblock,
                    QBLOCK2=self.qblock2, QROUND=int(self.qround))


def prune_packed(prune):
    """``prune`` (a config list's early pruner) followed, for a quantized w, by a register
    budget: the accumulator ≤ 64 fp32 per thread and the decoded ``[BLOCK_K, BLOCK_N]`` tile
    ≤ 32 values per thread, ≤ 16 with the dX dropout epilogue, the nested absmax decode or on
    16-row decode tiles. In sm_90a compiles (bench/sass_report.py) 128x256x64 / 8 warps spilled
    112-248 B with NF4, 128x128x64 nested / dX with dropout 12-204 B and 16x32x128 / 4 warps
    4 B (seeded split-K); 128x128x64, 128x128x32 (tight) and 16x32x64 compiled spill-free.
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
