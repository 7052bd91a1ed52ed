"""Facts that the ops and the backends must agree on, in one place (a leaf: imports nothing of
ours and no triton, so ``ops.backend`` can read them before it knows Triton is importable)."""

from __future__ import annotations

import os

# Rows (M, or T tokens) at or below which a GEMM takes the decode path: 16 rows is the smallest
# tile tl.dot accepts, so a 16-row tile wastes nothing at M ≤ 16 while a 128-row one idles
# 127/128 rows. The dispatch table's "decode" class is the same bound.
DECODE_MAX_ROWS = 16
# Rows at or below which the GEMM is bandwidth-bound on W (the "medium" configs and class).
MEDIUM_MAX_ROWS = 256


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on CPU tensors, one config each)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def shape_class(rows: int) -> str:
    """The coarse class of a row count that configs and the dispatch table are keyed by."""
    return "decode" if rows <= DECODE_MAX_ROWS else ("medium" if rows <= MEDIUM_MAX_ROWS
                                                     else "large")


# The seed and dropout conventions the kernels' Python sides apply. lora_kernels.reference
# states the same rules for itself on purpose: the oracle shares no code with what it checks.
def seed_int64(seed) -> int:
    """A seed as the signed int64 carrying its low 64 bits (two's complement), the form int64
    op schemas and kernels take."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def apply_keep(x, keep, p: float):
    """``x ∘ keep / (1 − p)`` (``x`` itself when ``keep`` is None: no dropout)."""
    if keep is None:
        return x
    import torch  # here, not at the top: the module stays importable without torch's cost
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
