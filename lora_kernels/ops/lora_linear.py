"""Fused single-adapter LoRA linear: contract, custom-op registration, autograd, dispatch.

``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``. The op saves ``x`` and the rank-sized ``xa = drop(x)·Aᵀ``
for the backward and, with dropout, the mask packed to 1 bit per element of x (uint8
``[M, ceil(K/8)]``, 1/16 of a bf16 x; docs/BACKENDS.md) when the backend's forward writes it
(``keep_bits`` argument): the backward then reads bits instead of redrawing Philox. A backend
without it (CUDA) saves an empty tensor and its backward regenerates the same mask from the seed.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels.ops import backend as _backend
from lora_kernels.ops import validation as V

EMPTY_GRAD = (0,)


def seed_int(seed: Optional[Tensor]) -> int:
    # The seed tensor lives on the CPU: reading it is not a device sync.
    return 0 if seed is None else int(seed.item())


@functools.lru_cache(maxsize=None)
def _takes_keep_bits(fn) -> bool:
    """Whether a kernel-level lora_linear_fwd/bwd has the optional ``keep_bits`` argument."""
    try:
        return "keep_bits" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _bits_shape(x: Tensor, dropout_p: float, backend: str) -> tuple[int, ...]:
    """Shape of the saved packed mask: ``[M, ceil(K/8)]`` when dropout is on and the backend's
    forward writes it, else ``[0]`` (nothing saved; the backward redraws)."""
    if dropout_p > 0.0 and x.shape[0] > 0 and _takes_keep_bits(
            _backend.kernel(backend, "lora_linear_fwd")):
        return (x.shape[0], (x.shape[1] + 7) // 8)
    return (0,)


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                    lora_b: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    bits = x.new_empty(_bits_shape(x, dropout_p, backend), dtype=torch.uint8)
    y, xa = _forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend,
                     bits if bits.dim() == 2 else None)
    return y, xa, bits


def _forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, keep_bits=None):
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, lora_a.shape[0])
    fwd = _backend.kernel(backend, "lora_linear_fwd")
    if keep_bits is not None:
        return fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_int(seed), None,
                   keep_bits=keep_bits)
    return fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_int(seed), None)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
    return (x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0]),
            x.new_empty(_bits_shape(x, dropout_p, backend), dtype=torch.uint8))


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor,
                             lora_b: Tensor, xa: Tensor, scaling: float, dropout_p: float,
                             seed: Optional[Tensor], needs: Sequence[bool],
                             backend: str, keep_bits: Optional[Tensor] = None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    grads = _grads(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, backend,
                   keep_bits)
    # custom ops cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if n else x.new_empty(EMPTY_GRAD) for g, n in zip(grads, needs))


def _grads(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, backend,
           keep_bits=None):
    if x.shape[0] == 0:
        return (torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros(weight.shape[0]),
                torch.zeros_like(lora_a), torch.zeros_like(lora_b))
    bwd = _backend.kernel(backend, "lora_linear_bwd")
    if keep_bits is not None and keep_bits.dim() == 2 and _takes_keep_bits(bwd):
        # the forward's packed mask: the same bits the seed would redraw
        return bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed_int(seed), needs,
                   keep_bits=keep_bits)
    return bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed_int(seed), needs)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, backend,
      keep_bits=None):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else EMPTY_GRAD) for s, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed, output[2])
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dy, _dxa, _dbits):
    x, weight, lora_a, lora_b, xa, seed, keep_bits = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.lora_kernels.lora_linear_backward(
        dy.contiguous(), x, weight, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed, needs,
        ctx.backend, keep_bits)
    out = [g if n else None for g, n in zip(grads, needs)]
    return (*out, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op machinery, for eager calls
    that record a graph (training). Same kernels, same saved tensors, same gradients; what it
    skips is the op's schema parsing, dispatcher round trips and the second (backward) custom
    op. Measured on the shared 2-core VM, 1 thread, K=N=256, r=16, M=1, fwd+bwd: 0.141 ms
    through the custom op, 0.075-0.093 ms this way (PEFT's layer: 0.085-0.095 ms).
    torch.compile, opcheck, dispatch modes, tensor subclasses and functorch transforms still go
    through the custom op (``_backend.eager_mode`` decides)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
        shape = _bits_shape(x, dropout_p, backend)
        bits = x.new_empty(shape, dtype=torch.uint8) if len(shape) == 2 else None
        y, xa = _forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend, bits)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, bits)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the custom op: no double backward
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, xa, bits = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        grads = _grads(dy.contiguous(), x, weight, lora_a, lora_b, xa, ctx.scaling,
                       ctx.dropout_p, ctx.seed, needs, ctx.backend, bits)
        return (*(g if n else None for g, n in zip(grads, needs)), None, None, None, None)


def draw_seed() -> Tensor:
    """A dropout seed from torch's CPU generator (so ``torch.manual_seed`` reproduces masks);
    a tensor, so ``torch.compile`` traces it instead of breaking the graph."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def check_lora_linear_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                           lora_b: Tensor, scaling, dropout_p, training):
    """Validate the arguments every single-adapter linear shares (:func:`lora_linear`,
    ``ops.dora.dora_linear``); return ``(x2 [M, K], lead shape, compute dtype, N, K, scaling,
    dropout_p)``, with ``dropout_p`` 0 outside training."""
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., K], got a 0-D tensor")
    V.tensor("weight", weight, 2)
    V.tensor("lora_a", lora_a, 2)
    V.tensor("lora_b", lora_b, 2)
    dtype = V.compute_dtype(x, weight)
    N, K = weight.shape
    x2, lead, scaling, dropout_p = check_lora_terms(x, N, K, weight, bias, lora_a, lora_b,
                                                    scaling, dropout_p, training)
    return x2, lead, dtype, N, K, scaling, dropout_p


def check_lora_terms(x: Tensor, N: int, K: int, weight_storage: Tensor, bias: Optional[Tensor],
                     lora_a: Tensor, lora_b: Tensor, scaling, dropout_p, training):
    """The checks of a ``[N, K]`` base weight's companions, whatever its storage (dense or
    NF4 codes, ``weight_storage`` for the device check): x, the factors, bias and the scalars.
    Returns ``(x2 [M, K], lead shape, scaling, dropout_p)``, ``dropout_p`` 0 outside training."""
    V.shape("x", x, (*x.shape[:-1], K), "[..., K]")
    V.shape("lora_a", lora_a, (None, K), "[r, K]")
    V.shape("lora_b", lora_b, (N, lora_a.shape[0]), "[N, r]")
    if bias is not None:
        V.tensor("bias", bias, 1)
        V.shape("bias", bias, (N,), "[N]")
    V.same_device("x", x, weight=weight_storage, bias=bias, lora_a=lora_a, lora_b=lora_b)
    scaling = V.scalar("scaling", scaling)
    dropout_p = V.scalar("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training:
        dropout_p = 0.0
    lead = x.shape[:-1]
    # not reshape(-1, K): ambiguous when K = 0. A 2-D x needs none (~2 µs a call at decode).
    x2 = x if x.dim() == 2 else x.reshape(math.prod(lead), K)
    V.check_index_math("x", x2.shape[0])
    return x2, lead, scaling, dropout_p


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                lora_b: Tensor, *, scaling: float = 1.0, dropout_p: float = 0.0,
                training: bool = True, backend: str = "auto",
                dropout_seed: Optional[int] = None) -> Tensor:
    """``y = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` in one fused pass (backend permitting).

    ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` or None, ``lora_a [r, K]``, ``lora_b [N, r]``.
    Differentiable in x, lora_a, lora_b (and weight/bias when they require grad). Dropout
    (probability ``dropout_p``, only when ``training``) applies to the LoRA branch input and
    the backward reuses the same mask; ``dropout_seed`` fixes it (default: drawn from torch's
    generator). ``lora_a``/``lora_b``/``bias`` may be fp32 with fp16/bf16 ``x`` (PEFT's default):
    they are cast to x's dtype and their gradients come back in their own dtype.
    """
    x2, lead, dtype, N, K, scaling, dropout_p = check_lora_linear_args(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    name = _backend.resolve_for(backend, x2, "lora_linear")
    seed = None
    if dropout_seed is not None:
        dropout_seed = check_seed(dropout_seed)
    if dropout_p > 0.0:
        seed = draw_seed() if dropout_seed is None else torch.tensor(dropout_seed, dtype=torch.int64)
    args = (x2.contiguous(), weight, V.dense(bias, dtype), V.dense(lora_a, dtype),
            V.dense(lora_b, dtype), scaling, dropout_p, seed, name)
    mode = _backend.eager_mode(x, weight, bias, lora_a, lora_b)
    if mode == _backend.EAGER_NO_GRAD:
        y, _ = _forward(*args)  # inference: skip the custom-op dispatch, same kernels, no bits
    elif mode == _backend.EAGER_GRAD:
        y = _EagerLoRALinear.apply(*args)
    else:
        y, _, _ = torch.ops.lora_kernels.lora_linear(*args)
    return y if x.dim() == 2 else y.reshape(*lead, N)


def check_seed(seed) -> int:
    if isinstance(seed, bool):
        raise TypeError("dropout_seed must be an int, got bool")
    try:
        seed = operator.index(seed)  # 1.5 or "7" is a mistake, not a seed to truncate
    except TypeError:
        raise TypeError(f"dropout_seed must be an int, got {type(seed).__name__}") from None
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"dropout_seed must fit in int64, got {seed}")
    return seed




def block_diag_lora_b(lora_b_slices: Sequence[Optional[Tensor]], out_slices: Sequence[int]) -> Tensor:
    """``lora_b`` of a packed projection as one ``[N, n_adapted·r]`` block-diagonal matrix.

    Slice j contributes its own ``[width_j, r]`` block (or zero rows where it is not adapted), so
    the packed layer is one fused ``lora_linear`` call with rank ``n_adapted·r``: the low-rank
    term of a column only ever sees its own slice's ranks. Differentiable: gradients flow back
    into each slice's block.
    """
    blocks = [b for b in lora_b_slices if b is not None]
    if not blocks:
        raise ValueError("lora_b_slices must hold at least one adapted slice")
    r = blocks[0].shape[1]
    cols, rows, g = len(blocks) * r, [], 0
    for b, width in zip(lora_b_slices, out_slices):
        if b is None:
            rows.append(blocks[0].new_zeros(width, cols))
            continue
        left = b.new_zeros(width, g * r)
        right = b.new_zeros(width, cols - (g + 1) * r)
        rows.append(torch.cat([left, b, right], dim=1))
        g += 1
    return torch.cat(rows, dim=0)
