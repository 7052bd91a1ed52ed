"""Base GEMM fused with each token's own low-rank term: ``y[t] = x[t]·Wᵀ + b + xa[t]·B_iᵀ``.

One program computes a ``BLOCK_M × BLOCK_N`` tile of y over *sorted* token positions
(``sorted_token_ids``): the base GEMM does not care about row order, and in sorted order a tile
holds at most a few adapter segments. The epilogue then walks the distinct slots of the tile
(ascending, found with a min-reduction — no host data) and adds ``xa[rows of slot]·B_slotᵀ`` as
one small MMA per slot and slice, before the single write of the output tile.

The kernel is the GEMM core's ``multi_gemm_kernel`` (spec: gathered rows, per-slot low-rank;
``gemm/kernel.py``): the same K loop as the single-adapter GEMM, this launcher only sizes it.

*Why tiles over sorted positions and not per segment*: segment-aligned M tiles would pad every
segment up to ``BLOCK_M`` — with 64 adapters over 8192 tokens that doubles the number of M tiles
of the base GEMM. *Why not the original order*: a random mix of adapters puts up to BLOCK_M
distinct slots in a tile, each costing an epilogue MMA. *Why xa comes precomputed*
(``lora_shrink``, one pass over x): computing it inside the main loop would need one A_i per
row. The extra cost over the bare GEMM is one read of x (the shrink) plus
``segments-per-tile × r/K`` of the tile's MMA work.
"""

from __future__ import annotations

import triton

from lora_kernels.triton import configs as C
from lora_kernels.triton.device import hw_cvt_ok
from lora_kernels.triton.gemm.formats import PackedWeight, prune_packed
from lora_kernels.triton.gemm.kernel import multi_gemm_kernel
from lora_kernels.triton.gemm.spec import GemmSpec
from lora_kernels.triton.slots import ranks_args

# The variant this launcher runs (the sm_90 compile test and bench/sass_report.py list it).
SPEC = GemmSpec(rows="gathered", lowrank="per_slot")
# The same over a quantized W (FP8 e4m3 / NF4 storage decoded in the K loop: gemm/formats.py).
QUANT_SPECS = {w: GemmSpec(weight=w, rows="gathered", lowrank="per_slot")
               for w in ("fp8_e4m3", "nf4", "nf4_nested")}

# EVEN_K (no K masks in the main loop) follows whichever BLOCK_K the config has.
_fused_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(multi_gemm_kernel)
# Autotuned on GPUs only: the key buckets T by powers of two so a serving loop with a new T
# every step does not re-tune every step. The interpreter gets one small fixed config.
_fused_tuned = triton.autotune(configs=C.MULTI_FUSED, key=["N", "K", "t_bucket"])(_fused_even_k)


def _no_prune(configs, named_args, **kwargs):
    return configs


def quant_configs(weight: int) -> list:
    """The autotune list over a quantized W of format ``weight`` (gemm.modes.WEIGHT_*) after
    the register budget (bench/sass_report.py compiles these)."""
    return prune_packed(_no_prune)(C.MULTI_FUSED, None, WEIGHT=int(weight))


# A quantized W decodes a [BLOCK_K, BLOCK_N] tile in registers next to the accumulator: the
# single-adapter GEMM's register budget (prune_packed) applies here too (128x256x64 / 8 warps
# spilled 112-248 B with NF4 there).
_fused_tuned_q = triton.autotune(configs=C.MULTI_FUSED, key=["N", "K", "t_bucket", "WEIGHT"],
                                 prune_configs_by={"early_config_prune":
                                                   prune_packed(_no_prune)})(_fused_even_k)


def launch_fused(x, weight, bias, y, xa, lora_b, ranks, bounds, batch, *, R, n_slices, prec,
                 lora_prec, interpret, config=None):
    """``y = x·Wᵀ + b + Σ_slices xa·B_iᵀ`` written once. ``xa``: the scaled shrink output,
    ``[T, n_slices·R]`` float32 (or one ``[1, T, n_slices·R]`` plane); only rows of adapted
    tokens and ranks below each rank are read. ``W`` may have any strides; the rest is dense.
    ``weight`` may be a :class:`~gemm.formats.PackedWeight` (FP8 / NF4 storage, decoded tile
    by tile in the K loop: never a wider copy of W)."""
    T, K = x.shape
    N = weight.shape[0]
    xa2 = xa[0] if xa.dim() == 3 else xa
    rk, srs, srj, has_rk = ranks_args(ranks, y)
    packed = isinstance(weight, PackedWeight)
    if packed and weight.transposed:
        raise ValueError("launch_fused reads the forward's W: pass the packed weight, not .t()")
    w_strides = weight.strides() if packed else (weight.stride(0), weight.stride(1))
    args = (x, weight.codes if packed else weight, y if bias is None else bias, y, xa2, lora_b,
            rk, bounds, batch.adapter_ids, batch.sorted_token_ids,
            T, N, K, R, batch.num_slots, n_slices, C.m_bucket(T),
            x.stride(0), x.stride(1), *w_strides, y.stride(0),
            xa2.stride(0), lora_b.stride(0), lora_b.stride(1), srs, srj,
            bias.stride(0) if bias is not None else 0)
    flags = dict(BLOCK_R=16, HAS_BIAS=bias is not None, HAS_RANKS=has_rk,
                 PREC=prec, LORA_PREC=lora_prec)
    if packed:
        flags.update(weight.launch_args(hw_cvt=hw_cvt_ok(x)))
        flags["wq_absmax2"] = weight.absmax2 if weight.absmax2 is not None else weight.absmax

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpret or config is not None:
        cfg = dict(C.MULTI_FUSED_INTERPRET if config is None else config)
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        _fused_even_k[grid](*args, **cfg, **flags, **launch)
    else:
        (_fused_tuned_q if packed else _fused_tuned)[grid](*args, **flags)
    return y
