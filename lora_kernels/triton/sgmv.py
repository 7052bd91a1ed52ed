"""Compatibility names for the segment kernels, which now live in files named by job:
:mod:`segments` (tile mapping, ranks, slice bounds), :mod:`shrink_expand` (shrink / expand,
decode and prefill) and :mod:`seg_grads` (dA/dB reductions). ``multi_fused`` and older
callers import from here until they move to those modules."""

from lora_kernels.triton.seg_grads import launch_seg_outer  # noqa: F401
from lora_kernels.triton.segments import (SCAN_MAX_ACTIVE, rank_of, ranks_args,  # noqa: F401
                                          segment_tile, slice_bounds, token_tiles)
from lora_kernels.triton.shrink_expand import launch_expand, launch_shrink  # noqa: F401

# The private spellings multi_fused.py used before the split.
_rank_of, _ranks_args = rank_of, ranks_args
