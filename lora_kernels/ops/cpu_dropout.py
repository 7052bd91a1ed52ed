"""The Philox keep-mask of ``reference.dropout_keep_mask``, bit-identical, made fast on CPU.

Eager torch runs Philox4x32-10 as ~200 separate int64 tensor passes: 2.7 s for a 2048x1024 mask
on this 2-core box, against ~40 ms for ``F.dropout`` (measured). Compiled by inductor into one
loop whose ten rounds stay in registers it takes ~40-50 ms (measured, same box) after a one-time
compile of ~7 s, so masks above ``MIN_ELEMENTS`` use the compiled loop; smaller ones, other
devices, or a machine where inductor cannot compile (no C++ compiler) use the reference.
``LORA_KERNELS_COMPILE_DROPOUT=0`` turns the compiled path off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from lora_kernels import reference

MIN_ELEMENTS = 1 << 16


def _keep_from_groups(seed: torch.Tensor, g0: torch.Tensor, rows: int, groups: int, cols: int,
                      threshold: int) -> torch.Tensor:
    # Same arithmetic as reference.dropout_keep_mask (v2: 8 elements per Philox call, 16-bit
    # halves; split products, no int64 overflow). seed/g0/sizes are tensors or dynamic ints so
    # one compiled graph serves every call.
    g = torch.arange(rows * groups, dtype=torch.int64) + g0
    words = torch.stack(reference.philox4x32(seed, g), dim=-1)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)
    bits = halves.reshape(rows, groups * reference.KEEP_GROUP)[:, :cols]
    return bits >= threshold


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(_keep_from_groups, dynamic=True)


_BROKEN = False


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None,
                      row_offset: int = 0) -> torch.Tensor:
    global _BROKEN
    n = rows * cols
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if (p <= 0.0 or n < MIN_ELEMENTS or dev.type != "cpu" or _BROKEN
            or os.environ.get("LORA_KERNELS_COMPILE_DROPOUT", "1") == "0"):
        return reference.dropout_keep_mask(seed, rows, cols, p, device, row_offset)
    seed_t = torch.tensor(reference.seed_int64(seed), dtype=torch.int64)
    groups = reference.keep_groups(cols)
    g0 = torch.tensor(row_offset * groups, dtype=torch.int64)
    try:
        keep = _compiled()(seed_t, g0, rows, groups, cols, reference.keep_threshold(p))
    except Exception as exc:  # no working C++ toolchain for inductor: stay correct, just slower
        _BROKEN = True
        warnings.warn(f"lora_kernels: compiled CPU dropout mask unavailable ({exc!r}); "
                      f"using the slower reference generator", RuntimeWarning)
        return reference.dropout_keep_mask(seed, rows, cols, p, device, row_offset)
    return keep.contiguous()
