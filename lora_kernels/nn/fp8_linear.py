"""FP8 e4m3 (per-output-channel scale) frozen linears and LoRA on top of them.

* :class:`FP8Linear` holds ``weight`` (float8_e4m3fn ``[out, in]``) and ``weight_scale`` (fp32
  ``[out]``) as buffers plus an optional frozen bias; its forward is the fused op with no LoRA
  term (rank 0). Built from an ``nn.Linear`` (:meth:`FP8Linear.from_linear`, per-row absmax /
  448) or from a checkpoint's tensors as serving stacks ship them
  (:meth:`FP8Linear.from_compressed_tensors`: compressed-tensors' ``weight`` float8_e4m3fn
  ``[N, K]`` + ``weight_scale`` ``[N]`` or ``[N, 1]``, channel strategy) or a torchao per-row
  ``Float8Tensor`` weight (:meth:`FP8Linear.from_torchao`).
* :class:`FP8LoRALinear` = an FP8Linear base + trainable ``lora_A`` / ``lora_B`` (PEFT key
  names ``….lora_A.weight``), forward and backward through :func:`lora_linear_fp8`.
* :func:`quantize_linears_fp8` swaps a model's ``nn.Linear`` s for FP8Linear (in place);
  :func:`inject_lora_fp8` then puts LoRA on the matching FP8Linear s.

``act_quant="e4m3_per_token"`` (every constructor and helper here; None by default) also
rounds the activations to e4m3 per token so the base GEMM runs fp8 x fp8 (lora_linear_fp8's
doc: ≈ 2-3 % relative error, opt-in). An FP8LoRALinear inherits its base's setting unless
given its own.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lora_kernels.nn.inject import matches_targets, set_child
from lora_kernels.nn.lora_linear import check_alpha, check_backend, lora_scaling
from lora_kernels.ops.fp8 import (FP8Weight, check_act_quant, check_fp8, from_torchao,
                                  quantize_fp8)
from lora_kernels.ops.lora_linear_fp8 import lora_linear_fp8

__all__ = ["FP8Linear", "FP8LoRALinear", "quantize_linears_fp8", "inject_lora_fp8"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return r


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {p!r}")
    return float(p)


class FP8Linear(nn.Module):
    """A frozen linear layer with an e4m3 weight and one fp32 scale per output channel."""

    def __init__(self, weight: FP8Weight, bias: Optional[Tensor] = None, backend: str = "auto",
                 act_quant: Optional[str] = None):
        super().__init__()
        check_act_quant(act_quant)
        w = check_fp8("weight", weight)
        codes = w.codes if w.codes.dtype == torch.float8_e4m3fn else \
            w.codes.view(torch.float8_e4m3fn)
        self.out_features, self.in_features = codes.shape
        if bias is not None:
            if not isinstance(bias, Tensor) or bias.shape != (self.out_features,):
                raise ValueError(f"bias must be a tensor [{self.out_features}], got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.backend = check_backend(backend)
        self.act_quant = act_quant
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", w.scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto",
                    act_quant: Optional[str] = None) -> "FP8Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_act_quant(act_quant)
        return cls(quantize_fp8(linear.weight), linear.bias, backend, act_quant)

    @classmethod
    def from_compressed_tensors(cls, weight: Tensor, weight_scale: Tensor,
                                bias: Optional[Tensor] = None, backend: str = "auto",
                                act_quant: Optional[str] = None) -> "FP8Linear":
        """compressed-tensors' FP8 channel layout (what vLLM loads): ``weight`` float8_e4m3fn
        ``[N, K]``, ``weight_scale`` ``[N]`` or ``[N, 1]`` (``W = weight·weight_scale``). A
        per-tensor scale (one element) is broadcast to every row."""
        if not isinstance(weight_scale, Tensor):
            raise TypeError("weight_scale must be a tensor [N] or [N, 1]")
        if isinstance(weight, Tensor) and weight.dim() == 2 and weight_scale.numel() == 1:
            weight_scale = weight_scale.reshape(1).expand(weight.shape[0])
        return cls(FP8Weight(codes=weight, scale=weight_scale), bias, backend, act_quant)

    @classmethod
    def from_torchao(cls, linear: nn.Module, backend: str = "auto",
                     act_quant: Optional[str] = None) -> "FP8Linear":
        """A linear whose weight torchao quantized to a per-row ``Float8Tensor``
        (``quantize_(model, Float8WeightOnlyConfig())``), read without importing torchao."""
        if not isinstance(linear, nn.Module) or not hasattr(linear, "weight"):
            raise TypeError(f"linear must be a module with a weight, got {type(linear).__name__}")
        return cls(from_torchao(linear.weight), getattr(linear, "bias", None), backend,
                   act_quant)

    @property
    def fp8_weight(self) -> FP8Weight:
        return FP8Weight(codes=self.weight, scale=self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        no_a = x.new_empty(0, self.in_features)
        no_b = x.new_empty(self.out_features, 0)
        return lora_linear_fp8(x, self.fp8_weight, self.bias, no_a, no_b,
                               training=self.training, backend=self.backend,
                               act_quant=self.act_quant)

    def extra_repr(self) -> str:
        act = f", act_quant={self.act_quant}" if self.act_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel{act}")


class FP8LoRALinear(nn.Module):
    """LoRA over a frozen :class:`FP8Linear`: ``y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ`` in one fused
    pass. A Kaiming-uniform, B zeros (PEFT's init); scaling ``alpha / r`` (``/ sqrt(r)`` with
    rslora)."""

    def __init__(self, base: FP8Linear, r: int, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 backend: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 act_quant: Optional[str] = "inherit"):
        super().__init__()
        if not isinstance(base, FP8Linear):
            raise TypeError(f"base must be an FP8Linear, got {type(base).__name__}")
        self.act_quant = base.act_quant if act_quant == "inherit" else act_quant
        check_act_quant(self.act_quant)
        self.r = _check_rank(r)
        self.scaling = lora_scaling(self.r, check_alpha(lora_alpha), use_rslora)
        self.lora_dropout = _check_dropout(lora_dropout)
        self.backend = base.backend if backend is None else check_backend(backend)
        self.base_layer = base
        dev = base.weight.device
        dtype = dtype or (base.bias.dtype if base.bias is not None else torch.float32)
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        b = self.base_layer
        return lora_linear_fp8(x, b.fp8_weight, b.bias, self.lora_A.weight, self.lora_B.weight,
                               scaling=self.scaling, dropout_p=self.lora_dropout,
                               training=self.training, backend=self.backend,
                               act_quant=self.act_quant)


def quantize_linears_fp8(model: nn.Module, skip: Sequence[str] = (),
                         backend: str = "auto", act_quant: Optional[str] = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`FP8Linear` (in place; returns
    ``model``), except those whose path matches ``skip`` (PEFT's target rule: a list of names
    or suffixes, or a full-match regex string; e.g. ``skip=["lm_head"]``); ``act_quant`` goes
    to every new FP8Linear."""
    _check_model(model)
    check_act_quant(act_quant)
    if not isinstance(skip, (str, list, tuple)):
        raise TypeError(f"skip must be a regex string or a list of module names, got {skip!r}")
    check_backend(backend)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not (skip and matches_targets(n, skip))]
    for name in names:
        lin = model.get_submodule(name)
        new = FP8Linear.from_linear(lin, backend, act_quant)
        if name:
            set_child(model, name, new)
        else:
            raise ValueError("model is itself an nn.Linear: use FP8Linear.from_linear(model)")
    return model


def inject_lora_fp8(model: nn.Module, target_modules, r: int,
                    lora_alpha: Optional[float] = None, lora_dropout: float = 0.0,
                    use_rslora: bool = False, backend: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None,
                    act_quant: Optional[str] = "inherit") -> nn.Module:
    """Wrap every :class:`FP8Linear` whose path matches ``target_modules`` (PEFT's rule) in an
    :class:`FP8LoRALinear` (in place; returns ``model``). ValueError naming ``target_modules``
    when nothing matches. ``act_quant``: each wrapped layer's (default: its base's)."""
    _check_model(model)
    if act_quant != "inherit":
        check_act_quant(act_quant)
    if not isinstance(target_modules, (str, list, tuple)) or not target_modules:
        raise TypeError(f"target_modules must be a regex string or a non-empty list of names, "
                        f"got {target_modules!r}")
    names = [n for n, m in model.named_modules()
             if isinstance(m, FP8Linear) and n and matches_targets(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no FP8Linear in the model")
    for name in names:
        set_child(model, name, FP8LoRALinear(model.get_submodule(name), r, lora_alpha,
                                             lora_dropout, use_rslora, backend, dtype,
                                             act_quant))
    return model
