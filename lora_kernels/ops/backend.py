"""Backend selection, in one place.

A backend is a module that implements the kernel-level functions listed in ``KERNEL_API``
(docs/BACKENDS.md has the exact contract):

* ``"torch"``  -> :mod:`lora_kernels.ops.torch_backend` (the reference's CPU kernels; any device)
* ``"triton"`` -> :mod:`lora_kernels.triton` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
* ``"cuda"``   -> :mod:`lora_kernels._ext` (the compiled extension; CUDA tensors)

``"auto"`` (the default, overridable by the env var ``LORA_KERNELS_BACKEND``) picks the torch
backend for CPU tensors and, for CUDA tensors, the per-shape winner from
``dispatch_table.json`` (written by the benchmarks, only for kernels validated on a GPU),
falling back to Triton. The table may also name ``"cublas"`` (``TABLE_ONLY``: the cuBLAS
composition floor for ``lora_linear``, :mod:`lora_kernels.ops.cublas_backend`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import torch

from lora_kernels.runtime import interpreting, shape_class  # noqa: F401  (shape_class: public here too)

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

# The functions a backend module may provide. A backend that lacks one (say, the CUDA
# extension without a fused backward) borrows it from the next backend in FALLBACK.
KERNEL_API = (
    "lora_linear_fwd", "lora_linear_bwd", "dropout_keep_mask",
    "lora_shrink", "lora_expand", "multi_lora_fwd", "multi_lora_bwd",
    "dora_weight_a", "dora_linear_fwd", "dora_scale_grad",
)
FALLBACK = {"cuda": "triton", "triton": "torch", "torch": None, "cublas": "torch"}

_MODULES = {
    "torch": "lora_kernels.ops.torch_backend",
    "triton": "lora_kernels.triton",
    "cuda": "lora_kernels._ext",
    "cublas": "lora_kernels.ops.cublas_backend",
}
# Backends only the dispatch table may name (never a user's `backend=`), with the ops they
# serve: "cublas" is the cuBLAS composition floor for lora_linear (ops/cublas_backend.py says
# why it is not public). A table naming one for another op is ignored.
TABLE_ONLY = {"cublas": ("lora_linear",)}

_TABLE_PATH = Path(__file__).with_name("dispatch_table.json")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to get it."""


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


@functools.lru_cache(maxsize=None)
def _why_unavailable(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run on ``device_type`` tensors, else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as exc:  # pragma: no cover - triton is a core dependency
            return f"triton is not importable ({exc}); pip install triton"
        if device_type == "cpu" and not interpreting():
            return ("backend='triton' on CPU tensors needs the Triton interpreter: set "
                    "TRITON_INTERPRET=1 before triton is first imported")
        if device_type not in ("cuda", "cpu"):
            return f"backend='triton' supports CUDA tensors (got {device_type})"
        return None
    if name == "cublas":  # torch + cuBLAS on any CUDA device (and CPU tensors, for the tests)
        return None if device_type in ("cuda", "cpu") else f"cublas needs CUDA tensors (got {device_type})"
    if name == "cuda":
        if device_type != "cuda":
            return f"backend='cuda' needs CUDA tensors (got {device_type} tensors)"
        from lora_kernels import _ext
        return _ext.why_unavailable()
    return f"unknown backend {name!r}; expected one of {BACKENDS}"


def available(name: str, device_type: str) -> bool:
    return _why_unavailable(name, device_type) is None


@functools.lru_cache(maxsize=None)
def _dispatch_table() -> dict:
    try:
        return json.loads(_TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


# Tables pushed by dispatch_override (innermost last).
_TABLE_OVERRIDES: list = []


@contextlib.contextmanager
def dispatch_override(table: dict):
    """Within the block, ``auto`` on CUDA tensors reads ``table`` (``{op: {shape_class: name}}``)
    instead of dispatch_table.json: tests of the selection, and benchmarks that time a table
    candidate (the cuBLAS floor) through the public op exactly as ``auto`` would run it.
    Process-wide, not per thread: for tests and benchmarks only."""
    _TABLE_OVERRIDES.append(table)
    try:
        yield
    finally:
        _TABLE_OVERRIDES.pop()


@torch.compiler.assume_constant_result
def _auto_cuda(op: str, shape_class: str) -> str:
    table = _TABLE_OVERRIDES[-1] if _TABLE_OVERRIDES else _dispatch_table()
    winner = table.get(op, {}).get(shape_class)
    if winner in TABLE_ONLY and op not in TABLE_ONLY[winner]:
        winner = None
    if winner and available(winner, "cuda"):
        return winner
    return "triton" if available("triton", "cuda") else "torch"


def resolve(backend: str, device: torch.device, op: str, shape_class: str = "any") -> str:
    """Turn a requested backend (``auto`` included) into a concrete, available one, or raise."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend.lower()
    if backend == "auto":
        backend = _env_backend()
        if backend not in BACKENDS:
            raise ValueError(f"env {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch" if device.type != "cuda" else _auto_cuda(op, shape_class)
    why = _why_unavailable(backend, device.type)
    if why is not None:
        raise BackendUnavailableError(why)
    return backend


def resolve_for(backend: str, rows: torch.Tensor, op: str) -> str:
    """:func:`resolve` for an op whose leading operand is ``rows`` (``x`` / ``y`` as 2-D): its
    device, its row count (the shape class) and its dtype — float64 runs on the torch backend
    only, which ``auto`` picks silently and an explicit other backend refuses."""
    name = resolve(backend, rows.device, op, shape_class(rows.shape[0]))
    if rows.dtype == torch.float64 and name != "torch":
        if backend == "auto":
            return "torch"
        raise TypeError(f"float64 inputs run on backend='torch' only (asked for {name!r})")
    return name


@functools.lru_cache(maxsize=None)
def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def kernel(name: str, fn: str):
    """The implementation of kernel-level function ``fn`` for backend ``name`` (with fallback)."""
    while name is not None:
        impl = getattr(_module(name), fn, None)
        if impl is not None:
            return impl
        name = FALLBACK[name]
    raise RuntimeError(f"no backend implements {fn}")  # unreachable: the torch backend has all


def native(name: str, fn: str):
    """Backend ``name``'s own implementation of ``fn``, or None (no fallback): for optional
    kernels whose fallback would be the wrong thing (the torch one reads scalings on the host,
    a sync per call on CUDA tensors), so the caller composes other kernels instead."""
    return getattr(_module(name), fn, None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)

# What eager_mode() answers: the custom op is needed / not needed (no graph to record) /
# not needed, but a graph is (an autograd.Function around the same kernels records it).
CUSTOM_OP, EAGER_NO_GRAD, EAGER_GRAD = 0, 1, 2


def eager_mode(*tensors) -> int:
    """Whether an op may bypass its ``torch.library`` custom op. Only the custom op is seen by
    ``torch.compile``, ``opcheck``, dispatch modes (fake/meta tensors, ``TorchDispatchMode``),
    tensor subclasses and functorch transforms; plain eager calls get the same kernels
    directly. Measured on CPU: the custom-op dispatch costs ~10-30 µs a call, a whole tiny
    forward ~8 µs; eager decode pays it once per layer per token, training twice."""
    # The dispatch-mode test is _current_dispatch_mode()'s own, without its import per call.
    if torch.compiler.is_compiling() or _dispatch_stack_len() > 0 or \
            torch._C._are_functorch_transforms_active():
        return CUSTOM_OP
    grad = torch.is_grad_enabled()
    needs_graph = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return CUSTOM_OP
        needs_graph = needs_graph or (grad and t.requires_grad)
    return EAGER_GRAD if needs_graph else EAGER_NO_GRAD


def plain_eager(*tensors) -> bool:
    """True when nothing needs the custom op nor an autograd graph: the ops may call the backend
    kernel directly (:func:`eager_mode` is ``EAGER_NO_GRAD``)."""
    return eager_mode(*tensors) == EAGER_NO_GRAD


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode()


_dispatch_stack_len = torch._C._len_torch_dispatch_stack  # what _get_current_dispatch_mode reads


def describe() -> dict:
    """For ``lora-kernels info``: each backend and, if unavailable, why."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {name: (_why_unavailable(name, dev) or "available") for name in BACKENDS if name != "auto"}
    if dev == "cpu":  # say whether the extension itself is built, not only that no GPU is here
        from lora_kernels import _ext
        ext = _ext.why_unavailable()
        out["cuda"] += "; extension " + ("built and loaded" if ext is None else f"not built: {ext}")
        if ext is None:
            no_cutlass = _ext.why_no_cutlass()
            out["cuda"] += "; CUTLASS sm90 GEMM " + ("built" if no_cutlass is None else f"absent: {no_cutlass}")
    return out
