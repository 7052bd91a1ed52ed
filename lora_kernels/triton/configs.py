"""Launch configurations: autotune lists for H100/H200 and the single small config the CPU
interpreter uses, for the single-adapter kernels and the multi-adapter fused GEMM
(``multi_fused``; the multi-adapter segment kernels are sized by ``multi_lora.plan``).

None of these numbers has been measured yet on a GPU in this repository (the first GPU session
runs ``bench/bench_lora_linear.py`` and prunes/extends these lists); they are chosen from the
shape of the problem:

* large M (compute bound): Hopper wgmma wants 128-row tiles and 8 warps; 128x256x64 with 3
  stages is the usual cuBLAS-class bf16 tile (3·(128·64 + 64·256)·2 B = 144 KiB smem, under
  the 227 KiB per SM); 128x128x64 / 4 stages covers shapes where 256-wide tiles leave SMs idle.
* medium M (17..256): bandwidth bound on the weight; smaller M tiles and deeper pipelines.
* small M (≤ 16, decode): a 16-row tile (the smallest tl.dot accepts) and split-K, so enough
  programs stream the weight to saturate HBM while each reads a 128..256-wide K slab.
"""

from __future__ import annotations

import triton

# Device facts live in device.py; these names stay importable from here for kernel files.
from lora_kernels.triton.device import (dot_precision, fp32_precision,  # noqa: F401
                                        interpreting, num_sms)

# The split-K workspace is allocated for the largest split any small-M config may choose.
MAX_SPLIT_K = 8
# The decode / medium row bounds live in lora_kernels.runtime (the dispatch table's classes).
from lora_kernels.runtime import DECODE_MAX_ROWS, MEDIUM_MAX_ROWS  # noqa: E402,F401


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, capped. Training sees many sequence lengths;
    keying on the exact M would re-tune for each of them."""
    return min(triton.next_power_of_2(max(int(m), 1)), 8192)


def rank_block(r: int, cap: int = 64) -> int:
    """Padded rank tile: a power of two ≥ 16 (tl.dot's minimum), ≤ cap (larger ranks loop)."""
    return min(max(16, triton.next_power_of_2(max(int(r), 1))), cap)


def _cfg(bm, bn, bk, warps, stages, split=1, group=8, ws=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group,
                          "SPLIT_K": split, "WARP_SPEC": ws}, num_warps=warps, num_stages=stages)


# ---- the fused GEMM (forward, dX, dW) -------------------------------------------------------
GEMM_LARGE = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    # fp32/tf32: 4-byte tiles need BLOCK_K = 32 to keep several stages in shared memory.
    _cfg(128, 128, 32, 8, 4),
]

GEMM_MEDIUM = [
    _cfg(32, 64, 128, 4, 4),
    _cfg(32, 128, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 128, 4, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 64, 64, 4, 5),
    _cfg(64, 64, 32, 4, 4),
]

# Decode: 16-row tiles; (BLOCK_N, BLOCK_K, SPLIT_K) spans 32..128 x 128..256 x 1..8 and
# prune_small() keeps the ones whose grid fits the GPU. 16-row tiles run on mma.sync, whose
# weight operand goes through registers: 128x256 weight tiles spilled (60-270 B/thread) in
# sm_90 compiles, so a weight tile stays ≤ 16K elements.
GEMM_SMALL = [
    _cfg(16, bn, bk, 4, 4 if bk == 128 else 3, split, group=1)
    for bn in (32, 64, 128) for bk in (128, 256) for split in (1, 2, 4, 8) if bn * bk <= 16384
] + [_cfg(16, 64, 64, 4, 4, 1, group=1), _cfg(16, 32, 64, 4, 5, 2, group=1)]
assert max(c.kwargs["SPLIT_K"] for c in GEMM_SMALL) <= MAX_SPLIT_K


# Persistent + TMA (large M, Hopper): grid = SMs × CTAs/SM. Warp-specialised variants let
# producer warps stream the next tile's operands while this tile's epilogue runs; plain ones
# rely on the software pipeline. prune_persistent() drops what does not fit shared memory or
# the register file for this call.
GEMM_PERSISTENT = [
    _cfg(128, 256, 64, 8, 3, ws=True),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4, ws=True),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4),  # fp32/tf32
]

# The fp8 x fp8 GEMM (spec weight "fp8_act"; tiles and persistent share the list, the
# autotune key tells them apart). 1-byte operands: BLOCK_K = 128 costs the shared memory
# BLOCK_K = 64 costs in bf16 and matches wgmma's k32 steps four times per K tile
# (128x256x128 x 3 stages = 144 KiB + a 64 KiB bf16 output staging tile). The 16-row config
# serves decode-sized M (mma.sync e4m3, no wgmma below 64 rows).
GEMM_FP8_ACT = [
    _cfg(128, 256, 128, 8, 3, ws=True),
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 128, 128, 8, 4, ws=True),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
    _cfg(16, 64, 128, 4, 4, group=1),
]

# Shared memory per SM usable by one CTA on H100/H200 (227 KiB), and the register file.
SMEM_BYTES = 227 * 1024
REGS_PER_SM = 65536


def stage_bytes(cfg: triton.Config, elt: int) -> int:
    """Shared memory of a config's pipeline: num_stages × (a tile + w tile) plus the output
    staging tile of a descriptor store."""
    k = cfg.kwargs
    return (cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elt
            + k["BLOCK_M"] * k["BLOCK_N"] * elt)


def acc_per_thread(cfg: triton.Config) -> int:
    """fp32 accumulator elements each thread holds."""
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)


def ctas_per_sm(cfg: triton.Config, elt: int = 2) -> int:
    """Resident CTAs per SM a persistent grid counts on (shared memory and registers: the
    accumulator plus ~64 registers of addressing per thread)."""
    by_smem = SMEM_BYTES // max(stage_bytes(cfg, elt), 1)
    regs = (acc_per_thread(cfg) + 64) * 32 * cfg.num_warps
    return max(1, min(by_smem, REGS_PER_SM // regs, 2))


def warp_specialize_enabled() -> bool:
    """``tl.range(..., warp_specialize=True)`` exists in this Triton (3.4+; the GPU box has
    3.6) and ``LORA_KERNELS_WARP_SPECIALIZE`` is not ``0`` (an escape hatch until the GPU
    campaign has run these configs)."""
    import inspect
    import os

    import triton.language as tl
    if os.environ.get("LORA_KERNELS_WARP_SPECIALIZE", "1") == "0":
        return False
    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def prune_persistent(configs, named_args, **kwargs):
    """Keep the persistent configs that fit shared memory at this element size and whose
    accumulator stays ≤ 128 fp32 per thread (≤ 64 with the dX dropout epilogue on the pointer
    path, or with the in-loop u accumulator and its la tiles: 128x256 / 8 warps spilled 24 B in sm_90 compiles);
    fp32 inputs keep only BLOCK_K = 32 (4-byte tiles); warp-specialised ones only with
    descriptors and where :func:`warp_specialize_enabled`. Never returns an empty list."""
    elt = named_args["a_ptr"].element_size()
    # With descriptors, 128x256 / 8 warps + the v2 dX mask compiles spill-free (255 registers,
    # sm_90a, Triton 3.8); 128x128 / 4 warps (also 128 per thread) spilled 8 B, and the
    # pointer path at 128 per thread 88 B.
    tma = kwargs.get("STORE") == 1
    in_loop = kwargs.get("LORA") in (2, 4)  # in-loop u, or the panel mode's fallback K loop
    small = bool(kwargs.get("DROPOUT")) or in_loop

    def fits(c):
        acc = acc_per_thread(c)
        if small:
            return acc <= 64 or (tma and not in_loop and c.num_warps == 8
                                 and acc <= 128)
        return acc <= 128

    # Warp specialisation (with the tile loop flattened into the K loop) only with descriptor
    # loads: on the pointer path 128x256 / 8 warps spilled 24-100 B in sm_90a compiles.
    ws_ok = tma and warp_specialize_enabled()
    keep = [c for c in configs if stage_bytes(c, elt) <= SMEM_BYTES and fits(c)
            and (elt < 4 or c.kwargs["BLOCK_K"] <= 32)
            and (ws_ok or not c.kwargs.get("WARP_SPEC"))]
    return keep or [next(c for c in reversed(configs) if not c.kwargs.get("WARP_SPEC"))]


def fp8_stage_bytes(cfg: triton.Config, out_elt: int, tma_store: bool) -> int:
    """Shared memory of an fp8 x fp8 config: 1-byte a and w stages, plus the output staging
    tile (in out's dtype) of a descriptor store."""
    k = cfg.kwargs
    out = k["BLOCK_M"] * k["BLOCK_N"] * out_elt if tma_store else 0
    return cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] + out


def prune_fp8_act(configs, named_args, **kwargs):
    """The fp8 x fp8 configs for this call: shared memory fits, accumulator ≤ 128 fp32 per
    thread (≤ 64 on the persistent pointer form: 128x256x128 / 8 warps spilled 16 B there in
    sm_90a compiles, 255 registers, against 230-247 spill-free on tiles and on TMA), the row
    tile follows M (16 rows for M ≤ 16, ≤ 64 up to MEDIUM_MAX_ROWS, ≥ 64 above: wgmma's
    minimum), warp specialisation only on the persistent TMA form. Never empty."""
    M = named_args["M"]
    out_elt = named_args["out_ptr"].element_size()
    tma = kwargs.get("STORE") == 1
    persistent = kwargs.get("SCHEDULE") == 2
    ws_ok = tma and persistent and warp_specialize_enabled()

    def rows_ok(bm):
        if M <= DECODE_MAX_ROWS:
            return bm == 16
        return bm <= 64 if M <= MEDIUM_MAX_ROWS else bm >= 64

    acc_cap = 64 if persistent and not tma else 128
    keep = [c for c in configs if fp8_stage_bytes(c, out_elt, tma) <= SMEM_BYTES
            and acc_per_thread(c) <= acc_cap and rows_ok(c.kwargs["BLOCK_M"])
            and (ws_ok or not c.kwargs.get("WARP_SPEC"))]
    return keep or [next(c for c in reversed(configs) if not c.kwargs.get("WARP_SPEC"))]


def prune_small(configs, named_args, **kwargs):
    """Keep the decode configs whose grid fills this GPU without oversubscribing it.

    Decode is HBM-bound on the weight: what matters is enough programs streaming it (≥ one per
    SM) and no pointless split (each split costs a workspace round trip and, for a large N
    tile count, nothing is gained). A split must still run ≥ 2 K iterations so the software
    pipeline has something to overlap. If nothing fits (tiny N·K), the configs with the most
    programs are kept.
    """
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    sms = num_sms(named_args["a_ptr"].device)
    usable, keep = [], []
    for c in configs:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        progs = triton.cdiv(N, bn) * triton.cdiv(M, c.kwargs["BLOCK_M"]) * split
        iters = triton.cdiv(triton.cdiv(K, split), bk)
        if bk > triton.next_power_of_2(K) or (split > 1 and iters < 2):
            continue
        usable.append((progs, c))
        if sms <= progs <= 4 * sms:
            keep.append(c)
    if keep:
        return keep
    if not usable:
        return [configs[0]]
    most = max(p for p, _ in usable)
    return [c for p, c in usable if p == most]


def prune_dropout(configs, named_args, **kwargs):
    """With dropout in the dX epilogue, drop tiles of more than 64 accumulator elements per
    thread: in sm_90 compiles the Philox draw for 128 per thread spilled 4-5 KB per thread
    (see fused_gemm._lowrank_seed); 64 per thread compiled spill-free."""
    if not kwargs.get("DROPOUT"):
        return configs
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
    return keep or configs


def gemm_path(m: int, small_m_max: int) -> str:
    """Which autotune list (``GEMM_SMALL`` / ``_MEDIUM`` / ``_LARGE``) an M takes."""
    if m <= small_m_max:
        return "small"
    return "medium" if m <= MEDIUM_MAX_ROWS else "large"


def gemm_interpret_config(path: str) -> dict:
    """One config under TRITON_INTERPRET: the smallest tiles tl.dot allows, so CPU tests on
    odd shapes still cross tile and split boundaries (the small path splits K in two, so the
    split-K reduction runs too)."""
    if path == "small":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2, WARP_SPEC=False)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1, WARP_SPEC=False)


# ---- rank-sized kernels (shrink, dA/dB reductions over M) -----------------------------------
def shrink_config(m: int) -> dict:
    """u = x·Aᵀ [M, r]: one program per BLOCK_M rows streams its rows of x once. 64 rows keep
    ≥ 128 programs in flight from M = 8192; below that 16/32-row tiles keep more SMs busy."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    bm = 64 if m >= 8192 else (32 if m >= 2048 else 16)
    return dict(BLOCK_M=bm, BLOCK_K=128, num_warps=4, num_stages=4)


def reduce_config(dropout: bool = False) -> dict:
    """dA/dB = (big operand)ᵀ·(rank-sized operand), summed over M: BLOCK_P rows of the big side
    per program, BLOCK_M rows of M per step. With dropout (dA) the Philox draw covers the
    [BLOCK_P, BLOCK_M] tile: 32-row steps keep it at 32 draws per thread (64 spilled up to
    330 B/thread in sm_90 compiles next to a 64-wide rank accumulator)."""
    if interpreting():
        return dict(BLOCK_P=32, BLOCK_M=16, num_warps=4, num_stages=1)
    return dict(BLOCK_P=128, BLOCK_M=32 if dropout else 64, num_warps=4, num_stages=3)


# ---- the multi-adapter fused GEMM (multi_fused.py) -------------------------------------------
# Hopper-sized tiles (wgmma wants BLOCK_M ≥ 64); the small ones serve T of a few hundred, and
# the last keeps fp32 inputs within shared memory.
MULTI_FUSED = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                  num_stages=s, num_warps=w)
    for m, n, k, s, w in [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
                          (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 4, 8),
                          (64, 64, 32, 3, 4)]
]
MULTI_FUSED_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
