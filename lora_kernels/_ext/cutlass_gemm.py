"""When and how the ``cuda`` backend runs the CUTLASS sm90 fused LoRA GEMM.

``cuda_cutlass_lora_gemm(a, w, bias, u, v, trans_b, out)`` computes ``out = a·op(w) + u·op(v)
+ bias`` with the low-rank pair as extra k-tiles of one TMA/wgmma K loop (csrc/kernels/cutlass/).
It takes what TMA takes: fp16/bf16, 16-byte aligned data, row strides that are multiples of 8
elements. This module decides per call whether a call qualifies and builds the M×r operand ``u``
(scaling folded in, ranks zero-padded to a multiple of 8); everything else stays on the
hand-written ``cuda_fused_lora_gemm``.

``cuda_cutlass_lora_dx_dropout`` is dX with dropout: the base GEMM on the same TMA/wgmma
collectives, the masked low-rank term added per element in the epilogue (the mask applies to
it alone, so it cannot share the accumulator); :func:`usable_dx_dropout` routes to it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lora_kernels._ext.loader import ops, why_no_cutlass

# The CUTLASS kernel's tile is 128 rows: below that most of each tile is padding, and the
# decode-shaped work belongs to the hand-written kernels (an untuned threshold: a prediction).
MIN_ROWS = 128
RANK_ALIGN = 8  # 16 bytes of fp16/bf16: the TMA stride unit
ENV_DISABLE = "LORA_KERNELS_NO_CUTLASS"  # "1": always the mma.sync kernel (side-by-side benches)


def _aligned(t: Tensor) -> bool:
    """16-byte aligned data. Fake and meta tensors (tracing) have no address: taken as aligned,
    so a traced call takes the route the real one would (both ops have the same fake)."""
    if t.device.type == "meta" or is_fake(t):
        return True
    return t.data_ptr() % 16 == 0


def _row_ok(t: Optional[Tensor]) -> bool:
    """A 2-D operand TMA can read: unit inner stride, row stride a multiple of 8, aligned base."""
    if t is None:
        return True
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or not _aligned(t):
        return False
    return t.shape[0] <= 1 or t.stride(0) % RANK_ALIGN == 0


def usable(a: Tensor, w: Tensor, out: Tensor, bias: Optional[Tensor] = None,
           v: Optional[Tensor] = None) -> bool:
    """Whether this call runs on the CUTLASS kernel (``v`` only where it is passed as is)."""
    if os.environ.get(ENV_DISABLE) == "1" or why_no_cutlass() is not None:
        return False
    if a.dtype not in (torch.float16, torch.bfloat16) or a.shape[0] < MIN_ROWS or a.shape[1] == 0:
        return False
    # CUTLASS's TMA rule: contiguous extents (K of a, N of out) multiples of 8 too, not only strides
    if a.shape[1] % RANK_ALIGN or out.shape[1] % RANK_ALIGN:
        return False
    if bias is not None and (not _aligned(bias) or not bias.is_contiguous()):
        return False
    return all(_row_ok(t) for t in (a, w, out, v))


# Largest p the dX-with-dropout kernel takes: its 16-bit threshold ceil(p·2^16) must stay below
# 2^16 (the op's rule, lowrank_dx_dropout_sm90_supported); p this close to 1 keeps nothing.
MAX_DROPOUT_P = 1.0 - 2.0 ** -16


def usable_dx_dropout(dy: Tensor, w: Tensor, dx: Tensor, dropout_p: float, lora_a: Tensor) -> bool:
    """Whether dX with dropout runs on the CUTLASS kernel (``cuda_cutlass_lora_dx_dropout``):
    the base pair's TMA rule (:func:`usable`), 0 < p <= MAX_DROPOUT_P and 1 <= r <= 4096 (u and
    A are read with plain loads in the epilogue: no padding, any row stride)."""
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or (lora_a.shape[1] > 1 and lora_a.stride(1) != 1):
        return False
    return 0.0 < dropout_p <= MAX_DROPOUT_P and 1 <= r <= 4096 and usable(dy, w, dx)


def rank_padded(r: int) -> int:
    return -(-r // RANK_ALIGN) * RANK_ALIGN


def lowrank_rows(t: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """``scaling·t`` as a ``[rows, r8]`` ``dtype`` operand, zero-padded past r (one rounding)."""
    rows, r = t.shape
    out = torch.empty(rows, rank_padded(r), dtype=dtype, device=t.device)
    if out.shape[1] > r:
        out[:, r:].zero_()
    torch.mul(t, scaling, out=out[:, :r])
    return out


def pad_ranks(t: Tensor) -> Tensor:
    """``[n, r]`` -> ``[n, r8]`` with zero columns (the forward's B; a no-op when r % 8 == 0)."""
    r = t.shape[1]
    if r == 0 or (r % RANK_ALIGN == 0 and _row_ok(t)):
        return t
    return torch.nn.functional.pad(t, (0, rank_padded(r) - r)).contiguous()


def pad_rank_rows(t: Tensor) -> Tensor:
    """``[r, k]`` -> ``[r8, k]`` with zero rows (dX's A; a no-op when r % 8 == 0)."""
    r = t.shape[0]
    if r % RANK_ALIGN == 0 and _row_ok(t):
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, rank_padded(r) - r)).contiguous()


def gemm(a: Tensor, w: Tensor, bias: Optional[Tensor], u: Tensor, v: Tensor, trans_b: bool,
         out: Tensor) -> Tensor:
    ops().cuda_cutlass_lora_gemm(a, w, bias, u, v, bool(trans_b), out)
    return out


def dx_dropout(dy: Tensor, w: Tensor, u: Tensor, v: Tensor, dropout_p: float, seed: int,
               out: Tensor) -> Tensor:
    """``out = dy·w + keep∘(u·v)/(1-p)``, keep = mask v2 of ``seed`` on out's grid (seed as the
    signed int64 carrying its 64 bits)."""
    ops().cuda_cutlass_lora_dx_dropout(dy, w, u, v, float(dropout_p), int(seed), out)
    return out
