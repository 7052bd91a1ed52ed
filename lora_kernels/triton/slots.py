"""Per-slot rank lookup shared by the multi-adapter kernels: the @triton.jit ``slot_rank`` and
the host ``ranks_args`` that prepares its arguments (one copy for every kernel file)."""

import triton
import triton.language as tl

__all__ = ["slot_rank", "ranks_args"]


@triton.jit
def slot_rank(RANKS, slot, j, R, stride_rs, stride_rj, HAS_RANKS: tl.constexpr):
    """Rank of slice ``j`` of adapter ``slot`` (``R`` when every adapter has the full rank)."""
    if HAS_RANKS:
        return tl.load(RANKS + slot * stride_rs + j * stride_rj)
    return R


def ranks_args(ranks, dummy):
    """``(ranks or dummy, stride over slots, stride over slices, HAS_RANKS)``; ``ranks`` is
    None, ``[S]`` or ``[S, n_slices]`` int32."""
    if ranks is None:
        return dummy, 0, 0, False
    if ranks.dim() == 1:
        return ranks, ranks.stride(0), 0, True
    return ranks, ranks.stride(0), ranks.stride(1), True
