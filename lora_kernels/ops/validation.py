"""Input checks shared by every public op. Each error names the argument and what was expected."""

from __future__ import annotations

import math
import operator
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels.ops.batch import LoRABatch

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


# ------------------------------------------------------------------------------------------
# Multi-adapter stacks and batches (ops/multi_lora.py, nn/multi_lora.py)
# ------------------------------------------------------------------------------------------
_RANKS_CHECKED: dict = {}


def check_batch(batch, T: int, S: int, device) -> LoRABatch:
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch (LoRABatch.from_adapter_ids(ids, num_slots)), "
                        f"got {type(batch).__name__}")
    if batch.num_tokens != T:
        raise ValueError(f"batch describes {batch.num_tokens} tokens but x has T={T} rows")
    if batch.num_slots != S:
        raise ValueError(f"batch was built for num_slots={batch.num_slots} but the adapter "
                         f"stack has S={S} slots")
    if batch.device != device:
        raise ValueError(f"batch is on {batch.device} but x is on {device}; use batch.to(device)")
    return batch


def check_scalings(scalings, S: int, device) -> Tensor:
    if isinstance(scalings, Tensor):
        if scalings.dtype.is_complex or scalings.dtype == torch.bool:
            raise TypeError(f"scalings must be a float tensor [S], got dtype {scalings.dtype}")
        t = scalings
    else:
        try:
            t = torch.as_tensor(list(scalings) if not isinstance(scalings, (int, float)) else
                                [scalings] * S, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"scalings must be a float tensor or a sequence of S floats: {exc}")
    if t.dim() != 1 or t.shape[0] != S:
        raise ValueError(f"scalings must have shape [S] = [{S}], got {list(t.shape)}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def check_ranks(ranks: Optional[Tensor], S: int, R: int, n_slices: int, device) -> Optional[Tensor]:
    if ranks is None:
        return None
    if not isinstance(ranks, Tensor):
        ranks = torch.as_tensor(ranks)
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise TypeError(f"ranks must be an integer tensor, got dtype {ranks.dtype}")
    if not (ranks.shape == (S,) or ranks.shape == (S, n_slices)):
        raise ValueError(f"ranks must have shape [S] = [{S}] or [S, n_slices] = [{S}, {n_slices}],"
                         f" got {list(ranks.shape)}")
    # Range check once per ranks tensor version (a sync on CUDA), not once per layer call.
    # Under torch.compile a data-dependent check cannot live in the graph: it ran in eager
    # (and MultiLoRALinear.set_adapter validates every rank it stores).
    # Inference-mode tensors have no version counter: key those on identity alone.
    # The cache holds a weak reference to the tensor it checked: a new tensor that happens to
    # reuse a freed one's id and memory (the CUDA caching allocator does that) is checked again.
    # CPU ranks are always checked (no sync to save), so an in-place change under
    # inference_mode (no version counter) cannot slip through there.
    key = None if torch.compiler.is_compiling() else (
        id(ranks), None if ranks.is_inference() else ranks._version, ranks.data_ptr(), R)
    hit = None if key is None or ranks.device.type == "cpu" else _RANKS_CHECKED.get(key)
    if key is not None and (hit is None or hit() is not ranks):
        lo, hi = (int(v) for v in torch.stack([ranks.min(), ranks.max()]).tolist()) \
            if ranks.numel() else (0, 0)
        if lo < 0 or hi > R:
            raise ValueError(f"ranks must lie in [0, r_max={R}], found {lo if lo < 0 else hi}")
        if len(_RANKS_CHECKED) > 256:
            _RANKS_CHECKED.clear()
        _RANKS_CHECKED[key] = weakref.ref(ranks)
    return ranks.to(device=device, dtype=torch.int32).contiguous()


def check_slices(out_slices, N: int) -> Optional[list[int]]:
    if out_slices is None:
        return None
    try:  # operator.index: 2.5 or "3" is a mistake, not a width to truncate
        sl = [operator.index(w) for w in out_slices]
    except TypeError as exc:
        raise TypeError(f"out_slices must be a sequence of int widths summing to N={N}, got "
                        f"{out_slices!r} ({exc})") from None
    if not sl or any(w <= 0 for w in sl) or sum(sl) != N:
        raise ValueError(f"out_slices must be positive widths summing to N={N}, got {list(out_slices)}")
    return sl


def check_stack(x2, weight, bias, lora_a, lora_b, out_slices):
    tensor("weight", weight, 2)
    tensor("lora_a", lora_a, 3)
    tensor("lora_b", lora_b, 3)
    dtype = compute_dtype(x2, weight)
    N, K = weight.shape
    S, R = lora_b.shape[0], lora_b.shape[2]
    shape("x", x2, (x2.shape[0], K), "[T, K]")
    slices = check_slices(out_slices, N)
    n_slices = 1 if slices is None else len(slices)
    shape("lora_b", lora_b, (S, N, R), "[S, N, r_max]")
    shape("lora_a", lora_a, (None, None, K), "[S, n_slices·r_max, K]")
    # The two stacks must agree with each other; say so, naming both, rather than blame
    # lora_a alone for a rank (or slot count) that lora_b set.
    if lora_a.shape[0] != S or lora_a.shape[1] != n_slices * R:
        what = ("the slot count S" if lora_a.shape[0] != S else
                f"r_max (lora_a.shape[1] = n_slices·r_max, n_slices={n_slices})")
        raise ValueError(
            f"lora_a must have shape [S, n_slices·r_max, K] = [{S}, {n_slices * R}, {K}] to match "
            f"lora_b {list(lora_b.shape)} ([S, N, r_max]), got {list(lora_a.shape)}: lora_a and "
            f"lora_b disagree on {what}")
    if bias is not None:
        tensor("bias", bias, 1)
        shape("bias", bias, (N,), "[N]")
    same_device("x", x2, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    return dtype, N, K, S, R, slices, n_slices


# ------------------------------------------------------------------------------------------
# Public entries
# ------------------------------------------------------------------------------------------
