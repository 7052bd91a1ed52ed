"""``MultiLoRALinear``: one frozen base linear plus ``num_slots`` adapters in device slots, each
token routed to its own adapter by a ``LoRABatch`` — for serving and multi-adapter training."""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.nn.lora_linear import freeze, check_backend, check_dtype, linear_dims
from lora_kernels.ops import LoRABatch, multi_lora_linear
from lora_kernels.ops.fp8 import FP8Weight
from lora_kernels.ops.nf4 import NF4Weight, from_params4bit
from lora_kernels.ops.validation import check_slices


def is_linear4bit(m) -> bool:
    """A bitsandbytes ``Linear4bit`` (by class, nothing here imports bitsandbytes)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(m).__mro__)


def _quantized_base(base, bias, dtype):
    """``(qweight, bias, compute dtype)`` of an FP8 / NF4 base, or None for a dense one."""
    if isinstance(base, (FP8Weight, NF4Weight)):
        if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 1 or
                                 bias.shape[0] != base.shape[0]):
            raise ValueError(f"bias must be a tensor [out={base.shape[0]}] or None, got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        default = base.dtype if isinstance(base, NF4Weight) else torch.bfloat16
        return base, bias, dtype or default
    # imported here: nn.fp8_linear -> nn.inject -> this module would otherwise be a cycle
    from lora_kernels.nn.fp8_linear import FP8Linear
    if isinstance(base, FP8Linear):  # its e4m3 buffers and scale are the FP8Weight, unchanged
        if bias is not None:
            raise ValueError("bias: an FP8Linear base brings its own bias; pass bias=None")
        w = FP8Weight(codes=base.weight, scale=base.weight_scale)
        return w, base.bias, dtype or torch.bfloat16
    if is_linear4bit(base):
        if bias is not None:
            raise ValueError("bias: a Linear4bit base brings its own bias; pass bias=None")
        qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if qs is None:
            raise ValueError("base_linear: its Linear4bit weight is not quantized yet (move "
                             "it to its device first)")
        if getattr(base.weight, "quant_state", None) is None:
            base.weight.quant_state = qs
        w = from_params4bit(base.weight)
        return w, base.bias, dtype or base.compute_dtype or w.dtype
    if bias is not None:
        raise ValueError("bias: only a quantized base (FP8Weight / NF4Weight) takes bias=; an "
                         "nn.Linear brings its own")
    return None


class MultiLoRALinear(nn.Module):
    """Base ``nn.Linear`` (or ``Conv1D``) + stacked adapters ``lora_A [S, n_slices·R, in]``,
    ``lora_B [S, out, R]``, per-slot ``scalings [S]`` and ``ranks [S]`` (or ``[S, n_slices]``).

    Empty slots have rank 0 (no work). ``forward(x, batch)`` takes the batch explicitly or uses
    the one installed with :func:`use_lora_batch` / :meth:`set_lora_batch`. ``lora_A``/``lora_B``
    are Parameters: several adapters can be trained in one mixed batch.

    A frozen quantized base: ``base_linear`` an ``FP8Weight`` (e4m3, one scale per output
    channel; ``bias=`` optional) or ``NF4Weight``, or a bitsandbytes NF4 ``Linear4bit``. W is
    then decoded tile by tile inside the GEMMs (``.qweight`` holds it, ``.weight`` is None);
    ``dtype`` is the compute dtype (default: bf16 for FP8, the storage / ``compute_dtype`` for
    NF4), x is cast to it and the output back to x's dtype. The quantized tensors are not
    registered buffers (not in ``state_dict``); ``.to(device)`` moves them, a dtype cast
    never touches them.
    """

    def __init__(self, base_linear: nn.Module, num_slots: int, max_rank: int,
                 out_slices: Optional[Sequence[int]] = None, backend: str = "auto",
                 dtype: Optional[torch.dtype] = None, bias: Optional[Tensor] = None):
        super().__init__()
        for name, v in (("num_slots", num_slots), ("max_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_dtype(dtype)
        quant = _quantized_base(base_linear, bias, dtype)
        # qweight: a frozen FP8 / NF4 base, decoded tile by tile inside the GEMMs (never a
        # dense copy); `dtype` is then the compute dtype (x is cast to it, y cast back).
        self.qweight = None
        if quant is not None:
            self.qweight, bias, dtype = quant
            self.out_features, self.in_features = (int(v) for v in self.qweight.shape)
            self.fan_in_fan_out = False
            weight = self.qweight.codes  # device (and the frozen flag) of the storage
            self.weight = None
            self.bias = bias
        else:
            weight, self.in_features, self.out_features, self.fan_in_fan_out = \
                linear_dims(base_linear, "base_linear")
            self.weight = weight
            self.bias = getattr(base_linear, "bias", None)
        self.backend = check_backend(backend)
        slices = check_slices(out_slices, self.out_features)  # the op's own rule and errors
        self.out_slices = None if slices is None else tuple(slices)
        n_slices = 1 if self.out_slices is None else len(self.out_slices)
        self.num_slots, self.max_rank, self.n_slices = num_slots, max_rank, n_slices
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.compute_dtype = factory["dtype"]
        self.lora_A = nn.Parameter(torch.zeros(num_slots, n_slices * max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, self.out_features, max_rank, **factory))
        self.register_buffer("scalings", torch.zeros(num_slots, dtype=torch.float32, device=weight.device))
        rank_shape = (num_slots,) if n_slices == 1 else (num_slots, n_slices)
        self.register_buffer("ranks", torch.zeros(rank_shape, dtype=torch.int32, device=weight.device))
        self.lora_batch: Optional[LoRABatch] = None
        # last: a rejected call leaves the wrapped layer as it was
        freeze(self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.cuda()`` / ``.half()`` also move the quantized base's tensors (not
        registered buffers: a dtype cast must never touch FP8 codes or the fp32 scales), to the
        device only; a plain-tensor bias follows ``fn`` fully; the compute dtype follows the
        adapters."""
        out = super()._apply(fn, recurse)
        w = self.qweight
        if w is not None:
            import dataclasses
            moved = {}
            for f in dataclasses.fields(w):
                t = getattr(w, f.name)
                if isinstance(t, Tensor):
                    # a 0-element probe tells where fn sends tensors, without copying t
                    moved[f.name] = t.to(fn(t.new_empty(0)).device)
            self.qweight = dataclasses.replace(w, **moved)
            if isinstance(self.bias, Tensor) and not isinstance(self.bias, nn.Parameter):
                self.bias = fn(self.bias)
            self.compute_dtype = self.lora_A.dtype
        return out

    def base_weight(self):
        """The base W ``[out, in]`` as the ops take it (a quantized base: its FP8Weight /
        NF4Weight)."""
        if self.qweight is not None:
            return self.qweight
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # ---- slots ------------------------------------------------------------------------------
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_a: Tensor, lora_b: Tensor, scaling: float,
                    slice_ranks: Optional[Sequence[int]] = None) -> None:
        """Place one adapter in ``slot``: ``lora_a [n_slices·r, in]`` (or ``[r, in]``),
        ``lora_b [out, r]``. Rows/columns past ``r`` are zeroed; ``slice_ranks`` marks slices the
        adapter does not touch with 0 (packed projections)."""
        slot = self._check_slot(slot)
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        r = lora_b.shape[-1] if lora_b.dim() == 2 else -1
        if lora_b.dim() != 2 or lora_b.shape[0] != self.out_features or not 1 <= r <= self.max_rank:
            raise ValueError(f"lora_b must have shape [out={self.out_features}, r] with 1 <= r <= "
                             f"max_rank={self.max_rank}, got {list(lora_b.shape)}")
        if lora_a.dim() != 2 or lora_a.shape != (self.n_slices * r, self.in_features):
            raise ValueError(f"lora_a must have shape [n_slices·r, in] = "
                             f"[{self.n_slices * r}, {self.in_features}], got {list(lora_a.shape)}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
        ranks = [r] * self.n_slices if slice_ranks is None else [int(v) for v in slice_ranks]
        if len(ranks) != self.n_slices or any(not 0 <= v <= r for v in ranks):
            raise ValueError(f"slice_ranks must be {self.n_slices} ints in [0, {r}], got {slice_ranks}")
        # Stage the whole slot first: everything that can fail (a copy from another device, say)
        # fails before the slot is touched, so a rejected call leaves the layer unchanged.
        R = self.max_rank
        a_new = self.lora_A.new_zeros(self.lora_A.shape[1:])
        b_new = self.lora_B.new_zeros(self.lora_B.shape[1:])
        for j in range(self.n_slices):
            a_new[j * R:j * R + r] = lora_a[j * r:(j + 1) * r]
        b_new[:, :r] = lora_b
        rank_t = torch.tensor(ranks if self.n_slices > 1 else ranks[0], dtype=torch.int32)
        self.lora_A[slot] = a_new
        self.lora_B[slot] = b_new
        self.scalings[slot] = float(scaling)
        self.ranks[slot] = rank_t

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        slot = self._check_slot(slot)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0

    # ---- forward ----------------------------------------------------------------------------
    def set_lora_batch(self, batch: Optional[LoRABatch], explain=None) -> None:
        """Install ``batch`` for later forwards. ``explain(x)``, if given, returns None or the
        error to raise when ``x`` does not fit the batch, in the words of whoever built it
        (``AdapterPool.batch`` names its ``names`` list and ``tokens_per_sample``)."""
        if batch is not None and not isinstance(batch, LoRABatch):
            raise TypeError(f"batch must be a LoRABatch or None, got {type(batch).__name__}")
        self.lora_batch = batch
        self._explain_batch = explain if batch is not None else None

    def forward(self, x: Tensor, batch: Optional[LoRABatch] = None) -> Tensor:
        if batch is None and getattr(self, "_explain_batch", None) is not None:
            problem = self._explain_batch(x)
            if problem is not None:
                raise ValueError(problem)
        batch = batch if batch is not None else self.lora_batch
        w = self.base_weight()
        if self.qweight is not None:
            return self._quantized_forward(x, w, batch)
        if batch is None:
            return F.linear(x, w, self.bias)
        return multi_lora_linear(x, w, self.bias, self.lora_A, self.lora_B, batch,
                                 scalings=self.scalings, ranks=self.ranks,
                                 out_slices=self.out_slices, backend=self.backend)

    def _quantized_forward(self, x: Tensor, w, batch: Optional[LoRABatch]) -> Tensor:
        # Like bitsandbytes' Linear4bit: compute in the compute dtype, return x's dtype.
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        xc = x.to(self.compute_dtype)
        if batch is None:  # base only: every token on -1 (the same fused GEMM, no LoRA work)
            tokens = xc.numel() // max(xc.shape[-1], 1) if xc.dim() else 0
            batch = LoRABatch.from_host_ids(torch.full((tokens,), -1, dtype=torch.int64),
                                            self.num_slots, xc.device)
        y = multi_lora_linear(xc, w, self.bias, self.lora_A, self.lora_B, batch,
                              scalings=self.scalings, ranks=self.ranks,
                              out_slices=self.out_slices, backend=self.backend)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        base = "" if self.qweight is None else f"base={type(self.qweight).__name__}, "
        return (base + f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_slots={self.num_slots}, max_rank={self.max_rank}, "
                f"out_slices={self.out_slices}, backend={self.backend!r}")


def set_lora_batch(model: nn.Module, batch: Optional[LoRABatch]) -> None:
    """Install ``batch`` on every ``MultiLoRALinear`` in ``model`` (built once per forward)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch is not None and not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch or None, got {type(batch).__name__}")
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            m.set_lora_batch(batch)


@contextlib.contextmanager
def use_lora_batch(model: nn.Module, batch: LoRABatch):
    """``with use_lora_batch(model, batch): model(x)`` — routes every token to its adapter."""
    set_lora_batch(model, batch)
    try:
        yield batch
    finally:
        set_lora_batch(model, None)
