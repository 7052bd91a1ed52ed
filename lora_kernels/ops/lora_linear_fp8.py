"""Fused LoRA linear over a frozen FP8 e4m3 base weight with one fp32 scale per output channel
(:class:`lora_kernels.ops.fp8.FP8Weight`): contract, custom op, autograd, dispatch.

``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with ``W0[n, k] = e4m3(codes[n, k])·scale[n]``. W0 is
frozen: gradients flow to x, lora_a, lora_b and bias.

Backends: ``triton`` (and ``cuda``, whose extension has no FP8 kernel: its Triton fallback)
decodes the e4m3 bytes inside the GEMM core's K loop (forward and dX on the ``Wᵀ`` view of the
same bytes, no N×K tensor); ``torch`` dequantizes ``quant_tiles.ROWS_PER_TILE`` rows at a time.
The activations stay in x's dtype (weight-only FP8) unless ``act_quant="e4m3_per_token"``:
then x is rounded to e4m3 per token (one fp32 scale per row) and the base GEMM runs fp8 x fp8
(wgmma e4m3 on sm_90: twice the bf16 MMA rate) with ``row_scale[m]·scale[n]`` in its epilogue;
the LoRA term still uses the unquantized x. That costs ≈ 2⁻⁴ relative error per element of x
(‖Δy‖/‖y‖ ≈ 2-3 %), far outside the bf16 1e-2 contract, hence opt-in. Its backward is the
weight-only one (dX = dY·W in dY's dtype; straight-through for the activation rounding).

The storage travels through the custom op as plain tensors: the codes as their uint8 bytes
``[N, K]`` and the fp32 ``scale [N]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops import fp8 as _fp8
from lora_kernels.ops import quant_tiles as _quant_tiles
from lora_kernels.ops import validation as V
from lora_kernels.ops.lora_linear import EMPTY_GRAD, seed_int

__all__ = ["lora_linear_fp8"]


def _impl(backend: str, fn: str):
    if backend == "triton":
        from lora_kernels.triton import quant_lora
        return getattr(quant_lora, {"fwd": "quant_lora_fwd", "bwd": "quant_lora_bwd"}[fn])
    return {"fwd": _quant_tiles.lora_fwd, "bwd": _quant_tiles.lora_bwd}[fn]


def _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, act_quant="none"):
    if x.shape[0] == 0:
        return x.new_empty(0, w.codes.shape[0]), x.new_empty(0, lora_a.shape[0])
    return _impl(backend, "fwd")(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed_int(seed),
                                 act_quant)


@torch.library.custom_op("lora_kernels::lora_linear_fp8", mutates_args=())
def _fp8_op(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], lora_a: Tensor,
            lora_b: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
            backend: str, act_quant: str) -> tuple[Tensor, Tensor]:
    w = _fp8.FP8Weight(codes=codes, scale=scale)
    return _forward(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, act_quant)


@_fp8_op.register_fake
def _(x, codes, scale, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, act_quant):
    return x.new_empty(x.shape[0], codes.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("lora_kernels::lora_linear_fp8_backward", mutates_args=())
def _fp8_backward_op(dy: Tensor, x: Tensor, codes: Tensor, scale: Tensor, lora_a: Tensor,
                     lora_b: Tensor, xa: Tensor, scaling: float, dropout_p: float,
                     seed: Optional[Tensor], needs: Sequence[bool],
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    N = codes.shape[0]
    if x.shape[0] == 0:
        grads = (torch.zeros_like(x), x.new_zeros(N), torch.zeros_like(lora_a),
                 torch.zeros_like(lora_b))
    else:
        w = _fp8.FP8Weight(codes=codes, scale=scale)
        grads = _impl(backend, "bwd")(dy, x, w, lora_a, lora_b, xa, scaling, dropout_p,
                                      seed_int(seed), needs)
    return tuple(g if n else x.new_empty(EMPTY_GRAD) for g, n in zip(grads, needs))


@_fp8_backward_op.register_fake
def _(dy, x, codes, scale, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, backend):
    shapes = (x.shape, (codes.shape[0],), lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else EMPTY_GRAD) for s, n in zip(shapes, needs))


# Positions of the differentiable inputs of the forward op: x, bias, lora_a, lora_b.
_GRAD_INPUTS = (0, 3, 4, 5)


def _setup_context(ctx, inputs, output):
    x, codes, scale, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, _act = inputs
    ctx.save_for_backward(x, codes, scale, lora_a, lora_b, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dxa):
    x, codes, scale, lora_a, lora_b, xa, seed = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = torch.ops.lora_kernels.lora_linear_fp8_backward(
        dy.contiguous(), x, codes, scale, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed,
        needs, ctx.backend)
    dx, db, da, dbb = (g if n else None for g, n in zip(grads, needs))
    return (dx, None, None, db, da, dbb, None, None, None, None, None)


_fp8_op.register_autograd(_backward, setup_context=_setup_context)


def op_args(x2: Tensor, w: _fp8.FP8Weight, bias, lora_a, lora_b, scaling, dropout_p, seed,
            backend, act_quant: str = "none") -> tuple:
    """The custom op's positional arguments (tests/test_compile.py's opcheck sample uses it)."""
    return (x2, _fp8.codes_u8(w), w.scale, bias, lora_a, lora_b, scaling, dropout_p, seed,
            backend, act_quant)


def lora_linear_fp8(x: Tensor, weight: _fp8.FP8Weight, bias: Optional[Tensor], lora_a: Tensor,
                    lora_b: Tensor, *, scaling: float = 1.0, dropout_p: float = 0.0,
                    training: bool = True, backend: str = "auto",
                    dropout_seed: Optional[int] = None,
                    act_quant: Optional[str] = None) -> Tensor:
    """``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with W0 ``[N, K]`` an e4m3 weight with a per-row
    fp32 scale (``weight``: :class:`~lora_kernels.ops.fp8.FP8Weight`; ``fp8.quantize_fp8``
    makes one, ``nn.FP8Linear.from_compressed_tensors`` reads a checkpoint's).

    Same contract as :func:`lora_kernels.lora_linear` otherwise (``x [..., K]``, fp32 LoRA
    weights with fp16/bf16 x are cast to x's dtype, dropout on the LoRA input only).
    ``backend="cuda"`` has no FP8 kernel and runs the Triton one.

    ``act_quant``: None (weight-only FP8, the default) or ``"e4m3_per_token"`` (x rounded to
    e4m3 with one scale per row, fp8 x fp8 MMA; ≈ 2-3 % relative error, see the module doc).
    The backward is the same in both."""
    act = _fp8.check_act_quant(act_quant)
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., K], got a 0-D tensor")
    w = _fp8.check_fp8("weight", weight)
    N, K = w.codes.shape
    x2, lead, scaling, dropout_p, name, seed = _quant_tiles.check_call(
        x, N, K, w.codes, bias, lora_a, lora_b, scaling, dropout_p, training, backend,
        dropout_seed, "an FP8 weight")
    dtype = x.dtype
    args = op_args(x2.contiguous(), w, V.dense(bias, dtype), V.dense(lora_a, dtype),
                   V.dense(lora_b, dtype), scaling, dropout_p, seed, name, act)
    if _backend.plain_eager(x, bias, lora_a, lora_b):
        y, _ = _forward(args[0], w, *args[3:])
    else:
        y, _ = torch.ops.lora_kernels.lora_linear_fp8(*args)
    return y.reshape(*lead, N)
