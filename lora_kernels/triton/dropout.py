"""Counter-based dropout mask for the LoRA branch: the @triton.jit helper every kernel calls,
and the mask kernel behind the backend's ``dropout_keep_mask``.

``keep[m, k] = (philox4x32_10(seed, m·K + k)[0] >> 8) >= ceil(p·2²⁴)`` — the same bits as
``lora_kernels.reference.dropout_keep_mask`` (docs/BACKENDS.md). Kernels call :func:`philox_keep`
on whatever tile they hold, so the mask is regenerated wherever it is needed (forward shrink,
dX epilogue, dA) and never stored.

Other kernel files may import :func:`philox_keep`, :func:`drop_threshold` and :func:`seed_arg`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from lora_kernels.reference import seed_int64

__all__ = ["philox_keep", "drop_threshold", "seed_arg", "dropout_keep_mask"]


def drop_threshold(p: float) -> int:
    """Integer threshold T with ``keep ⟺ (bits >> 8) >= T``.

    The reference compares ``(bits >> 8)·2⁻²⁴ >= p`` in float64. Passing p to a kernel would
    round it to fp32, which can move it across a multiple of 2⁻²⁴ and flip single mask bits;
    ``ceil(p·2²⁴)`` is exact in float64 (a power-of-two scaling) and the integer compare is
    then bit-for-bit the reference's.
    """
    if p <= 0.0:
        return 0
    return int(math.ceil(float(p) * 16777216.0))


# The seed as a signed 64-bit Python int: Triton types ints past int64 as uint64, and
# ``tl.randint`` widens any int seed to uint64 two's-complement, like the reference's
# ``seed & (2⁶⁴ − 1)``.
seed_arg = seed_int64


@triton.jit
def philox_keep(seed, offsets, threshold):
    """Keep-mask (int1 block) for int64 ``offsets`` = row·cols + col.

    ``tl.randint`` splits an int64 offset into (lo32, hi32) counter words and runs
    Philox4x32-10 keyed by (seed lo32, seed hi32); its first word is uint32, so ``>> 8`` is a
    logical shift and the top 24 bits are compared as integers.
    """
    bits = tl.randint(seed, offsets)
    return (bits >> 8) >= threshold


@triton.jit(do_not_specialize=["seed", "threshold"])
def _keep_mask_kernel(out_ptr, numel, seed, threshold, BLOCK: tl.constexpr):
    # The mask is laid out row-major, so the flat index *is* the Philox offset m·cols + k.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = philox_keep(seed, offs, threshold)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < numel)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The boolean mask ``[rows, cols]`` every Triton kernel here draws for ``(seed, p)``."""
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    numel = rows * cols
    if p <= 0.0:
        return out.fill_(True)
    if numel == 0:
        return out
    block = 1024
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _keep_mask_kernel[(triton.cdiv(numel, block),)](
            out.view(torch.int8), numel, seed_arg(seed), drop_threshold(p), BLOCK=block)
    return out
