"""Launch planning for the multi-adapter segment kernels, from host ints only.

Every choice reads the batch's host ints (``num_tokens``, ``num_active``, ``max_seg_len``,
``tile_map`` rows) — for a bounded (static, CUDA-graph) batch those are upper bounds, and the
kernels exit early on the padding — so planning never syncs and one plan serves any adapter mix
of a token bucket. Every choice can be forced with :func:`override`.

* **decode** (``T ≤ decode_max_tokens``, 256): 16-row tiles from ``LoRABatch.tile_map`` (one
  metadata load per program). The shrink and the expand are each sized to **one wave**
  (``programs_per_sm × SMs`` programs): the shrink splits K into ``SPLIT`` planes — a
  compile-time constant chosen from the shape — only as far as that wave allows; the expand
  takes the narrowest column tile that still fits one wave. With PDL (sm_90) the expand
  launches while the shrink runs and prefetches B. With at most ``inline_max_tokens`` tokens
  the shrink is recomputed inside the expand instead: one launch rather than two.
* **prefill**: 32/64-row tiles over each segment (in-kernel scan for skewed batches). No K
  split once the token tiles alone fill a wave; below that, split up to one wave.
* **fused** (``T ≥ fused_min_tokens``, fp16/bf16, ≥ 32 tokens per active slot on average): the
  shrink with ``SPLIT = 1`` (its output feeds the GEMM epilogue directly: no plane sum, no
  extra launch), then one Triton GEMM whose epilogue adds each row's ``xa·B_iᵀ``
  (:mod:`multi_fused`). The row tile shrinks (64 → 32 → 16) until the tiles fill the SMs.
The thresholds are guesses until ``bench/bench_multi_lora.py`` has run on the target GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton

from lora_kernels.triton import configs as C
from lora_kernels.triton.segments import SCAN_MAX_ACTIVE, pdl_supported

TUNING = {
    "path": "auto",            # "auto" | "fused" | "unfused"   (multi_lora_fwd)
    "shape": "auto",           # "auto" | "decode" | "prefill"  (segment kernel configs)
    "inline": "auto",          # "auto" | True | False          (decode: shrink inside expand)
    "pdl": "auto",             # "auto" | False                 (decode: shrink → expand PDL)
    "fused_min_tokens": 1024,
    "decode_max_tokens": 256,
    "inline_max_tokens": 8,
    "programs_per_sm": 4,      # resident 4-warp programs per SM: one wave
    "grad_splits": "auto",     # "auto" | int: token chunks per segment in the dA/dB reductions
}


@contextlib.contextmanager
def override(**settings):
    """Temporarily change :data:`TUNING` (tests force each path; the benchmark compares them)."""
    unknown = set(settings) - set(TUNING)
    if unknown:
        raise KeyError(f"unknown tuning keys {sorted(unknown)}; known: {sorted(TUNING)}")
    saved = dict(TUNING)
    TUNING.update(settings)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)


def wave(device) -> int:
    """Programs resident at once: the most a launch may have to finish in one wave."""
    if device.type != "cuda":
        return 1
    return TUNING["programs_per_sm"] * C.num_sms(device)


@dataclass(frozen=True)
class SegConfig:
    block_m: int
    block_r: int
    block_k: int
    block_n: int
    split: int        # shrink partial planes along K (a compile-time constant of both kernels)
    inline: bool      # expand recomputes the shrink (one launch)
    num_warps: int = 4
    expand_warps: int = 4


# A program should move at least this much, or its fixed latency chain (metadata → token ids
# → rows) dominates; below it, fewer and fuller programs are faster than filling every SM.
MIN_BYTES_PER_PROGRAM = 16 << 10


# Planning reads only host ints and tensor shapes, so callers may pass any object with
# ``num_tokens``, ``num_slots``, ``num_active``, ``max_seg_len`` (bench/roofline.py does):
# the LoRABatch-only fields have these defaults.
TILE_ROWS = 16  # LoRABatch.TILE_ROWS


def _tile_rows(batch) -> int:
    return getattr(batch, "TILE_ROWS", TILE_ROWS)


def _decode_tiles(batch) -> int:
    """Rows of the batch's tile map (the decode grid); without one, the bound it would have."""
    tiles = getattr(batch, "tile_map", None)
    if tiles is not None:
        return tiles.shape[0]
    A, T, rows = batch.num_active, batch.num_tokens, _tile_rows(batch)
    return min(A * triton.cdiv(batch.max_seg_len, rows), triton.cdiv(T, rows) + A)


def is_decode(batch) -> bool:
    shape = TUNING["shape"]
    if shape != "auto":
        return shape == "decode"
    if getattr(batch, "bounded", False) and batch.num_active > SCAN_MAX_ACTIVE:
        return True  # the tile map's grid is the only tight one for a huge bounded batch
    return batch.num_tokens <= TUNING["decode_max_tokens"]


def plan(batch, K: int, out_width: int, R: int, n_slices: int, device, elem: int = 2,
         allow_inline: bool = False, fused: bool = False) -> SegConfig:
    """Block sizes for the segment kernels from host ints only (see the module docstring).

    ``K``: reduction width of the shrink; ``out_width``: widest output slice of the expand;
    ``elem``: bytes per element of the inputs; ``fused``: the shrink feeds the fused GEMM
    (one plane).
    """
    decode = is_decode(batch)
    inline = TUNING["inline"]
    if inline == "auto":
        inline = decode and batch.num_tokens <= TUNING["inline_max_tokens"]
    inline = bool(inline) and allow_inline
    T, A = batch.num_tokens, batch.num_active
    if device.type != "cuda":
        # Interpreter: small configs (few, wide programs run fastest); decode still splits K
        # so the plane sum is exercised, prefill keeps 32-row tiles so the scan is too.
        split = 2 if decode and not fused and K > 32 else 1
        return SegConfig(16 if decode or fused else 32, 16, 32, 64, split, inline)
    sms = C.num_sms(device)
    one_wave = wave(device)
    tile_rows = _tile_rows(batch)

    if fused:
        block_m = next((bm for bm in (64, 32) if triton.cdiv(T, bm) >= sms), tile_rows)
    elif decode:
        block_m = tile_rows
    else:
        block_m = 64 if batch.max_seg_len >= 64 else 32
        if block_m == 64 and triton.cdiv(T, 64) < sms <= triton.cdiv(T, 32):
            block_m = 32  # 32-row tiles fill the SMs without splitting K
    block_r = 16 if block_m == tile_rows else C.rank_block(R)
    rank_tiles = triton.cdiv(R, block_r)
    tiles = _decode_tiles(batch) if block_m == tile_rows else triton.cdiv(T, block_m) + A
    base = max(1, tiles * n_slices * rank_tiles)

    # Shrink: split K only while the grid stays within one wave, each split ≥ 256 columns and
    # ≥ MIN_BYTES_PER_PROGRAM; prefill never splits once its token tiles alone fill the SMs.
    split = 1
    x_fills = triton.cdiv(T, block_m) * n_slices * rank_tiles >= sms
    if not fused and not (not decode and x_fills):
        nbytes = (A * n_slices * R + T) * K * elem
        split = max(1, min(one_wave // base, K // 256,
                           nbytes // (MIN_BYTES_PER_PROGRAM * base)))
    block_k = 64 if not decode else \
        max(64, min(256, triton.next_power_of_2(triton.cdiv(max(K, 1), split))))
    if split > 1:  # no empty trailing split after rounding each split to whole K blocks
        per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        split = triton.cdiv(K, per)

    expand_warps = 4
    if inline:
        block_n = 256  # fewer column tiles = fewer L2 re-reads of A_i
    elif decode:
        # Expand: the narrowest column tile whose grid still fits one wave (more programs
        # in flight, as long as they all run at once).
        block_n = 512
        for bn in (64, 128, 256):
            if tiles * n_slices * triton.cdiv(out_width, bn) <= one_wave:
                block_n = bn
                break
        block_n = min(block_n, max(32, triton.next_power_of_2(max(out_width, 1))))
        if block_n == 512:
            expand_warps = 8  # 16 × 512 fp32 accumulator + B tile: 8 warps keep it in registers
    else:
        want = max(1, min(one_wave, n_slices * out_width * (A * R + 2 * T) * elem
                          // MIN_BYTES_PER_PROGRAM))
        block_n = 32
        for bn in (128, 64):  # 64-row tiles: keep the fp32 accumulator in registers
            if tiles * n_slices * triton.cdiv(out_width, bn) >= want:
                block_n = bn
                break
    return SegConfig(block_m, block_r, block_k, block_n, split, inline,
                     expand_warps=expand_warps)


def fold_planes(planes, cfg, batch, K, out_width, R, n_slices, elem):
    """Sum the split-K planes once up front when every column tile of the expand re-reading
    all of them would cost more than a quarter of the essential traffic (few adapters, many
    tokens); otherwise the expand sums them itself and no launch is added."""
    if planes.shape[0] == 1:
        return planes
    T, A = batch.num_tokens, batch.num_active
    rereads = triton.cdiv(out_width, cfg.block_n) * planes.shape[0] * T * n_slices * R * 4
    essential = (A * n_slices * R * (K + out_width) + T * (K + 2 * n_slices * out_width)) * elem
    return planes.sum(0, keepdim=True) if 4 * rereads > essential else planes


def use_pdl(device) -> bool:
    return TUNING["pdl"] == "auto" and device.type == "cuda" and pdl_supported()


def grad_splits(batch, n_slices, R, width, block_t, block_q, device) -> int:
    """Token chunks per segment for dA/dB: enough programs to fill the GPU when few adapters
    own long segments, each chunk keeping ≥ 8 token blocks of work. Bounded batches never
    split (their active slots carry padding, and their segment lengths are only bounds)."""
    forced = TUNING["grad_splits"]
    if getattr(batch, "bounded", False):
        return 1
    if forced != "auto":
        return max(1, int(forced))
    if device.type != "cuda":
        return 1
    base = batch.num_active * n_slices * triton.cdiv(R, 16) * triton.cdiv(width, block_q)
    want = triton.next_power_of_2(triton.cdiv(wave(device), max(base, 1)))
    return max(1, min(want, batch.max_seg_len // (8 * block_t)))


def use_fused(batch, dtype, device) -> bool:
    path = TUNING["path"]
    if path != "auto":
        return path == "fused"
    T = batch.num_tokens
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and T >= TUNING["fused_min_tokens"] and T >= 32 * batch.num_active)
