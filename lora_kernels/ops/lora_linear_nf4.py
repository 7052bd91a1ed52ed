"""Fused LoRA linear over a frozen NF4 (bitsandbytes / QLoRA) base weight: contract, custom op,
autograd, dispatch.

``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with ``W0`` given as bitsandbytes' own NF4 storage
(:class:`lora_kernels.ops.nf4.NF4Weight`, or a quantized ``Params4bit`` read through its
``quant_state``). W0 is frozen: gradients flow to x, lora_a, lora_b and bias.

Backends: ``triton`` (and ``cuda``, whose extension has no NF4 kernel: its fallback, as for
every op missing there) decodes the 4-bit tiles inside the GEMM (forward and dX, no N×K
tensor), or at compute-bound M decodes W once per bounded slab and runs the dense fused GEMM
on it (lora_kernels/triton/nf4_slabs.py); ``torch`` dequantizes by tiles of ``quant_tiles.ROWS_PER_TILE`` rows, exact against
``bitsandbytes.functional.dequantize_4bit``.

The storage travels through the custom op as its tensors (codes, absmax, code, and for nested
storage absmax2 / code2) plus scalars, so ``torch.compile`` and ``opcheck`` see plain tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops import nf4 as _nf4
from lora_kernels.ops import quant_tiles as _quant_tiles
from lora_kernels.ops import validation as V
from lora_kernels.ops.lora_linear import EMPTY_GRAD, seed_int

__all__ = ["lora_linear_nf4"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2):
    return _nf4.NF4Weight(codes=codes, absmax=absmax, code=code, shape=tuple(shape),
                          dtype=wdtype, blocksize=blocksize, absmax2=absmax2, code2=code2,
                          offset=offset, blocksize2=blocksize2)


def _impl(backend: str, fn: str):
    if backend == "triton":
        from lora_kernels.triton import quant_lora
        return getattr(quant_lora, {"fwd": "quant_lora_fwd", "bwd": "quant_lora_bwd"}[fn])
    return {"fwd": _quant_tiles.lora_fwd, "bwd": _quant_tiles.lora_bwd}[fn]


@torch.library.custom_op("lora_kernels::lora_linear_nf4", mutates_args=())
def _nf4_op(x: Tensor, codes: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
            code2: Optional[Tensor], offset: float, shape: Sequence[int], wdtype: torch.dtype,
            blocksize: int, blocksize2: int, bias: Optional[Tensor], lora_a: Tensor,
            lora_b: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
            backend: str) -> tuple[Tensor, Tensor]:
    w = _weight(codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2)
    return _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed, backend)


def _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[0]), x.new_empty(0, lora_a.shape[0])
    return _impl(backend, "fwd")(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed_int(seed))


@_nf4_op.register_fake
def _(x, codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2, bias,
      lora_a, lora_b, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("lora_kernels::lora_linear_nf4_backward", mutates_args=())
def _nf4_backward_op(dy: Tensor, x: Tensor, codes: Tensor, absmax: Tensor, code: Tensor,
                     absmax2: Optional[Tensor], code2: Optional[Tensor], offset: float,
                     shape: Sequence[int], wdtype: torch.dtype, blocksize: int, blocksize2: int,
                     lora_a: Tensor, lora_b: Tensor, xa: Tensor, scaling: float,
                     dropout_p: float, seed: Optional[Tensor], needs: Sequence[bool],
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    w = _weight(codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2)
    if x.shape[0] == 0:
        grads = (torch.zeros_like(x), x.new_zeros(shape[0]), torch.zeros_like(lora_a),
                 torch.zeros_like(lora_b))
    else:
        grads = _impl(backend, "bwd")(dy, x, w, lora_a, lora_b, xa, scaling, dropout_p,
                                      seed_int(seed), needs)
    return tuple(g if n else x.new_empty(EMPTY_GRAD) for g, n in zip(grads, needs))


@_nf4_backward_op.register_fake
def _(dy, x, codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2,
      lora_a, lora_b, xa, scaling, dropout_p, seed, needs, backend):
    shapes = (x.shape, (shape[0],), lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else EMPTY_GRAD) for s, n in zip(shapes, needs))


# Positions of the differentiable inputs of the forward op: x, bias, lora_a, lora_b.
_GRAD_INPUTS = (0, 11, 12, 13)


def _setup_context(ctx, inputs, output):
    (x, codes, absmax, code, absmax2, code2, offset, shape, wdtype, blocksize, blocksize2, bias,
     lora_a, lora_b, scaling, dropout_p, seed, backend) = inputs
    ctx.save_for_backward(x, codes, absmax, code, absmax2, code2, lora_a, lora_b, output[1], seed)
    ctx.meta = (offset, tuple(shape), wdtype, blocksize, blocksize2)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dxa):
    x, codes, absmax, code, absmax2, code2, lora_a, lora_b, xa, seed = ctx.saved_tensors
    offset, shape, wdtype, blocksize, blocksize2 = ctx.meta
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = torch.ops.lora_kernels.lora_linear_nf4_backward(
        dy.contiguous(), x, codes, absmax, code, absmax2, code2, offset, shape, wdtype,
        blocksize, blocksize2, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed, needs,
        ctx.backend)
    dx, db, da, dbb = (g if n else None for g, n in zip(grads, needs))
    return (dx, *([None] * 10), db, da, dbb, None, None, None, None)


_nf4_op.register_autograd(_backward, setup_context=_setup_context)


def _as_nf4(weight) -> _nf4.NF4Weight:
    if isinstance(weight, _nf4.NF4Weight):
        return weight
    if getattr(weight, "quant_state", None) is not None:
        return _nf4.from_params4bit(weight)
    raise TypeError("weight must be an NF4Weight or a quantized bitsandbytes Params4bit, got "
                    f"{type(weight).__name__}")


def op_args(x2: Tensor, w: _nf4.NF4Weight, bias, lora_a, lora_b, scaling, dropout_p, seed,
            backend) -> tuple:
    """The custom op's positional arguments (tests/test_compile.py's opcheck sample uses it)."""
    return (x2, w.codes, w.absmax, w.code, w.absmax2, w.code2, float(w.offset), list(w.shape),
            w.dtype, int(w.blocksize), int(w.blocksize2), bias, lora_a, lora_b, scaling,
            dropout_p, seed, backend)


def lora_linear_nf4(x: Tensor, weight, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                    *, scaling: float = 1.0, dropout_p: float = 0.0, training: bool = True,
                    backend: str = "auto", dropout_seed: Optional[int] = None) -> Tensor:
    """``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with W0 ``[N, K]`` in NF4 storage (``weight``: an
    :class:`~lora_kernels.ops.nf4.NF4Weight` or a quantized bitsandbytes ``Params4bit``).

    Same contract as :func:`lora_kernels.lora_linear` otherwise (``x [..., K]``, fp32 LoRA
    weights with fp16/bf16 x are cast to x's dtype, dropout on the LoRA input only).
    ``backend="cuda"`` has no NF4 kernel and runs the Triton one."""
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., K], got a 0-D tensor")
    w = _as_nf4(weight)
    if w.dtype not in _DTYPES:
        raise TypeError(f"weight's storage dtype must be fp32/fp16/bf16, got {w.dtype}")
    N, K = w.shape
    x2, lead, scaling, dropout_p, name, seed = _quant_tiles.check_call(
        x, N, K, w.codes, bias, lora_a, lora_b, scaling, dropout_p, training, backend,
        dropout_seed, "an NF4 weight")
    dtype = x.dtype
    args = op_args(x2.contiguous(), w, V.dense(bias, dtype), V.dense(lora_a, dtype),
                   V.dense(lora_b, dtype), scaling, dropout_p, seed, name)
    if _backend.plain_eager(x, bias, lora_a, lora_b):
        y, _ = _forward(x2.contiguous(), w, *args[11:])
    else:
        y, _ = torch.ops.lora_kernels.lora_linear_nf4(*args)
    return y.reshape(*lead, N)
