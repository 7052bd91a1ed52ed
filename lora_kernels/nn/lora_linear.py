"""Single-adapter LoRA layers: ``LoRALinear`` (drop-in ``nn.Linear``) and ``PackedLoRALinear``
(a packed projection such as GPT-2 ``c_attn`` with LoRA on some output slices only)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.ops import block_diag_lora_b, dora_linear, lora_linear
from lora_kernels.ops.dora import row_sq_norm, weight_norm
from lora_kernels.ops.backend import BACKENDS


def lora_scaling(r: int, lora_alpha: Optional[float], use_rslora: bool) -> float:
    """``alpha / r`` (paper, PEFT) or ``alpha / sqrt(r)`` (rsLoRA); alpha defaults to r."""
    alpha = float(r if lora_alpha is None else lora_alpha)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return r


def check_features(name: str, v) -> int:
    """A layer width: a non-negative int (0 is allowed, as in nn.Linear)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return int(v)


def check_alpha(alpha) -> Optional[float]:
    """None (= r) or a finite real number; "8" or NaN would give a silently wrong scaling."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a number or None, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be finite, got {alpha!r}")
    return float(alpha)


def check_backend(backend) -> str:
    """Names only: availability depends on the device, which may change after construction."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {p!r}")
    return float(p)


class LoRABase(nn.Module):
    """Shared state of the single-adapter layers: frozen base weight, A/B, merge bookkeeping.

    ``weight`` is stored ``[out, in]`` like ``nn.Linear``, or ``[in, out]`` for a transformers
    ``Conv1D`` (``fan_in_fan_out=True``); the kernels read either layout through strides.
    """

    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def _init_lora(self, in_features, out_features, r_total, b_rows, lora_alpha, r,
                   lora_dropout, use_rslora, backend, fan_in_fan_out, factory):
        lora_alpha = check_alpha(lora_alpha)
        self.lora_dropout = _check_dropout(lora_dropout)
        self.backend = check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.merged = False
        # nn.Linear submodules so the state-dict keys are PEFT's: "<name>.lora_A.weight".
        self.lora_A = nn.Linear(in_features, r_total, bias=False, **factory)
        self.lora_B = nn.Linear(r, b_rows, bias=False, **factory)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as loralib and PEFT), B zero: training starts at the base model."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base_weight(self) -> Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D layouts)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _lora_b_full(self) -> Tensor:
        return self.lora_B.weight

    def delta_weight(self) -> Tensor:
        """``s·B·A`` as ``[out, in]`` in fp32 (for merge/unmerge)."""
        b = self._lora_b_full().float()
        return (b @ self.lora_A.weight.float()) * self.scaling

    use_dora = False  # LoRALinear(use_dora=True) sets it on the instance

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s·B·A`` into the base weight: the forward becomes exactly a plain linear.
        DoRA (as PEFT): ``W ← (m / ‖W0 + s·B·A‖)_n · (W0 + s·B·A)``, the norm kept for unmerge."""
        if not self.merged:
            if self.use_dora:
                self._merge_dora()
            else:
                self._add_delta(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """DoRA: ``W0 = W / (m / norm)_n − s·B·A`` with the norm saved by merge (PEFT's way)."""
        if self.merged:
            if self.use_dora:
                self._unmerge_dora()
            else:
                self._add_delta(-1.0)
            self.merged = False

    def _dora_parts(self, norm: Tensor):
        """``(factor, delta)`` in the stored weight's layout, at least fp32 (float64 stays)."""
        w = self.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        factor = self.dora_magnitude().detach().to(acc) / norm.to(acc)
        delta = (self._lora_b_full().to(acc) @ self.lora_A.weight.to(acc)) * self.scaling
        if self.fan_in_fan_out:
            return factor[None, :], delta.t()
        return factor[:, None], delta

    def _merge_dora(self) -> None:
        norm = self.dora_weight_norm()
        w = self.weight  # stored layout; the factor follows it
        factor, delta = self._dora_parts(norm)
        w.copy_((factor * (w.to(delta.dtype) + delta)).to(w.dtype))
        self.__dict__["_merged_dora_norm"] = norm

    def _unmerge_dora(self) -> None:
        norm = self.__dict__.pop("_merged_dora_norm")
        w = self.weight
        factor, delta = self._dora_parts(norm)
        w.copy_((w.to(delta.dtype) / factor - delta).to(w.dtype))

    def _init_dora(self) -> None:
        """PEFT's ``lora_magnitude_vector`` ``[out]``, initialised to ``‖W0 + s·B·A‖`` per row
        (B = 0 at init: the base row norms), so training starts at the base model."""
        self.use_dora = True
        w = self.base_weight()
        norm = weight_norm(w, self.lora_A.weight, self._lora_b_full(), self.scaling)
        rows = self._magnitude_rows()
        rows = rows.to(norm.device) if isinstance(rows, Tensor) else rows
        self.lora_magnitude_vector = nn.Parameter(norm[rows].to(w.dtype))

    def _magnitude_rows(self):
        """Which output rows own a trainable magnitude: all of them here."""
        return slice(None)

    def dora_magnitude(self) -> Tensor:
        """The magnitude of every output row, ``[out]`` (differentiable)."""
        return self.lora_magnitude_vector

    def dora_weight_norm(self) -> Tensor:
        """``‖W0_n + s·(B·A)_n‖`` (fp32, detached) of the unmerged weight, without an N×K
        temporary."""
        return weight_norm(self.base_weight(), self.lora_A.weight, self._lora_b_full(),
                           self.scaling, weight_sq_norm=self._base_sq_norm())

    def _cached_dora_norm(self) -> Optional[Tensor]:
        """:meth:`dora_weight_norm`, reused while W0, A, B (storage and version counters) and the
        scaling are unchanged: inference pays no ``W0·Aᵀ`` pass over W0 per call (as much traffic
        as the base GEMM at decode sizes). Only when autograd does not reach W0, A or B: a training
        step computes it afresh (one ``W0·Aᵀ`` GEMM), because optimizers that write through
        ``.data`` bypass version counters. None under torch.compile (computed in the graph)."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                t.requires_grad for t in (self.weight, self.lora_A.weight, self.lora_B.weight))):
            return None
        key = tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype)
                    for t in (self.weight, self.lora_A.weight, self.lora_B.weight))
        key += (self.scaling, self.weight.device, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_dora_norm_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.dora_weight_norm())
            self.__dict__["_dora_norm_cache"] = cached
        return cached[1]

    def _base_sq_norm(self) -> Optional[Tensor]:
        """``‖W0_n‖²``, cached per frozen weight (keyed by its storage and version counter, so
        an in-place update recomputes it); None under torch.compile (computed in the graph)."""
        if torch.compiler.is_compiling():
            return None
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device,
               tuple(w.shape))
        cached = self.__dict__.get("_sq_norm_cache")
        if cached is None or cached[0] != key:
            cached = (key, row_sq_norm(self.base_weight()))
            self.__dict__["_sq_norm_cache"] = cached
        return cached[1]

    def _add_delta(self, sign: float) -> None:
        delta = self.delta_weight()
        w = self.base_weight()
        w.copy_((w.float() + sign * delta).to(w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_weight()
        if self.merged:
            return F.linear(x, w, self.bias)
        if self.use_dora:
            return dora_linear(x, w, self.bias, self.lora_A.weight, self._lora_b_full(),
                               self.dora_magnitude(), scaling=self.scaling,
                               dropout_p=self.lora_dropout, training=self.training,
                               backend=self.backend, weight_sq_norm=self._base_sq_norm(),
                               dora_norm=self._cached_dora_norm())
        return lora_linear(x, w, self.bias, self.lora_A.weight, self._lora_b_full(),
                           scaling=self.scaling, dropout_p=self.lora_dropout,
                           training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, merged={self.merged}, "
                f"backend={self.backend!r}" + (", use_dora=True" if self.use_dora else ""))


class LoRALinear(LoRABase):
    """``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with the fused op; usable wherever ``nn.Linear`` is.

    ``.weight``/``.bias`` are the frozen base parameters; ``lora_A.weight [r, in]`` and
    ``lora_B.weight [out, r]`` are the trainable factors (PEFT key names). ``use_dora=True``:
    DoRA (PEFT semantics, :func:`lora_kernels.dora_linear`) with the trainable magnitude
    ``lora_magnitude_vector [out]``.
    """

    def __init__(self, in_features: int, out_features: int, r: int,
                 lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, bias: bool = True,
                 use_rslora: bool = False, backend: str = "auto", device=None, dtype=None,
                 fan_in_fan_out: bool = False, use_dora: bool = False):
        super().__init__()
        r = _check_rank(r)
        use_dora = _check_use_dora(use_dora)
        in_features = check_features("in_features", in_features)
        out_features = check_features("out_features", out_features)
        check_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) \
            if bias else None
        self._init_lora(in_features, out_features, r, out_features, lora_alpha, r, lora_dropout,
                        use_rslora, backend, fan_in_fan_out, factory)
        self._reset_base()
        if use_dora:
            self._init_dora()

    @torch.no_grad()
    def _reset_base(self) -> None:
        ref = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.base_weight().copy_(ref.weight)
        if self.bias is not None:
            self.bias.copy_(ref.bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, lora_alpha: Optional[float] = None,
                    lora_dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto",
                    fan_in_fan_out: Optional[bool] = None, use_dora: bool = False) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` (or transformers ``Conv1D``) sharing its frozen weight
        and bias — the same Parameter objects, no copy."""
        use_dora = _check_use_dora(use_dora)
        weight, in_f, out_f, fan_in_fan_out = linear_dims(linear, "linear", fan_in_fan_out)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = weight
        self.bias = getattr(linear, "bias", None)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self._init_lora(int(in_f), int(out_f), _check_rank(r), int(out_f), lora_alpha, r,
                        lora_dropout, use_rslora, backend, fan_in_fan_out, factory)
        if use_dora:
            self._init_dora()
        freeze(weight, self.bias)  # last: a rejected call leaves the wrapped layer as it was
        return self


def _check_use_dora(use_dora) -> bool:
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
    return use_dora


class PackedLoRALinear(LoRABase):
    """A packed projection (GPT-2 ``c_attn``, fused qkv/gate_up) with LoRA on some slices only,
    like loralib's ``MergedLinear(enable_lora=[True, False, True])``.

    ``lora_A.weight [n_adapted·r, in]`` (one block per adapted slice), ``lora_B.weight
    [sum of adapted widths, r]``. The forward is one fused ``lora_linear`` with a block-diagonal
    B, so a column's low-rank term only sees its own slice's ranks; the x-side work (x·Aᵀ) is done
    for adapted slices only. ``use_dora=True``: DoRA on each adapted slice (its rows' norms only
    see its own B block), ``lora_magnitude_vector [sum of adapted widths]``; the other slices stay
    the base layer (c = 1, see :meth:`dora_magnitude`).
    """

    def __init__(self, in_features: int, out_slices: Sequence[int], r: int,
                 enable_lora: Sequence[bool], lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 backend: str = "auto", device=None, dtype=None, fan_in_fan_out: bool = False,
                 use_dora: bool = False):
        super().__init__()
        use_dora = _check_use_dora(use_dora)
        in_features = check_features("in_features", in_features)
        check_dtype(dtype)
        out_features = self._set_slices(out_slices, enable_lora)
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) \
            if bias else None
        r = _check_rank(r)
        self._init_lora(in_features, out_features, self.n_adapted * r, self.adapted_width,
                        lora_alpha, r, lora_dropout, use_rslora, backend, fan_in_fan_out, factory)
        LoRALinear._reset_base(self)
        if use_dora:
            self._init_dora()

    def _set_slices(self, out_slices, enable_lora) -> int:
        try:  # 2.5 or "3" is a mistake, not a width to truncate
            self.out_slices = tuple(operator.index(w) for w in out_slices)
            self.enable_lora = tuple(bool(e) for e in enable_lora)
        except TypeError as exc:
            raise TypeError(f"out_slices must be int widths and enable_lora bools, got "
                            f"{out_slices!r} and {enable_lora!r} ({exc})") from None
        if len(self.out_slices) != len(self.enable_lora) or not self.out_slices or \
                any(w <= 0 for w in self.out_slices):
            raise ValueError(f"out_slices {list(out_slices)} and enable_lora {list(enable_lora)} "
                             f"must be non-empty, positive and of equal length")
        self.n_adapted = sum(self.enable_lora)
        if self.n_adapted == 0:
            raise ValueError("enable_lora must enable at least one slice")
        self.adapted_width = sum(w for w, e in zip(self.out_slices, self.enable_lora) if e)
        return sum(self.out_slices)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, enable_lora: Sequence[bool],
                    out_slices: Optional[Sequence[int]] = None, lora_alpha: Optional[float] = None,
                    lora_dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto",
                    fan_in_fan_out: Optional[bool] = None,
                    use_dora: bool = False) -> "PackedLoRALinear":
        """Wrap a packed ``nn.Linear``/``Conv1D`` (shared weight). ``out_slices`` defaults to
        equal slices, one per ``enable_lora`` entry (loralib's convention)."""
        use_dora = _check_use_dora(use_dora)
        weight, in_f, out_f, fan_in_fan_out = linear_dims(linear, "linear", fan_in_fan_out)
        if out_slices is None:
            n = len(enable_lora)
            if n == 0 or out_f % n:
                raise ValueError(f"out_features={out_f} does not split into {n} equal slices; "
                                 f"pass out_slices")
            out_slices = [out_f // n] * n
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if self._set_slices(out_slices, enable_lora) != out_f:
            raise ValueError(f"out_slices {list(out_slices)} must sum to out_features={out_f}")
        self.weight, self.bias = weight, getattr(linear, "bias", None)
        r = _check_rank(r)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self._init_lora(int(in_f), int(out_f), self.n_adapted * r, self.adapted_width, lora_alpha,
                        r, lora_dropout, use_rslora, backend, fan_in_fan_out, factory)
        if use_dora:
            self._init_dora()
        freeze(weight, self.bias)  # last: a rejected call leaves the wrapped layer as it was
        return self

    def _magnitude_rows(self) -> Tensor:
        """DoRA per slice: adapted slices' rows own a trainable magnitude
        (``lora_magnitude_vector [adapted width]``); the others are plain linear (c = 1)."""
        return torch.cat([torch.full((w,), bool(e)) for w, e in zip(self.out_slices,
                                                                   self.enable_lora)])

    def dora_magnitude(self) -> Tensor:
        """``[out]``: the trainable magnitudes on adapted slices, ``‖W0_n‖`` (frozen) on the
        others. Their B rows are zero, so the op's norm there is exactly ``‖W0_n‖`` (the same
        fp32 ``sqrt`` of the same cached ``‖W0_n‖²``) and ``c = 1`` exactly: the unadapted slices
        stay the base layer. (A zero row of W0 there gives 0/0, as it would in PEFT's DoRA.)"""
        m = self.lora_magnitude_vector
        acc = torch.promote_types(m.dtype, torch.float32)
        sq = self._base_sq_norm()
        if sq is None:
            sq = row_sq_norm(self.base_weight())
        frozen = sq.to(acc).clamp_min(0.0).sqrt()
        parts, row, col = [], 0, 0
        for width, adapted in zip(self.out_slices, self.enable_lora):
            parts.append(m[row:row + width].to(acc) if adapted else frozen[col:col + width])
            row += width if adapted else 0
            col += width
        return torch.cat(parts)

    def _lora_b_full(self) -> Tensor:
        b = self.lora_B.weight
        # Training rebuilds it every call so gradients reach lora_B; inference reuses the last
        # block-diagonal matrix until lora_B changes (its storage or version counter).
        cacheable = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and
                                                               b.requires_grad)
        key = (b.data_ptr(), None if b.is_inference() else b._version, b.dtype) if cacheable else None
        cached = self.__dict__.get("_b_full_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        blocks, row = [], 0
        for width, adapted in zip(self.out_slices, self.enable_lora):
            blocks.append(b[row:row + width] if adapted else None)
            row += width if adapted else 0
        full = block_diag_lora_b(blocks, self.out_slices)
        if key is not None:
            self.__dict__["_b_full_cache"] = (key, full.detach())
        return full

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_slices={self.out_slices}, enable_lora={self.enable_lora}"


def freeze(*params) -> None:
    for p in params:
        if p is not None:
            p.requires_grad_(False)


def linear_dims(linear: nn.Module, name: str, fan_in_fan_out: Optional[bool] = None):
    """``(weight, in_features, out_features, fan_in_fan_out)`` of an ``nn.Linear`` or a
    transformers ``Conv1D`` (weight ``[in, out]``); TypeError naming ``name`` otherwise."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"{name} must be an nn.Linear or transformers Conv1D, got "
                        f"{type(linear).__name__}")
    if fan_in_fan_out is None:
        fan_in_fan_out = is_conv1d(linear)
    in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
    return weight, int(in_f), int(out_f), bool(fan_in_fan_out)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear with weight ``[in, out]``. Detected by shape,
    so nothing here imports transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
