"""Named compile-time modes of the GEMM core (Liger-style ``tl.constexpr`` constants).

Kernels branch on these names, never on bare integers; host code passes the same names (they
are plain ints on the host side too: ``int(LORA_SEEDED) == 1``). The meaning of each value is
documented once, here, and :mod:`spec` maps the spec's strings onto them.
"""

from enum import IntEnum

import triton.language as tl


class LoraMode(IntEnum):
    """Host-side names of the low-rank modes (plain ints: ``LoraMode.SEEDED == 1``)."""
    NONE = 0
    SEEDED = 1
    IN_LOOP = 2
    PER_SLOT = 3
    PANEL = 4


# Low-rank term of ``out = col_scale·(a·wᵀ + low-rank) + bias``.
LORA_NONE: tl.constexpr = tl.constexpr(int(LoraMode.NONE))          # plain GEMM (dW, r = 0)
LORA_SEEDED: tl.constexpr = tl.constexpr(int(LoraMode.SEEDED))      # s·u·lbᵀ (u precomputed)
#                                                                     seeds the accumulator
LORA_IN_LOOP: tl.constexpr = tl.constexpr(int(LoraMode.IN_LOOP))    # u = a·laᵀ in the K loop
LORA_PER_SLOT: tl.constexpr = tl.constexpr(int(LoraMode.PER_SLOT))  # xa[row]·B_{slot(row)}ᵀ
# u = a·laᵀ as K-slice shares made one wave ahead by the persistent programs (gemm/panel.py);
# a tile whose panel is not complete yet computes u in its K loop (same slices, same bits).
LORA_PANEL: tl.constexpr = tl.constexpr(int(LoraMode.PANEL))

# Tile schedule.
SCHED_TILES: tl.constexpr = tl.constexpr(0)       # one program per output tile, grouped raster
SCHED_SPLIT_K: tl.constexpr = tl.constexpr(1)     # + K slabs reduced by the last program (ticket)
SCHED_PERSISTENT: tl.constexpr = tl.constexpr(2)  # grid = resident programs, each loops over tiles
# MoE expert segments (moe_gemm_kernel only, not a GemmSpec axis value yet): M tiles over
# the expert-sorted pairs, per-expert weight and LoRA factors (schedule.moe_segment_tile).
SCHED_MOE_SEGMENTS: tl.constexpr = tl.constexpr(3)

# Rows of the A operand.
ROWS_DENSE: tl.constexpr = tl.constexpr(0)     # row m of a is row m of out
ROWS_GATHERED: tl.constexpr = tl.constexpr(1)  # tile rows are positions of a sorted token list

# Memory path of a, w and out.
STORE_POINTER: tl.constexpr = tl.constexpr(0)  # strided pointer loads/stores (any strides)
STORE_TMA: tl.constexpr = tl.constexpr(1)      # tensor descriptors (TMA on sm_90+) for a, w, out

# Column scale epilogue step.
COL_SCALE_NONE: tl.constexpr = tl.constexpr(0)
COL_SCALE_VECTOR: tl.constexpr = tl.constexpr(1)  # fp32 [N] factor before the bias (DoRA)

# Weight format of w (the decode is gemm/formats.py; the forward's W and dX's Wᵀ view both).
WEIGHT_DENSE: tl.constexpr = tl.constexpr(0)       # a plain tensor in the MMA dtype
WEIGHT_NF4: tl.constexpr = tl.constexpr(1)         # bitsandbytes NF4, fp32 absmax
WEIGHT_NF4_NESTED: tl.constexpr = tl.constexpr(2)  # bitsandbytes NF4, double-quantized absmax
WEIGHT_FP8_E4M3: tl.constexpr = tl.constexpr(3)    # float8 e4m3fn codes, fp32 scale per row of W
# fp8 × fp8 (issue #16): a is the e4m3 codes of x with an fp32 scale per row (per token), w the
# e4m3 weight with an fp32 scale per row of W; both go to the MMA as float8 (wgmma e4m3 on
# sm_90) and the scales multiply the fp32 accumulator in the epilogue (epilogue.fp8_act_scale).
WEIGHT_FP8_ACT: tl.constexpr = tl.constexpr(4)
