"""The bad-input matrix: every public entry × every class of misuse, in one table.

Each row builds fresh, valid inputs, spoils one thing, and checks that the call raises the
contract's exception (``ValueError``/``TypeError``; ``KeyError`` for an unknown adapter name,
``BackendUnavailableError`` for a backend that cannot run here), that the message names the
argument (and, for shape errors, the expected shape), and that nothing changed: every tensor,
module, pool and adapter file the call could touch is snapshotted before and compared after.

Rows whose entry is not importable yet skip with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

import lora_kernels as lk
from helpers import randn, triton_device

META = "meta"  # a second device every machine has: mixed-device misuse without a GPU


# ------------------------------------------------------------------------------------------
# Snapshots: "no state changes after a rejected call"
# ------------------------------------------------------------------------------------------
_SIMPLE = (bool, int, float, str, type(None))


def snapshot(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        data = None if obj.device.type == META else obj.detach().clone()
        return ("tensor", obj.dtype, tuple(obj.shape), str(obj.device), obj.requires_grad, data)
    if isinstance(obj, lk.LoRABatch):
        return ("batch", snapshot(list(obj.tensors())), obj.host_ints())
    if isinstance(obj, nn.Module):
        mods = []
        for name, m in obj.named_modules():
            attrs = {k: (v if isinstance(v, _SIMPLE) else id(v)) for k, v in vars(m).items()
                     if not k.startswith("_") or k == "_lora_kernels_patch"}
            mods.append((name, type(m).__name__, sorted(vars(m)), attrs))
        params = [(n, p.requires_grad) for n, p in obj.named_parameters()]
        return ("module", mods, params, snapshot(dict(obj.state_dict(keep_vars=True))))
    if type(obj).__name__ == "AdapterPool":
        slots = [(s.name, s.version, s.state, s.pins) for s in obj._slots]
        return ("pool", obj.resident(), obj.registered(), slots, len(obj._outstanding),
                snapshot(obj.model))
    if isinstance(obj, Path):
        return ("path", sorted((str(p.relative_to(obj)), p.read_bytes()) for p in obj.rglob("*")
                               if p.is_file()) if obj.is_dir() else None)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [snapshot(v) for v in obj]
    return ("other", repr(obj) if isinstance(obj, _SIMPLE) else id(obj))


def assert_same(a, b, where="") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a.nan_to_num(0.0) if a.is_floating_point() else a,
                           b.nan_to_num(0.0) if b.is_floating_point() else b) and \
            torch.equal(a.isnan() if a.is_floating_point() else a,
                        b.isnan() if b.is_floating_point() else b), f"{where}: values changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} -> {b!r}"


# ------------------------------------------------------------------------------------------
# Valid inputs for every entry (small; built fresh for each row)
# ------------------------------------------------------------------------------------------
K, N, R, S, T = 8, 6, 4, 3, 5
IDS = [0, -1, 2, 2, -1]


def single_kw():
    return dict(x=randn(T, K), weight=randn(N, K), bias=randn(N), lora_a=randn(R, K), lora_b=randn(N, R))


def batch(ids=IDS, slots=S):
    return lk.LoRABatch.from_adapter_ids(torch.tensor(ids), slots)


def multi_kw():
    return dict(x=randn(T, K), weight=randn(N, K), bias=randn(N), lora_a=randn(S, R, K),
                lora_b=randn(S, N, R), batch=batch(), scalings=torch.ones(S),
                ranks=torch.tensor([4, 1, 3]))


def shrink_kw():
    return dict(x=randn(T, K), lora_a=randn(S, R, K), batch=batch(), scalings=torch.ones(S))


def expand_kw():
    return dict(y=randn(T, N), xa=randn(T, R), lora_b=randn(S, N, R), batch=batch())


# ------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    entry: str
    misuse: str
    build: Callable  # (tmp_path) -> (call, watched)
    exc: type
    needle: str      # regex the message must match: the argument's name (and shape)
    marks: list = field(default_factory=list)

    def param(self):
        return pytest.param(self, id=f"{self.entry}|{self.misuse}", marks=self.marks)


def op(entry, fn, good, misuse, change, exc, needle, marks=()):
    """A functional-op row: ``change`` maps argument names to bad values (or callables of the
    good kwargs); every input is watched."""
    def build(_tmp):
        kw = good()
        for k, v in change.items():
            kw[k] = v(kw) if callable(v) and not isinstance(v, (Tensor, type)) else v
        return (lambda: fn(**kw)), kw
    return Row(entry, misuse, build, exc, needle, list(marks))


def _interp_only():
    return [] if triton_device() == "cpu" else [pytest.mark.skip(reason="needs the Triton interpreter")]


ROWS: list[Row] = []
LL = lk.lora_linear
ROWS += [op("lora_linear", LL, single_kw, m, c, e, n) for m, c, e, n in [
    ("x 0-D", {"x": torch.tensor(1.0)}, ValueError, r"x.*\[\.\.\., K\]"),
    ("x not a tensor", {"x": [[1.0] * K]}, TypeError, "x must be a torch.Tensor"),
    ("weight 3-D", {"weight": randn(N, K, 1)}, ValueError, "weight must be 2-D"),
    ("weight 1-D", {"weight": randn(K)}, ValueError, "weight must be 2-D"),
    ("lora_a 1-D", {"lora_a": randn(K)}, ValueError, "lora_a must be 2-D"),
    ("lora_b 3-D", {"lora_b": randn(N, R, 1)}, ValueError, "lora_b must be 2-D"),
    ("bias 2-D", {"bias": randn(N, 1)}, ValueError, "bias must be 1-D"),
    ("K of x", {"x": randn(T, K + 1)}, ValueError, r"x must have shape \[\.\.\., K\]"),
    ("K of lora_a", {"lora_a": randn(R, K - 1)}, ValueError, r"lora_a must have shape \[r, K\]"),
    ("N of lora_b", {"lora_b": randn(N + 1, R)}, ValueError, r"lora_b must have shape \[N, r\]"),
    ("N of bias", {"bias": randn(N - 1)}, ValueError, r"bias must have shape \[N\]"),
    ("r of lora_b", {"lora_b": randn(N, R + 1)}, ValueError, r"lora_b must have shape \[N, r\] = \[6, 4\]"),
    ("x int64", {"x": torch.ones(T, K, dtype=torch.int64)}, TypeError, "x must be float"),
    ("x complex", {"x": torch.ones(T, K, dtype=torch.complex64)}, TypeError, "x must be float"),
    ("x bool", {"x": torch.ones(T, K, dtype=torch.bool)}, TypeError, "x must be float"),
    ("weight dtype != x", {"weight": randn(N, K, dtype=torch.float16)}, TypeError, "x and weight must share a dtype"),
    ("lora_a int32", {"lora_a": torch.ones(R, K, dtype=torch.int32)}, TypeError, "lora_a must be float"),
    ("bias int64", {"bias": torch.ones(N, dtype=torch.int64)}, TypeError, "bias must be float"),
    ("weight None", {"weight": None}, TypeError, "weight must be a torch.Tensor"),
    ("lora_b on meta", {"lora_b": randn(N, R).to(META)}, ValueError, "lora_b is on meta"),
    ("bias on meta", {"bias": randn(N).to(META)}, ValueError, "bias is on meta"),
    ("weight on meta", {"weight": randn(N, K).to(META)}, ValueError, "weight is on meta"),
    ("scaling str", {"scaling": "2"}, TypeError, "scaling"),
    ("scaling None", {"scaling": None}, TypeError, "scaling"),
    ("scaling complex", {"scaling": 1j}, TypeError, "scaling"),
    ("scaling tensor with grad", {"scaling": torch.tensor(1.0, requires_grad=True)}, TypeError, "scaling"),
    ("scaling nan", {"scaling": float("nan")}, ValueError, "scaling must be finite"),
    ("scaling inf", {"scaling": float("inf")}, ValueError, "scaling must be finite"),
    ("dropout_p 1.0", {"dropout_p": 1.0}, ValueError, "dropout_p"),
    ("dropout_p negative", {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ("dropout_p str", {"dropout_p": "0.1"}, TypeError, "dropout_p"),
    ("training str", {"training": "yes"}, TypeError, "training"),
    ("dropout_seed str", {"dropout_p": 0.1, "dropout_seed": "7"}, TypeError, "dropout_seed"),
    ("dropout_seed float", {"dropout_p": 0.1, "dropout_seed": 1.5}, TypeError, "dropout_seed"),
    ("dropout_seed > int64", {"dropout_p": 0.1, "dropout_seed": 2**64}, ValueError, "dropout_seed"),
    ("backend unknown", {"backend": "fastest"}, ValueError, "backend must be one of"),
    ("backend None", {"backend": None}, ValueError, "backend must be one of"),
    ("backend cuda on CPU", {"backend": "cuda"}, lk.BackendUnavailableError, "CUDA"),
]]
ROWS.append(op("lora_linear", LL, lambda: {k: v.double() for k, v in single_kw().items()},
               "float64 on triton", {"backend": "triton"}, TypeError, "float64", _interp_only()))

DL = lk.dora_linear


def dora_kw():
    return {**single_kw(), "magnitude": randn(N).abs() + 0.5}


ROWS += [op("dora_linear", DL, dora_kw, m, c, e, n) for m, c, e, n in [
    ("magnitude missing N", {"magnitude": randn(N - 1)}, ValueError, r"magnitude must have shape \[N\]"),
    ("magnitude 2-D", {"magnitude": randn(1, N)}, ValueError, "magnitude must be 1-D"),
    ("magnitude a list", {"magnitude": [1.0] * N}, TypeError, "magnitude must be a torch.Tensor"),
    ("magnitude int64", {"magnitude": torch.ones(N, dtype=torch.int64)}, TypeError, "magnitude must be float"),
    ("magnitude on meta", {"magnitude": randn(N).to(META)}, ValueError, "magnitude is on meta"),
    ("weight_sq_norm of N+1", {"weight_sq_norm": randn(N + 1)}, ValueError, "weight_sq_norm must have shape"),
    ("dora_norm 2-D", {"dora_norm": randn(N, 1)}, ValueError, "dora_norm must be 1-D"),
    ("K of lora_a", {"lora_a": randn(R, K - 1)}, ValueError, r"lora_a must have shape \[r, K\]"),
    ("weight dtype != x", {"weight": randn(N, K, dtype=torch.float16)}, TypeError, "x and weight must share a dtype"),
    ("dropout_p 1.0", {"dropout_p": 1.0}, ValueError, "dropout_p"),
    ("training str", {"training": "yes"}, TypeError, "training"),
    ("backend unknown", {"backend": "fastest"}, ValueError, "backend must be one of"),
]]
ML = lk.multi_lora_linear
ROWS += [op("multi_lora_linear", ML, multi_kw, m, c, e, n) for m, c, e, n in [
    ("x 0-D", {"x": torch.tensor(1.0)}, ValueError, r"x.*\[T, K\]"),
    ("x int64", {"x": torch.ones(T, K, dtype=torch.int64)}, TypeError, "x must be float"),
    ("weight 3-D", {"weight": randn(N, K, 1)}, ValueError, "weight must be 2-D"),
    ("lora_a 2-D", {"lora_a": randn(R, K)}, ValueError, "lora_a must be 3-D"),
    ("lora_b 2-D", {"lora_b": randn(N, R)}, ValueError, "lora_b must be 3-D"),
    ("K of x", {"x": randn(T, K + 1)}, ValueError, r"x must have shape \[T, K\]"),
    ("K of lora_a", {"lora_a": randn(S, R, K + 1)}, ValueError, r"lora_a must have shape \[S, n_slices·r_max, K\]"),
    ("N of lora_b", {"lora_b": randn(S, N + 1, R)}, ValueError, r"lora_b must have shape \[S, N, r_max\]"),
    ("r_max of lora_a", {"lora_a": randn(S, R + 1, K)}, ValueError, r"lora_a must have shape \[S, n_slices·r_max, K\]"),
    ("S of lora_b", {"lora_b": randn(S + 1, N, R)}, ValueError, r"lora_a must have shape|num_slots"),
    ("N of bias", {"bias": randn(N + 1)}, ValueError, r"bias must have shape \[N\]"),
    ("dropout_p one per slot", {"dropout_p": [0.1] * (S + 1)}, ValueError, "dropout_p must hold one"),
    ("dropout_p 1.0", {"dropout_p": 1.0}, ValueError, r"dropout_p\[0\] must be in \[0, 1\)"),
    ("dropout_p on a device", {"dropout_p": torch.zeros(S, device=META)}, ValueError,
     "dropout_p must be host values"),
    ("training not a bool", {"dropout_p": 0.1, "training": 1}, TypeError, "training must be a bool"),
    ("dropout_seed a float", {"dropout_p": 0.1, "dropout_seed": 1.5}, TypeError, "dropout_seed"),
    ("weight dtype != x", {"weight": randn(N, K, dtype=torch.bfloat16)}, TypeError, "x and weight must share a dtype"),
    ("lora_b on meta", {"lora_b": randn(S, N, R).to(META)}, ValueError, "lora_b is on meta"),
    ("batch not a LoRABatch", {"batch": torch.tensor(IDS)}, TypeError, "batch must be a LoRABatch"),
    ("batch for other T", {"batch": lambda kw: batch(IDS + [0])}, ValueError, "batch describes 6 tokens but x has T=5"),
    ("batch for other S", {"batch": lambda kw: batch(IDS, S + 1)}, ValueError, "num_slots=4 but the adapter stack has S=3"),
    ("batch on meta", {"batch": lambda kw: batch().to(META)}, ValueError, "batch is on meta"),
    ("scalings too short", {"scalings": torch.ones(S - 1)}, ValueError, r"scalings must have shape \[S\] = \[3\]"),
    ("scalings 2-D", {"scalings": torch.ones(S, 1)}, ValueError, r"scalings must have shape \[S\]"),
    ("scalings str", {"scalings": "fast"}, TypeError, "scalings"),
    ("scalings None", {"scalings": None}, TypeError, "scalings"),
    ("scalings bool", {"scalings": torch.ones(S, dtype=torch.bool)}, TypeError, "scalings"),
    ("scalings complex", {"scalings": torch.ones(S, dtype=torch.complex64)}, TypeError, "scalings"),
    ("ranks > r_max", {"ranks": torch.tensor([4, 5, 1])}, ValueError, r"ranks must lie in \[0, r_max=4\]"),
    ("ranks negative", {"ranks": torch.tensor([4, -1, 1])}, ValueError, r"ranks must lie in \[0, r_max=4\]"),
    ("ranks float", {"ranks": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "ranks must be an integer"),
    ("ranks bool", {"ranks": torch.ones(S, dtype=torch.bool)}, TypeError, "ranks must be an integer"),
    ("ranks wrong shape", {"ranks": torch.tensor([1, 2])}, ValueError, r"ranks must have shape \[S\]"),
    ("out_slices wrong sum", {"out_slices": (2, 3)}, ValueError, "out_slices must be positive widths summing to N=6"),
    ("out_slices zero width", {"out_slices": (6, 0)}, ValueError, "out_slices"),
    ("out_slices float widths", {"out_slices": (2.5, 3.5)}, TypeError, "out_slices"),
    ("out_slices str", {"out_slices": "ab"}, TypeError, "out_slices"),
    ("out_slices int", {"out_slices": 6}, TypeError, "out_slices"),
    ("backend unknown", {"backend": "fastest"}, ValueError, "backend must be one of"),
]]


def _ranks_mutated_in_inference_mode(_tmp):
    kw = multi_kw()

    def call():
        with torch.inference_mode():
            ranks = torch.tensor([4, 1, 3])
            ML(**{**kw, "ranks": ranks})  # validated and cached
            ranks[1] = 9                  # no version counter in inference mode
            ML(**{**kw, "ranks": ranks})
    return call, kw


ROWS.append(Row("multi_lora_linear", "ranks mutated in inference_mode", _ranks_mutated_in_inference_mode,
                ValueError, r"ranks must lie in \[0, r_max=4\], found 9"))

SH, EX = lk.lora_shrink, lk.lora_expand
ROWS += [op("lora_shrink", SH, shrink_kw, m, c, e, n) for m, c, e, n in [
    ("x 3-D", {"x": randn(1, T, K)}, ValueError, "x must be 2-D"),
    ("x int64", {"x": torch.ones(T, K, dtype=torch.int64)}, TypeError, "x must be float"),
    ("lora_a 2-D", {"lora_a": randn(R, K)}, ValueError, "lora_a must be 3-D"),
    ("K of x", {"x": randn(T, K - 1)}, ValueError, r"x must have shape \[T, K\]"),
    ("n_slices 0", {"n_slices": 0}, ValueError, "n_slices must be a positive int"),
    ("n_slices bool", {"n_slices": True}, ValueError, "n_slices"),
    ("n_slices not dividing", {"n_slices": 3}, ValueError, "n_slices must be a positive int dividing"),
    ("batch for other T", {"batch": lambda kw: batch(IDS[:-1])}, ValueError, "T=5"),
    ("scalings too long", {"scalings": torch.ones(S + 1)}, ValueError, r"scalings must have shape \[S\]"),
    ("ranks > r_max", {"ranks": torch.tensor([5, 1, 1])}, ValueError, r"ranks must lie in \[0, r_max=4\]"),
    ("lora_a on meta", {"lora_a": randn(S, R, K).to(META)}, ValueError, "lora_a is on meta"),
]]
ROWS.append(op("lora_shrink", SH, lambda: {**shrink_kw(), "x": randn(T, K).double()},
               "float64 on triton", {"backend": "triton"}, TypeError, "float64", _interp_only()))
ROWS += [op("lora_expand", EX, expand_kw, m, c, e, n) for m, c, e, n in [
    ("y 1-D", {"y": randn(N)}, ValueError, "y must be 2-D"),
    ("y int64", {"y": torch.zeros(T, N, dtype=torch.int64)}, TypeError, "y must be float"),
    ("xa int64", {"xa": torch.zeros(T, R, dtype=torch.int64)}, TypeError, "xa must be float"),
    ("xa wrong width", {"xa": randn(T, R + 1)}, ValueError, r"xa must have shape \[T, n_slices·r_max\]"),
    ("lora_b 2-D", {"lora_b": randn(N, R)}, ValueError, "lora_b must be 3-D"),
    ("N of y", {"y": randn(T, N + 1)}, ValueError, r"y must have shape \[T, N\]"),
    ("y non-contiguous", {"y": randn(N, T).t()}, ValueError, "y must be contiguous"),
    ("ranks > r_max", {"ranks": torch.tensor([1, 1, 7])}, ValueError, r"ranks must lie in \[0, r_max=4\]"),
    ("out_slices wrong sum", {"out_slices": (1, 2)}, ValueError, "out_slices"),
    ("xa on meta", {"xa": randn(T, R).to(META)}, ValueError, "xa is on meta"),
    ("batch for other S", {"batch": lambda kw: batch(IDS, S + 2)}, ValueError, "num_slots=5"),
]]

FA, FS = lk.LoRABatch.from_adapter_ids, lk.LoRABatch.from_sample_ids
ROWS += [op("LoRABatch.from_adapter_ids", FA, lambda: dict(adapter_ids=torch.tensor(IDS), num_slots=S),
            m, c, e, n) for m, c, e, n in [
    ("ids float tensor", {"adapter_ids": torch.tensor([0.0, 1.0])}, TypeError, "adapter_ids must be an integer"),
    ("ids float list", {"adapter_ids": [0.5, 1]}, TypeError, "adapter_ids must be an integer"),
    ("ids bool", {"adapter_ids": torch.tensor([True])}, TypeError, "adapter_ids must be an integer"),
    ("ids 2-D", {"adapter_ids": torch.tensor([[0, 1]])}, ValueError, r"adapter_ids must be 1-D \[T\]"),
    ("ids 0-D", {"adapter_ids": torch.tensor(0)}, ValueError, r"adapter_ids must be 1-D \[T\]"),
    ("id >= num_slots", {"adapter_ids": torch.tensor([0, 3])}, ValueError, r"adapter_ids must lie in \[-1, num_slots=3\)"),
    ("id < -1", {"adapter_ids": torch.tensor([0, -2])}, ValueError, r"adapter_ids must lie in \[-1"),
    ("id huge", {"adapter_ids": torch.tensor([2**40])}, ValueError, r"adapter_ids must lie in"),
    ("ids strings", {"adapter_ids": ["a"]}, TypeError, "adapter_ids"),
    ("ids None", {"adapter_ids": None}, TypeError, "adapter_ids"),
    ("num_slots negative", {"num_slots": -1}, TypeError, "num_slots"),
    ("num_slots float", {"num_slots": 2.0}, TypeError, "num_slots"),
    ("num_slots bool", {"num_slots": True}, TypeError, "num_slots"),
]]
ROWS += [op("LoRABatch.from_sample_ids", FS,
            lambda: dict(sample_ids=torch.tensor([0, -1]), tokens_per_sample=3, num_slots=S),
            m, c, e, n) for m, c, e, n in [
    ("sample_ids 2-D", {"sample_ids": torch.tensor([[0, 1]])}, ValueError, "sample_ids must be 1-D"),
    ("sample_ids float", {"sample_ids": torch.tensor([0.0])}, TypeError, "adapter_ids must be an integer"),
    ("tokens_per_sample negative", {"tokens_per_sample": -1}, ValueError, "tokens_per_sample"),
    ("tokens_per_sample float", {"tokens_per_sample": 2.5}, TypeError, "tokens_per_sample"),
    ("tokens_per_sample str", {"tokens_per_sample": "3"}, TypeError, "tokens_per_sample"),
]]


# ---- modules -----------------------------------------------------------------------------
def ctor(entry, fn, misuse, kwargs, exc, needle, marks=()):
    """A constructor row; modules passed in (a base linear to wrap) are watched."""
    return Row(entry, misuse, lambda _tmp: ((lambda: fn(**kwargs)), kwargs), exc, needle, list(marks))


LIN = dict(in_features=8, out_features=6, r=2)
ROWS += [ctor("LoRALinear", lk.LoRALinear, m, {**LIN, **c}, e, n) for m, c, e, n in [
    ("r 0", {"r": 0}, ValueError, "r must be a positive int"),
    ("r float", {"r": 2.5}, ValueError, "r must be a positive int"),
    ("r bool", {"r": True}, ValueError, "r must be a positive int"),
    ("in_features negative", {"in_features": -1}, ValueError, "in_features"),
    ("in_features float", {"in_features": 2.5}, TypeError, "in_features"),
    ("out_features str", {"out_features": "6"}, TypeError, "out_features"),
    ("lora_alpha str", {"lora_alpha": "8"}, TypeError, "lora_alpha"),
    ("lora_alpha nan", {"lora_alpha": float("nan")}, ValueError, "lora_alpha"),
    ("lora_dropout 1.0", {"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ("lora_dropout str", {"lora_dropout": "0.1"}, ValueError, "lora_dropout"),
    ("backend unknown", {"backend": "fast"}, ValueError, "backend must be one of"),
    ("dtype int64", {"dtype": torch.int64}, TypeError, "dtype"),
]]
ROWS += [
    ctor("LoRALinear.from_linear", lk.LoRALinear.from_linear, "not a linear",
         dict(linear=nn.ReLU(), r=2), TypeError, "linear must be an nn.Linear"),
    ctor("LoRALinear.from_linear", lk.LoRALinear.from_linear, "r 0",
         dict(linear=nn.Linear(4, 4), r=0), ValueError, "r must be a positive int"),
    ctor("PackedLoRALinear", lk.PackedLoRALinear, "no slice enabled",
         dict(in_features=4, out_slices=[2, 2], r=2, enable_lora=[False, False]), ValueError, "enable_lora"),
    ctor("PackedLoRALinear", lk.PackedLoRALinear, "flags/slices length mismatch",
         dict(in_features=4, out_slices=[2, 2], r=2, enable_lora=[True]), ValueError, "enable_lora"),
    ctor("PackedLoRALinear", lk.PackedLoRALinear, "float widths",
         dict(in_features=4, out_slices=[2.5, 1.5], r=2, enable_lora=[True, True]), TypeError, "out_slices"),
    ctor("PackedLoRALinear.from_linear", lk.PackedLoRALinear.from_linear, "not a linear",
         dict(linear=nn.ReLU(), r=2, enable_lora=[True]), TypeError, "linear must be an nn.Linear"),
    ctor("PackedLoRALinear.from_linear", lk.PackedLoRALinear.from_linear, "slices not summing",
         dict(linear=nn.Linear(4, 6), r=2, enable_lora=[True, False], out_slices=[2, 2]),
         ValueError, "out_slices .* must sum to out_features=6"),
]
ROWS += [ctor("MultiLoRALinear", lk.MultiLoRALinear, m, {**dict(base_linear=nn.Linear(8, 6), num_slots=2,
                                                               max_rank=4), **c}, e, n) for m, c, e, n in [
    ("num_slots 0", {"num_slots": 0}, ValueError, "num_slots"),
    ("max_rank 0", {"max_rank": 0}, ValueError, "max_rank"),
    ("base not linear", {"base_linear": nn.ReLU()}, TypeError, "base_linear"),
    ("out_slices wrong sum", {"out_slices": [1, 2]}, ValueError, "out_slices"),
    ("out_slices zero width", {"out_slices": [6, 0]}, ValueError, "out_slices"),
    ("backend unknown", {"backend": "fast"}, ValueError, "backend must be one of"),
    ("dtype int32", {"dtype": torch.int32}, TypeError, "dtype"),
]]


def module_call(entry, misuse, make, call, exc, needle, marks=()):
    """A row calling a method of a fresh module; the module is watched."""
    def build(_tmp):
        m = make()
        return (lambda: call(m)), m
    return Row(entry, misuse, build, exc, needle, list(marks))


def _trained_lora():
    layer = lk.LoRALinear(8, 6, r=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _multi(out_slices=None):
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), num_slots=2, max_rank=4, out_slices=out_slices)
    layer.set_adapter(0, randn(2 * (1 if out_slices is None else len(out_slices)), 8), randn(6, 2), 0.5)
    return layer


SA = "MultiLoRALinear.set_adapter"
ROWS += [
    module_call("LoRALinear.forward", "K of x", _trained_lora, lambda m: m(randn(3, 9)), ValueError, r"x must have shape \[\.\.\., K\]"),
    module_call("LoRALinear.forward", "x int64", _trained_lora, lambda m: m(torch.ones(3, 8, dtype=torch.int64)), TypeError, "x must be float"),
    module_call("LoRALinear.forward", "x on meta", _trained_lora, lambda m: m(randn(3, 8).to(META)), ValueError, "is on"),
    module_call(SA, "slot out of range", _multi, lambda m: m.set_adapter(2, randn(2, 8), randn(6, 2), 1.0), ValueError, "slot"),
    module_call(SA, "slot float", _multi, lambda m: m.set_adapter(1.0, randn(2, 8), randn(6, 2), 1.0), ValueError, "slot"),
    module_call(SA, "rank > max_rank", _multi, lambda m: m.set_adapter(1, randn(5, 8), randn(6, 5), 1.0), ValueError, "lora_b must have shape"),
    module_call(SA, "lora_a wrong K", _multi, lambda m: m.set_adapter(1, randn(2, 7), randn(6, 2), 1.0), ValueError, r"lora_a must have shape \[n_slices·r, in\]"),
    module_call(SA, "lora_a list", _multi, lambda m: m.set_adapter(1, [[1.0] * 8] * 2, randn(6, 2), 1.0), TypeError, "lora_a"),
    module_call(SA, "lora_b int", _multi, lambda m: m.set_adapter(1, randn(2, 8), torch.ones(6, 2, dtype=torch.int64), 1.0), TypeError, "lora_b"),
    module_call(SA, "scaling str", _multi, lambda m: m.set_adapter(0, randn(2, 8), randn(6, 2), "1"), TypeError, "scaling"),
    module_call(SA, "scaling nan", _multi, lambda m: m.set_adapter(0, randn(2, 8), randn(6, 2), float("nan")), ValueError, "scaling"),
    module_call(SA, "slice_ranks > r", lambda: _multi((3, 3)), lambda m: m.set_adapter(0, randn(4, 8), randn(6, 2), 1.0, slice_ranks=[2, 3]), ValueError, "slice_ranks"),
    module_call("MultiLoRALinear.forward", "batch for other T", _multi, lambda m: m(randn(3, 8), batch([0, 1], 2)), ValueError, "T=3"),
    module_call("MultiLoRALinear.forward", "batch not a LoRABatch", _multi, lambda m: m(randn(3, 8), [0, 1, 0]), TypeError, "batch"),
    module_call("MultiLoRALinear.set_lora_batch", "batch str", _multi, lambda m: m.set_lora_batch("b"), TypeError, "batch"),
]


def _mlp():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


def _two_linears():
    m = nn.Sequential()
    m.add_module("a", nn.Linear(4, 6))
    m.add_module("b", nn.Linear(4, 5))
    return m


ROWS += [
    module_call("inject_lora", "model not a module", _mlp, lambda m: lk.inject_lora("model", ["0"], r=2), TypeError, "model"),
    module_call("inject_lora", "target_modules empty", _mlp, lambda m: lk.inject_lora(m, [], r=2), TypeError, "target_modules"),
    module_call("inject_lora", "target_modules int", _mlp, lambda m: lk.inject_lora(m, 3, r=2), TypeError, "target_modules"),
    module_call("inject_lora", "nothing matches", _mlp, lambda m: lk.inject_lora(m, ["zz"], r=2), ValueError, "target_modules"),
    module_call("inject_lora", "r 0", _mlp, lambda m: lk.inject_lora(m, ["0", "2"], r=0), ValueError, "r must be a positive int"),
    module_call("inject_lora", "lora_dropout 2", _mlp, lambda m: lk.inject_lora(m, ["0"], r=2, lora_dropout=2), ValueError, "lora_dropout"),
    module_call("inject_lora", "second layer's flags bad", _two_linears,
                lambda m: lk.inject_lora(m, ["a", "b"], r=2, enable_lora={"b": [True, True]}), ValueError, "out_features=5"),
    module_call("mark_only_lora_as_trainable", "bias mode", _mlp, lambda m: lk.mark_only_lora_as_trainable(m, bias="x"), ValueError, "bias must be"),
    module_call("mark_only_lora_as_trainable", "model not a module", _mlp, lambda m: lk.mark_only_lora_as_trainable("m"), TypeError, "model"),
    module_call("lora_state_dict", "bias mode", _mlp, lambda m: lk.lora_state_dict(m, bias="x"), ValueError, "bias must be"),
    module_call("merge_lora", "model not a module", _mlp, lambda m: lk.merge_lora("m"), TypeError, "model"),
    module_call("unmerge_lora", "model not a module", _mlp, lambda m: lk.unmerge_lora(None), TypeError, "model"),
    module_call("set_lora_batch", "batch not a LoRABatch", lambda: nn.Sequential(_multi()), lambda m: lk.set_lora_batch(m, [0, 1]), TypeError, "batch"),
]


# ---- adapters: AdapterPool, load_peft_adapter -------------------------------------------
def _adapters():
    try:
        from lora_kernels import adapters
        return adapters
    except ImportError:
        return None


ADP = _adapters()
NEEDS_ADAPTERS = [] if ADP is not None and hasattr(ADP, "AdapterPool") else \
    [pytest.mark.skip(reason="lora_kernels.adapters.AdapterPool is not importable yet")]
PK, PH = 16, 24  # the pool's MLP: Linear(16, 24) -> ReLU -> Linear(24, 8)


def _pool_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(PK, PH), nn.ReLU(), nn.Linear(PH, 8)).eval()


def _sd(r=4, modules=("0", "2"), dims=None):
    dims = dims or {"0": (PK, PH), "2": (PH, 8)}
    sd = {}
    for m in modules:
        k, n = dims[m]
        sd[f"base_model.model.{m}.lora_A.weight"] = randn(r, k)
        sd[f"base_model.model.{m}.lora_B.weight"] = randn(n, r)
    return sd, {"r": r, "lora_alpha": 8, "target_modules": list(modules)}


def _pool():
    pool = ADP.AdapterPool(_pool_mlp(), ["0", "2"], num_slots=2, max_rank=4)
    pool.load("a", *_sd())
    return pool


def pool_row(misuse, call, exc, needle, marks=(), setup=None):
    def build(_tmp):
        pool = _pool()
        if setup is not None:
            setup(pool)
        return (lambda: call(pool)), pool
    return Row("AdapterPool", misuse, build, exc, needle, NEEDS_ADAPTERS + list(marks))


def pool_ctor(misuse, kwargs, exc, needle, marks=()):
    def build(_tmp):
        model = _pool_mlp()
        kw = {"model": model, "target_modules": ["0", "2"], "num_slots": 2, "max_rank": 4, **kwargs}
        return (lambda: ADP.AdapterPool(**kw)), model
    return Row("AdapterPool()", misuse, build, exc, needle, NEEDS_ADAPTERS + list(marks))


ROWS += [
    pool_ctor("num_slots 0", {"num_slots": 0}, ValueError, "num_slots"),
    pool_ctor("max_rank 0", {"max_rank": 0}, ValueError, "max_rank"),
    pool_ctor("nothing matches", {"target_modules": ["zz"]}, ValueError, "target_modules"),
    pool_ctor("model not a module", {"model": "m"}, TypeError, "model"),
    pool_ctor("backend unknown", {"backend": "fast"}, ValueError, "backend"),
    pool_ctor("dtype int32", {"dtype": torch.int32}, TypeError, "dtype"),
    pool_row("name not a str", lambda p: p.load(3, *_sd()), ValueError, "adapter name"),
    pool_row("name __base__", lambda p: p.load("__base__", *_sd()), ValueError, "__base__"),
    pool_row("source int", lambda p: p.load("b", 3), TypeError, "source"),
    pool_row("config r not int", lambda p: p.load("b", _sd()[0], {"r": "x"}), ValueError, "r must be a positive int"),
    pool_row("rank > max_rank", lambda p: p.load("b", *_sd(r=6)), ValueError, "exceeds the pool's max_rank=4"),
    pool_row("in/out mismatch", lambda p: p.load("b", *_sd(dims={"0": (PK + 1, PH), "2": (PH, 8)})), ValueError, r"module '0' is \[in=16, out=24\]"),
    pool_row("unknown module", lambda p: p.load("b", *_sd(modules=("0", "1"), dims={"0": (PK, PH), "1": (PH, 8)})), ValueError, "module '1'"),
    pool_row("lora_B missing", lambda p: p.load("b", {"base_model.model.0.lora_A.weight": randn(4, PK)}, {"r": 4}), ValueError, "has no lora_B"),
    pool_row("lora_A int tensor", lambda p: p.load("b", {**_sd()[0], "base_model.model.0.lora_A.weight": torch.ones(4, PK, dtype=torch.int64)}, _sd()[1]), ValueError, "must be a 2-D float tensor"),
    pool_row("config r disagrees", lambda p: p.load("a", _sd(r=4)[0], {"r": 2, "lora_alpha": 8}), ValueError, "config says r=2"),
    pool_row("unknown adapter in batch", lambda p: p.batch(["zzz"]), KeyError, "zzz"),
    pool_row("more adapters than slots", lambda p: p.batch(["a", "b", "c"]), ValueError,
             "3 distinct adapters but the pool has 2 slots",
             setup=lambda p: [p.register(n, *_sd()) for n in "bc"]),
    pool_row("tokens_per_sample lengths", lambda p: p.batch(["a", None], tokens_per_sample=[1, 2, 3]), ValueError, "tokens_per_sample"),
    # (the pins: a rejected batch must not leave its slots pinned - the snapshot sees them)
    pool_row("tokens_per_sample negative", lambda p: p.batch(["a"], tokens_per_sample=-1), ValueError, "tokens_per_sample"),
    pool_row("tokens_per_sample float", lambda p: p.batch(["a"], tokens_per_sample=2.5), TypeError, "tokens_per_sample"),
    pool_row("names a str", lambda p: p.batch("a"), TypeError, "names"),
    pool_row("NaN in an adapter", lambda p: p.load("b", {**_sd()[0], "base_model.model.2.lora_B.weight": torch.full((8, 4), float("nan"))}, _sd()[1]),
             ValueError, "NaN or infinite"),
    pool_row("release a foreign tensor", lambda p: p.release(torch.tensor([0])), ValueError, "release"),
    pool_row("unload unknown", lambda p: p.unload("zz"), KeyError, "zz"),
]


def _save(tmp: Path, name="ok", r=4) -> Path:
    return ADP.save_peft_adapter(tmp / name, *_sd(r=r))


def _spoil(tmp: Path, how: str) -> Path:
    """An adapter directory that is wrong in one way."""
    d = _save(tmp)
    st = d / "adapter_model.safetensors"
    cfg = d / "adapter_config.json"
    if how == "truncated":
        st.write_bytes(st.read_bytes()[:60])
    elif how == "header lies about a shape":
        raw = st.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        key = next(k for k in hdr if k != "__metadata__")
        hdr[key]["shape"] = [hdr[key]["shape"][0] * 2, hdr[key]["shape"][1]]
        hb = json.dumps(hdr).encode()
        hb += b" " * (-len(hb) % 8)
        st.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    elif how == "config lies about r":
        c = json.loads(cfg.read_text())
        c["r"] = 8
        cfg.write_text(json.dumps(c))
    elif how == "rank of A and B disagree":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(st))
        key = next(k for k in sd if "lora_B" in k)
        sd[key] = randn(sd[key].shape[0], 3)
        save_file(sd, str(st))
    elif how == "non-LoRA key":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(st))
        sd["base_model.model.0.weight"] = randn(PH, PK)
        save_file(sd, str(st))
    elif how == "no config":
        cfg.unlink()
    elif how == "config not JSON":
        cfg.write_text("{r: 4")
    elif how == "config r 0":
        c = json.loads(cfg.read_text())
        c["r"] = 0
        cfg.write_text(json.dumps(c))
    elif how == "not LoRA (peft_type)":
        c = json.loads(cfg.read_text())
        c["peft_type"] = "IA3"
        cfg.write_text(json.dumps(c))
    elif how == "DoRA":
        c = json.loads(cfg.read_text())
        c["use_dora"] = True
        cfg.write_text(json.dumps(c))
    elif how == "no weights":
        st.unlink()
    elif how == ".bin truncated":
        st.unlink()
        torch.save(_sd()[0], d / "adapter_model.bin")
        b = d / "adapter_model.bin"
        b.write_bytes(b.read_bytes()[:100])
    return d


def load_row(how, exc, needle, model=None, marks=()):
    def build(tmp):
        d = _spoil(tmp, how)
        kw = {} if model is None else {"model": model()}
        return (lambda: ADP.load_peft_adapter(d, **kw)), [d, kw]
    return Row("load_peft_adapter", how, build, exc, needle, NEEDS_ADAPTERS + list(marks))


ROWS += [
    load_row("truncated", ValueError, "truncated or corrupt"),
    load_row("header lies about a shape", ValueError, "truncated or corrupt"),
    load_row("config lies about r", ValueError, "rank 4 but the config says r=8"),
    load_row("rank of A and B disagree", ValueError, r"lora_A .* has rank 4 but lora_B .* has rank 3"),
    load_row("non-LoRA key", ValueError, "is not a LoRA factor"),
    load_row("no config", ValueError, "no adapter_config.json"),
    load_row("config not JSON", ValueError, "not valid JSON"),
    load_row("config r 0", ValueError, "r must be a positive int"),
    load_row("not LoRA (peft_type)", ValueError, "peft_type"),
    load_row("DoRA", ValueError, "use_dora"),
    load_row("no weights", ValueError, "no adapter_model.safetensors"),
    load_row(".bin truncated", ValueError, "truncated or corrupt"),
    load_row("model of other width", ValueError, r"expected \[r, 17\]",
             model=lambda: nn.Sequential(nn.Linear(PK + 1, PH), nn.ReLU(), nn.Linear(PH, 8))),
    load_row("model not a module", TypeError, "model", model=lambda: "m"),
    Row("load_peft_adapter", "path missing", lambda tmp: ((lambda: ADP.load_peft_adapter(tmp / "nope")), []),
        ValueError, "does not exist", NEEDS_ADAPTERS),
    Row("load_peft_adapter", "path an int", lambda tmp: ((lambda: ADP.load_peft_adapter(3)), []),
        TypeError, "PathLike", NEEDS_ADAPTERS),
]


# ---- patch_peft_model ---------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(13, 24)
        self.down = nn.Linear(24, 11)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    return peft.get_peft_model(_MLP(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                                       init_lora_weights=False))


def patch_row(misuse, call, exc, needle, marks=()):
    def build(_tmp):
        model = _peft_model()
        return (lambda: call(model)), model
    return Row("patch_peft_model", misuse, build, exc, needle, list(marks))


def patch_again(misuse, first, marks=()):
    """Patch once through ``first(model)`` (setup), then the whole model: rejected, unchanged."""
    def build(_tmp):
        model = _peft_model()
        lk.patch_peft_model(first(model))
        return (lambda: lk.patch_peft_model(model)), model
    return Row("patch_peft_model", misuse, build, ValueError, "already patched", list(marks))


ROWS += [
    patch_row("model not a module", lambda m: lk.patch_peft_model("model"), TypeError, "model"),
    patch_row("no LoRA layers", lambda m: lk.patch_peft_model(_MLP()), ValueError, "no PEFT LoRA layers"),
    patch_row("backend unknown", lambda m: lk.patch_peft_model(m, backend="fast"), ValueError, "backend"),
    patch_again("already patched", lambda m: m),
    patch_again("partly patched (sub-module)", lambda m: m.base_model.model.down),
]


# ---- joint training: adapter_param_groups, save_peft_adapters -----------------------------
def _two_adapter_model():
    peft = pytest.importorskip("peft")
    model = _peft_model()
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["up"]))
    return model  # "b" is frozen: PEFT trains the active adapter only


def joint_row(entry, misuse, call, exc, needle):
    def build(tmp):
        model = _two_adapter_model()
        return (lambda: call(model, tmp)), [model, tmp]
    return Row(entry, misuse, build, exc, needle)


APG, SPA = "adapter_param_groups", "save_peft_adapters"
ROWS += [
    joint_row(APG, "no PEFT adapters", lambda m, t: lk.adapter_param_groups(_MLP()), ValueError,
              "no PEFT adapter parameters"),
    joint_row(APG, "unknown adapter", lambda m, t: lk.adapter_param_groups(m, nope={"lr": 1.0}),
              ValueError, "unknown adapter"),
    joint_row(APG, "options not a dict", lambda m, t: lk.adapter_param_groups(m, default=0.1),
              TypeError, "options for adapter 'default'"),
    joint_row(APG, "options set params",
              lambda m, t: lk.adapter_param_groups(m, overrides={"default": {"params": []}}),
              ValueError, "must not set 'params'"),
    joint_row(APG, "lr negative", lambda m, t: lk.adapter_param_groups(m, lr=-1.0), ValueError,
              "lr must be"),
    joint_row(APG, "adapters one string", lambda m, t: lk.adapter_param_groups(m, adapters="b"),
              TypeError, "adapters must be a sequence"),
    joint_row(APG, "frozen adapter asked for",
              lambda m, t: lk.adapter_param_groups(m, adapters=["b"]), ValueError,
              "no trainable parameters"),
    joint_row(SPA, "unknown adapter", lambda m, t: lk.save_peft_adapters(m, t, ["default", "x"]),
              ValueError, "unknown adapter"),
    joint_row(SPA, "adapters one string", lambda m, t: lk.save_peft_adapters(m, t, "b"),
              TypeError, "adapters must be a sequence"),
    joint_row(SPA, "no PEFT model", lambda m, t: lk.save_peft_adapters(_MLP(), t), ValueError,
              "expected one PEFT LoRA model"),
]


def save_row(misuse, source, config, exc, needle):
    def build(tmp):
        src = source()
        return (lambda: ADP.save_peft_adapter(tmp / "out", src, config)), [src, tmp]
    return Row("save_peft_adapter", misuse, build, exc, needle, NEEDS_ADAPTERS)


ROWS += [
    save_row("state dict without config", lambda: _sd()[0], None, ValueError, "config="),
    save_row("model without LoRA layers", _mlp, None, ValueError, "no LoRALinear"),
    save_row("state dict with a non-LoRA key", lambda: {**_sd()[0], "x.weight": randn(2, 2)},
             {"r": 4, "lora_alpha": 8}, ValueError, "not a LoRA factor"),
    save_row("config r disagrees with tensors", lambda: _sd(r=4)[0], {"r": 2, "lora_alpha": 8},
             ValueError, "config says r=2"),
    module_call("use_lora_batch", "batch not a LoRABatch", lambda: nn.Sequential(_multi()),
                lambda m: lk.use_lora_batch(m, "b").__enter__(), TypeError, "batch"),
]

# ---- GPU-only: real mixed devices ---------------------------------------------------------
# MoE experts (ops/moe_lora.py): E experts, top-2 of T tokens.
ME, MK = 5, 2


def moe_kw():
    return dict(x=randn(T, K), expert_weight=randn(ME, N, K),
                topk_ids=torch.tensor([[i % ME, (i + 2) % ME] for i in range(T)]),
                lora_a=randn(ME, R, K), lora_b=randn(ME, N, R), topk_weights=randn(T, MK))


def moe_multi_kw():
    kw = moe_kw()
    kw.update(lora_a=randn(S, ME, R, K), lora_b=randn(S, ME, N, R), scalings=torch.ones(S),
              adapter_ids=torch.tensor([(i % (S + 1)) - 1 for i in range(T)]))
    return kw


MOE = lk.moe_lora_linear
ROWS += [op("moe_lora_linear", MOE, moe_kw, m, c, e, n) for m, c, e, n in [
    ("x 0-D", {"x": torch.tensor(1.0)}, ValueError, r"x must have shape \[T, K\] or \[T, k, K\]"),
    ("x int64", {"x": torch.ones(T, K, dtype=torch.int64)}, TypeError, "x must be float"),
    ("expert_weight 2-D", {"expert_weight": randn(N, K)}, ValueError, "expert_weight must be 3-D"),
    ("K of x", {"x": randn(T, K + 1)}, ValueError, r"x must have shape \[T, K\]"),
    ("k of per-pair x", {"x": randn(T, MK + 1, K)}, ValueError, r"x must have shape \[T, k, K\]"),
    ("K of lora_a", {"lora_a": randn(ME, R, K + 1)}, ValueError, r"lora_a must have shape \[E, r, K\]"),
    ("E of lora_b", {"lora_b": randn(ME + 1, N, R)}, ValueError, r"lora_b must have shape \[E, N, r\]"),
    ("topk_ids float", {"topk_ids": torch.zeros(T, MK)}, TypeError, "topk_ids must be an integer"),
    ("topk_ids 1-D", {"topk_ids": torch.zeros(T, dtype=torch.long)}, ValueError, r"topk_ids must have shape \[T, k\]"),
    ("topk_ids out of range", {"topk_ids": torch.full((T, MK), ME)}, ValueError, r"topk_ids must lie in \[0, 5\)"),
    ("topk_ids negative", {"topk_ids": torch.full((T, MK), -1)}, ValueError, "topk_ids must lie in"),
    ("topk_ids on meta", {"topk_ids": lambda kw: kw["topk_ids"].to(META)}, ValueError, "topk_ids is on meta"),
    ("topk_weights shape", {"topk_weights": randn(T, MK + 1)}, ValueError, r"topk_weights must have shape \[T, k\]"),
    ("expert_weight trainable", {"expert_weight": lambda kw: kw["expert_weight"].requires_grad_()},
     ValueError, "expert_weight must be frozen"),
    ("expert_weight dtype != x", {"expert_weight": randn(ME, N, K, dtype=torch.float16)}, TypeError,
     "x and weight must share a dtype"),
    ("scaling nan", {"scaling": float("nan")}, ValueError, "scaling must be finite"),
    ("backend unknown", {"backend": "fastest"}, ValueError, "backend must be one of"),
]]
MMOE = lk.moe_multi_lora_linear
ROWS += [op("moe_multi_lora_linear", MMOE, moe_multi_kw, m, c, e, n) for m, c, e, n in [
    ("lora_a 3-D", {"lora_a": randn(ME, R, K)}, ValueError, "lora_a must be 4-D"),
    ("E of lora_b", {"lora_b": randn(S, ME + 1, N, R)}, ValueError, r"lora_b must have shape \[S, E, N, r\]"),
    ("adapter_ids float", {"adapter_ids": torch.zeros(T)}, ValueError, "adapter_ids must be an integer"),
    ("adapter_ids out of range", {"adapter_ids": torch.full((T,), S)}, ValueError, r"adapter_ids must lie in \[-1, 3\)"),
    ("adapter_ids below -1", {"adapter_ids": torch.full((T,), -2)}, ValueError, "adapter_ids must lie in"),
    ("scalings shape", {"scalings": torch.ones(S + 1)}, ValueError, r"scalings must have shape \[S\]"),
    ("topk_ids out of range", {"topk_ids": torch.full((T, MK), ME)}, ValueError, "topk_ids must lie in"),
]]

GPU = [pytest.mark.gpu]
ROWS += [
    op("lora_linear", LL, single_kw, "x on cuda, weight on cpu", {"x": lambda kw: kw["x"].cuda()},
       ValueError, "is on", GPU),
    op("multi_lora_linear", ML, multi_kw, "batch on cpu, x on cuda",
       {"x": lambda kw: kw["x"].cuda(), "weight": lambda kw: kw["weight"].cuda(),
        "bias": lambda kw: kw["bias"].cuda(), "lora_a": lambda kw: kw["lora_a"].cuda(),
        "lora_b": lambda kw: kw["lora_b"].cuda()}, ValueError, "batch is on cpu", GPU),
    op("lora_expand", EX, expand_kw, "lora_b on cuda", {"lora_b": lambda kw: kw["lora_b"].cuda()},
       ValueError, "lora_b is on", GPU),
]

ALLOWED = (ValueError, TypeError, KeyError, lk.BackendUnavailableError)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_misuse_is_rejected_with_a_named_error_and_no_state_change(row, tmp_path):
    assert issubclass(row.exc, ALLOWED), "the contract's exception types only"
    call, watched = row.build(tmp_path)
    before = snapshot(watched)
    with pytest.raises(Exception) as info:
        call()
    err = info.value
    assert isinstance(err, row.exc), f"{type(err).__name__}: {err} (expected {row.exc.__name__})"
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    assert re.search(row.needle, str(msg)), f"message does not name the argument: {msg!r}"
    assert_same(before, snapshot(watched), "state")


def test_matrix_covers_every_public_entry():
    """A new public name must get rows here (or be listed as not an entry)."""
    not_entries = {"BackendUnavailableError", "__version__"}
    covered = {r.entry.split(".")[0].rstrip("()") for r in ROWS}
    missing = sorted(n for n in lk.__all__ if n not in covered and n not in not_entries)
    assert not missing, f"public entries without bad-input rows: {missing}"
