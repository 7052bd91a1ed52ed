"""Input checks shared by every public op. Each error names the argument and what was expected."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_LIMIT = 2**31 - 1  # kernels index with int32 row offsets times int64 strides; see check_index_math


def tensor(name: str, t, ndim: Optional[int | tuple] = None, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 on the torch "
                        f"backend), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {list(t.shape)}")
    return t


def shape(name: str, t: Tensor, expected: Sequence, desc: str) -> None:
    """``expected`` holds ints or None (any); ``desc`` names the dims, e.g. ``"[r, K]"``."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {desc} = {want}, got {list(t.shape)}")


def same_device(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    dev = ref.device
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {dev}; "
                             f"move them to one device")


def scalar(name: str, v, low: float = -math.inf, high: float = math.inf,
           high_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, Tensor) and v.numel() == 1 and not v.requires_grad:
            v = v.item()
        else:
            raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    v = float(v)
    # `v != v` is the NaN test: under torch.compile a float that changed between compiles
    # arrives as a SymFloat, which math.isnan rejects (a graph break). ±inf is not finite either.
    if v != v or abs(v) == math.inf or v < low or v > high or (high_open and v >= high):
        raise ValueError(f"{name} must be {_range_words(low, high, high_open)}, got {v}")
    return v


def _range_words(low: float, high: float, high_open: bool) -> str:
    # An infinite bound is no bound: "finite and in [-inf, inf]" reads as a contradiction.
    if low == -math.inf and high == math.inf:
        return "finite"
    if high == math.inf:
        return f"finite and >= {low}"
    if low == -math.inf:
        return f"finite and {'<' if high_open else '<='} {high}"
    return f"finite and in [{low}, {high}{')' if high_open else ']'}"


def check_index_math(name: str, rows: int) -> None:
    """Kernels compute element offsets in int64 (any column count is fine), but a row index
    must fit int32."""
    if rows > INDEX_LIMIT:
        raise ValueError(f"{name} has {rows} rows; at most {INDEX_LIMIT} are supported")


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype (x is {x.dtype}, weight is "
                        f"{weight.dtype}); LoRA factors may differ (they are cast to x's dtype)")
    return x.dtype


def dense(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype``, contiguous (what backends read): no copy when it already is. Casting
    happens here, outside the custom op, so fp32 PEFT adapters on a bf16 base get their
    gradients back in fp32 through autograd."""
    if t is None:
        return None
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()
