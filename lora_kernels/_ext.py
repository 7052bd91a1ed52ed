"""The ``cuda`` backend: the kernel-level API of docs/BACKENDS.md on the compiled extension.

``lora_kernels._C`` (built from ``csrc/`` by setup.py; ``make ext``) registers kernel-level ops
``torch.ops.lora_kernels.cuda_*`` with CUDA kernels. This module allocates their outputs,
unpacks the ``LoRABatch``, and composes them with cuBLAS (``torch.mm``) where a hand kernel
would not be faster:

=====================  ==========================================  ===============================
API function           CUDA kernels                                cuBLAS / torch
=====================  ==========================================  ===============================
``lora_shrink``        ``cuda_lora_shrink``                        –
``lora_expand``        ``cuda_lora_expand``                        –
``multi_lora_fwd``     T <= 16: ``cuda_lora_shrink_expand`` (one    base GEMM ``addmm``
                       launch); else shrink + expand
``lora_linear_fwd``    ``cuda_lora_shrink`` (dropout in-kernel) +   float32: ``addmm`` + ``addmm_``
                       ``cuda_fused_lora_gemm`` (fp16/bf16)
``lora_linear_bwd``    ``cuda_fused_lora_gemm`` dX (fp16/bf16)     ``dy·B``, dA, dB, dW, db;
                                                                   float32 dX
``dropout_keep_mask``  ``cuda_dropout_keep_mask``                  –
``multi_lora_bwd``     not here: ``backend.kernel`` falls back to Triton
=====================  ==========================================  ===============================

The fused GEMM has no float32 path (tensor cores take fp16/bf16; a tf32 variant would break
the fp32 accuracy contract), so float32 single-adapter calls use cuBLAS plus our shrink.

Importing this module loads the extension if it was built; a failure is kept, not raised:
:func:`why_unavailable` says what went wrong and how to build it. Fake (meta) kernels for the
``cuda_*`` ops are registered here (the C++ library names this module as their home), so the
ops trace under ``FakeTensorMode`` / ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from lora_kernels import reference

# Kept in sync with csrc/torch_bindings.cpp (tests/test_ext.py compares them with the registry).
SCHEMAS = {
    "cuda_dropout_keep_mask":
        "cuda_dropout_keep_mask(Tensor(a!) out, int seed, float p, int row_offset) -> ()",
    "cuda_lora_shrink":
        "cuda_lora_shrink(Tensor x, Tensor lora_a, Tensor? scalings, Tensor? ranks, "
        "Tensor? adapter_ids, Tensor? sorted_token_ids, Tensor? seg_offsets, Tensor? active_slots, "
        "int num_active, int max_seg_len, int n_slices, float dropout_p, int seed, int path, "
        "Tensor(a!) out) -> ()",
    "cuda_lora_expand":
        "cuda_lora_expand(Tensor(a!) y, Tensor xa, Tensor lora_b, Tensor? ranks, Tensor adapter_ids, "
        "Tensor sorted_token_ids, Tensor seg_offsets, Tensor active_slots, int num_active, "
        "int max_seg_len, int[] out_slices, int path) -> ()",
    "cuda_lora_shrink_expand":
        "cuda_lora_shrink_expand(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, "
        "Tensor scalings, Tensor? ranks, Tensor adapter_ids, int[] out_slices, Tensor(b!) xa) -> ()",
    "cuda_fused_lora_gemm":
        "cuda_fused_lora_gemm(Tensor a, Tensor w, Tensor? bias, Tensor u, Tensor v, float scaling, "
        "float dropout_p, int seed, bool trans_b, Tensor(a!) out) -> ()",
}

# Kernel paths of cuda_lora_shrink / cuda_lora_expand (tests force each one).
PATH_AUTO, PATH_DECODE, PATH_PREFILL = 0, 1, 2
# multi_lora_fwd uses the one-launch shrink+expand up to this many tokens.
FUSED_DECODE_MAX_TOKENS = 16
# Limits of the kernels (csrc/kernels/lora_kernels.h).
MAX_SLICES = 16
FUSED_DECODE_MAX_RANK_ROWS = 8192

_BUILD_HINT = ("build it with `make ext` (or `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation "
               "-e .`) on a machine with nvcc and a CUDA build of torch")


def _load() -> Optional[str]:
    try:
        from lora_kernels import _C  # noqa: F401  (loading the .so registers the ops)
    except ImportError as exc:
        return f"the CUDA extension lora_kernels._C is not built ({exc}); {_BUILD_HINT}"
    except OSError as exc:  # built against another torch: undefined symbols
        return f"the CUDA extension lora_kernels._C does not load ({exc}); rebuild it: {_BUILD_HINT}"
    return None


_LOAD_ERROR = _load()


@functools.lru_cache(maxsize=None)
def why_unavailable() -> Optional[str]:
    """None if the extension is loaded, else why not and how to build it."""
    return _LOAD_ERROR


def _ops():
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return torch.ops.lora_kernels


# A seed as the signed int64 the schema carries (same 64 bits the reference masks).
_i64 = reference.seed_int64


def _slices(out_slices) -> list[int]:
    sl = [] if out_slices is None else [int(w) for w in out_slices]
    if len(sl) > MAX_SLICES:
        raise ValueError(f"the CUDA kernels take at most {MAX_SLICES} out_slices, got {len(sl)}; "
                         f"use backend='triton'")
    return sl


# ---------------------------------------------------------------------------------------------
# Kernel-level API (docs/BACKENDS.md)
# ---------------------------------------------------------------------------------------------
def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None,
                      row_offset: int = 0) -> Tensor:
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    _ops().cuda_dropout_keep_mask(out, _i64(seed), float(p), int(row_offset))
    return out


def _batch_args(batch) -> tuple:
    # the CUDA kernels take the first four tensors (no tile_map); -1 active slots exit early
    return (*batch.tensors()[:4], batch.num_active, batch.max_seg_len)


def lora_shrink(x, lora_a, batch, scalings, ranks, n_slices, *, path: int = PATH_AUTO) -> Tensor:
    out = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    _ops().cuda_lora_shrink(x, lora_a, scalings, ranks, *_batch_args(batch), int(n_slices), 0.0, 0,
                            int(path), out)
    return out


def lora_expand(y, xa, lora_b, batch, ranks, out_slices, *, path: int = PATH_AUTO) -> Tensor:
    _ops().cuda_lora_expand(y, xa, lora_b, ranks, *_batch_args(batch), _slices(out_slices), int(path))
    return y


def multi_lora_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   need_xa=True):
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    T, RR = x.shape[0], lora_a.shape[1]
    if not batch.has_lora or T == 0 or RR == 0:
        return y, (x.new_zeros(T, RR, dtype=torch.float32) if need_xa else None)
    slices = _slices(out_slices)
    if T <= FUSED_DECODE_MAX_TOKENS and RR <= FUSED_DECODE_MAX_RANK_ROWS:
        xa = torch.empty(T, RR, dtype=torch.float32, device=x.device)
        _ops().cuda_lora_shrink_expand(y, x, lora_a, lora_b, scalings, ranks, batch.adapter_ids,
                                       slices, xa)
    else:
        xa = lora_shrink(x, lora_a, batch, scalings, ranks, max(len(slices), 1))
        lora_expand(y, xa, lora_b, batch, ranks, slices)
    return y, (xa if need_xa else None)


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, out=None):
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    xa32 = torch.empty(M, r, dtype=torch.float32, device=x.device)
    # single-adapter mode: no batch tensors, lora_a as a one-slot stack, dropout on x in-kernel
    _ops().cuda_lora_shrink(x, lora_a.unsqueeze(0), None, None, None, None, None, None, 1, M, 1,
                            float(dropout_p), _i64(seed), PATH_AUTO, xa32)
    xa = xa32.to(x.dtype)
    if x.dtype == torch.float32:
        y = out if out is not None else x.new_empty(M, N)
        if bias is not None:
            torch.addmm(bias, x, weight.t(), out=y)
        else:
            torch.mm(x, weight.t(), out=y)
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        return y, xa
    y = out if out is not None else x.new_empty(M, N)
    bias = None if bias is None else bias.contiguous()
    _ops().cuda_fused_lora_gemm(x, weight, bias, xa, lora_b, float(scaling), 0.0, 0, False, y)
    return y, xa


def lora_linear_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    dx = dw = db = da = dbb = None
    dyb = dy @ lora_b if (need_x or need_a) else None  # [M, r], the only new intermediate
    fp32 = x.dtype == torch.float32
    # The float32 dx and dA drop on the same [M, K] grid: one mask for both (the fp16/bf16
    # dx applies it in-kernel). None without dropout.
    keep = None
    if need_a or (need_x and fp32):
        keep = reference.keep_like(x, seed, dropout_p, dropout_keep_mask)
    if need_x:
        if fp32:
            dx = torch.mm(dy, weight)
            if keep is None:
                dx.addmm_(dyb, lora_a, alpha=scaling)
            else:  # scale the rank-sized factor, not the [M, K] product
                dx.add_(reference.apply_keep((dyb * scaling) @ lora_a, keep, dropout_p))
        else:
            # dx = dy·W + drop(s·(dy·B)·A) in one tensor-core pass (mask applied in registers)
            dx = torch.empty_like(x)
            _ops().cuda_fused_lora_gemm(dy, weight, None, dyb, lora_a, float(scaling),
                                        float(dropout_p), _i64(seed), True, dx)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0)
    if need_a:
        da = (dyb.t() @ reference.apply_keep(x, keep, dropout_p)) * scaling
    if need_bb:
        dbb = (dy.t() @ xa) * scaling
    return dx, dw, db, da, dbb


# multi_lora_bwd is deliberately absent: backend.kernel("cuda", "multi_lora_bwd") uses Triton's.


# ---------------------------------------------------------------------------------------------
# Fake kernels: shape checks only (the ops write into preallocated outputs and return nothing)
# ---------------------------------------------------------------------------------------------
def _expect(cond, msg):
    torch._check(cond, lambda: msg)


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("lora_kernels::cuda_dropout_keep_mask")
    def _(out, seed, p, row_offset):
        _expect(out.dtype == torch.bool and out.dim() == 2, "out must be a 2-D bool tensor")

    @reg("lora_kernels::cuda_lora_shrink")
    def _(x, lora_a, scalings, ranks, adapter_ids, sorted_token_ids, seg_offsets, active_slots,
          num_active, max_seg_len, n_slices, dropout_p, seed, path, out):
        _expect(x.dim() == 2 and lora_a.dim() == 3, "x must be [T, K], lora_a [S, n_slices*R, K]")
        _expect(lora_a.shape[2] == x.shape[1], "lora_a must be [S, n_slices*R, K]")
        _expect(out.dtype == torch.float32 and out.shape == (x.shape[0], lora_a.shape[1]),
                "out must be float32 [T, n_slices*R]")

    @reg("lora_kernels::cuda_lora_expand")
    def _(y, xa, lora_b, ranks, adapter_ids, sorted_token_ids, seg_offsets, active_slots,
          num_active, max_seg_len, out_slices, path):
        _expect(y.dim() == 2 and lora_b.dim() == 3 and lora_b.shape[1] == y.shape[1],
                "y must be [T, N], lora_b [S, N, R]")
        n_slices = max(len(out_slices), 1)
        _expect(xa.shape == (y.shape[0], n_slices * lora_b.shape[2]), "xa must be [T, n_slices*R]")

    @reg("lora_kernels::cuda_lora_shrink_expand")
    def _(y, x, lora_a, lora_b, scalings, ranks, adapter_ids, out_slices, xa):
        _expect(x.shape[0] == y.shape[0] and lora_b.shape[1] == y.shape[1],
                "x must be [T, K], y [T, N], lora_b [S, N, R]")
        _expect(xa.shape == (y.shape[0], lora_a.shape[1]), "xa must be [T, n_slices*R]")

    @reg("lora_kernels::cuda_fused_lora_gemm")
    def _(a, w, bias, u, v, scaling, dropout_p, seed, trans_b, out):
        n = w.shape[1] if trans_b else w.shape[0]
        _expect(out.shape == (a.shape[0], n), "out must be [M, N]")
        _expect(u.shape[0] == a.shape[0], "u must be [M, r]")


if _LOAD_ERROR is None:
    _register_fakes()
