"""DoRA linear (weight-decomposed LoRA, Liu et al. 2024): contract, custom ops, autograd.

PEFT's semantics (``use_dora=True``), the oracle being ``reference.dora_linear``::

    y = x·W0ᵀ + b + (c − 1)⊙(drop(x)·W0ᵀ) + c⊙s·(drop(x)·Aᵀ)·Bᵀ,   c_n = m_n / ‖W0_n + s·(B·A)_n‖

with the norm detached (paper §4.3). Without dropout (inference, or p = 0) that is
``y = b + c⊙(x·W0ᵀ + s·(x·Aᵀ)·Bᵀ)``: the fused LoRA GEMM with a per-column scale in its epilogue.
With dropout PEFT feeds the dropped input to the (c − 1) base term as well, so the op computes
``dora(drop(x)) + (x − drop(x))·W0ᵀ``: one more base GEMM, which those semantics need.

**No N×K temporary.** The norm is expanded as

    ‖W0_n + s·(BA)_n‖² = ‖W0_n‖² + 2s·⟨B_n, (W0·Aᵀ)_n⟩ + s²·B_n (A·Aᵀ) B_nᵀ

``‖W0_n‖²`` comes in as ``weight_sq_norm`` (modules cache it per frozen weight, see
:func:`row_sq_norm`); ``W0·Aᵀ`` ``[N, r]`` is one skinny GEMM per call and ``A·Aᵀ`` is
``[r, r]``. Everything is accumulated in fp32 (float64 for float64 inputs). Numerics: the
expansion subtracts nothing as long as ``s·B·A`` is small against W0 (DoRA's regime, B starts at
zero); if an update cancels a row of W0 (``W0_n + s·(BA)_n ≈ 0``) the sum of three terms loses
the bits the direct norm keeps - relative error ≈ ε·‖W0_n‖²/‖W0_n + s(BA)_n‖² - and it is clamped
at 0 (a norm of 0 gives c = ±inf, as m/0 does in PEFT). tests/test_dora.py compares it with the
direct norm in float64.

**Backward** (``dy`` the output gradient, ``g = dy⊙c``): the LoRA backward kernels on ``g``
give dx, dA, dB (and dW); ``db = Σ dy``; the magnitude's gradient comes from the saved output:
``dm_n = Σ_m dy_mn (y_mn − b_n) / m_n`` (= Σ dy·pre-scale / norm), so nothing M×N besides the
output itself is saved. A column with ``m_n = 0`` exactly has no pre-scale value in y: it is
recomputed for those columns only (a device sync on CUDA to find them; never in practice, DoRA
initialises m to the row norms).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels import reference
from lora_kernels.ops import backend as _backend
from lora_kernels.ops import validation as V
from lora_kernels.ops.lora_linear import check_lora_linear_args, draw_seed

_EMPTY = (0,)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms, scales and magnitudes: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_sq_norm(weight: Tensor) -> Tensor:
    """``‖W0_n‖²`` per output row of ``weight [N, K]`` (any strides), detached, in
    :func:`accumulate_dtype`. W0 is frozen, so callers compute it once and pass it to every
    :func:`dora_linear` call (``weight_sq_norm=``)."""
    with torch.no_grad():
        acc = accumulate_dtype(weight.dtype)
        return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


def weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """``‖W0_n + s·(B·A)_n‖`` per output row, detached, from rank-sized pieces (what the op
    computes each call): for initialising magnitudes and for merges. Validated by the caller."""
    with torch.no_grad():
        acc = accumulate_dtype(weight.dtype)
        wsq = row_sq_norm(weight) if weight_sq_norm is None else weight_sq_norm.to(acc)
        return _weight_norm(weight, wsq, lora_a.to(weight.dtype), lora_b.to(weight.dtype),
                            float(scaling), "torch")


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())  # a CPU tensor: no device sync


def _weight_norm(weight, wsq, lora_a, lora_b, scaling, backend) -> Tensor:
    """``‖W0_n + s·(B·A)_n‖`` from rank-sized pieces (see the module doc), detached."""
    acc = wsq.dtype
    wa = _backend.kernel(backend, "dora_weight_a")(weight, lora_a).to(acc)  # W0·Aᵀ [N, r]
    a, b = lora_a.to(acc), lora_b.to(acc)
    cross = (b * wa).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    sq = wsq + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return sq.clamp_min(0.0).sqrt()


def _dropped(backend, x, dropout_p, seed):
    """``(keep, drop(x))``: the backend's Philox mask (regenerated in the backward, never
    stored) and the dropped input; ``(None, x)`` without dropout."""
    if dropout_p <= 0.0:
        return None, x
    keep = _backend.kernel(backend, "dropout_keep_mask")(_seed(seed), x.shape[0], x.shape[1],
                                                         dropout_p, x.device)
    return keep, reference.apply_keep(x, keep, dropout_p)


@torch.library.custom_op("lora_kernels::dora_linear", mutates_args=())
def _dora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                    lora_b: Tensor, magnitude: Tensor, weight_sq_norm: Optional[Tensor],
                    dora_norm: Optional[Tensor], scaling: float,
                    dropout_p: float, seed: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, xa, norm, y_dora)``; ``y_dora`` (the output before the dropout correction
    ``(x − drop(x))·W0ᵀ``) is saved for dm when dropout is on, else empty."""
    return _forward(x, weight, bias, lora_a, lora_b, magnitude, weight_sq_norm, dora_norm,
                    scaling, dropout_p, seed, backend)


def _forward(x, weight, bias, lora_a, lora_b, magnitude, wsq, dora_norm, scaling, dropout_p,
             seed, backend):
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    if dora_norm is not None:  # the caller's cached norm (an output must not alias an input)
        norm = dora_norm.clone()
    else:
        norm = _weight_norm(weight, wsq, lora_a, lora_b, scaling, backend)
    if M == 0:
        return (x.new_empty(0, N), x.new_empty(0, r), norm,
                x.new_empty((0, N) if dropout_p > 0.0 else _EMPTY))
    keep, xd = _dropped(backend, x, dropout_p, seed)
    y, xa = _backend.kernel(backend, "dora_linear_fwd")(xd, weight, bias, lora_a, lora_b,
                                                        magnitude / norm, scaling)
    if keep is None:
        return y, xa, norm, x.new_empty(_EMPTY)
    # PEFT: the base term outside the (c − 1) factor sees the undropped x.
    return torch.addmm(y, x - xd, weight.t()), xa, norm, y


@_dora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, weight_sq_norm, dora_norm, scaling, dropout_p,
      seed, backend):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty(M, N), x.new_empty(M, lora_a.shape[0]), magnitude.new_empty(N),
            x.new_empty((M, N) if dropout_p > 0.0 else _EMPTY))


@torch.library.custom_op("lora_kernels::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, xa: Tensor,
                             norm: Tensor, y_pre: Tensor, scaling: float, dropout_p: float,
                             seed: Optional[Tensor], needs: Sequence[bool], backend: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    if x.shape[0] == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(weight), dy.new_zeros(weight.shape[0]),
                 torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(magnitude))
    else:
        grads = _backward_grads(dy, x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre,
                                scaling, dropout_p, seed, needs, backend)
    # custom ops cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if n else x.new_empty(_EMPTY) for g, n in zip(grads, needs))


def _backward_grads(dy, x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre, scaling,
                    dropout_p, seed, needs, backend):
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    keep, xd = _dropped(backend, x, dropout_p, seed)
    dx = dw = db = da = dbb = dm = None
    need_g = need_x or need_w or need_a or need_bb
    # One pass over dy (and y): g = dy⊙c for the LoRA backward, Σ_m dy·(y − b) for dm.
    g, dot = _backend.kernel(backend, "dora_scale_grad")(dy, y_pre, bias, magnitude / norm,
                                                         need_g, need_m)
    if need_g:
        dx, dw, _, da, dbb = _backend.kernel(backend, "lora_linear_bwd")(
            g, xd, weight, lora_a, lora_b, xa, scaling, 0.0, 0,
            (need_x, need_w, False, need_a, need_bb))
        if keep is not None:  # the (x − drop(x))·W0ᵀ term of the forward
            if need_x:
                dyw = dy @ weight
                dx = dyw + reference.apply_keep(dx - dyw, keep, dropout_p)
            if need_w:
                dw = dw.addmm_(dy.t(), x - xd)
    if need_b:
        db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype)
    if need_m:
        dm = _magnitude_grad(dy, dot, magnitude, norm, xd, weight, lora_b, xa, scaling)
    return dx, dw, db, da, dbb, dm


def _magnitude_grad(dy, dot, magnitude, norm, xd, weight, lora_b, xa, scaling):
    """``dm_n = Σ_m dy_mn (y_mn − b_n) / m_n`` (``dot`` is the sum); columns with ``m_n = 0``
    recompute their pre-scale output ``xd·W0_nᵀ + s·xa·B_nᵀ`` (only those) and divide by the
    norm."""
    acc = magnitude.dtype
    dm = dot.to(acc) / magnitude
    zero = magnitude == 0
    if bool(zero.any()):
        cols = zero.nonzero().flatten()
        z = F.linear(xd, weight.index_select(0, cols))
        z = z + scaling * F.linear(xa, lora_b.index_select(0, cols))
        dm[cols] = (dy.index_select(1, cols) * z).sum(0, dtype=acc) / norm[cols]
    return dm


@_dora_linear_backward_op.register_fake
def _(dy, x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre, scaling, dropout_p, seed,
      needs, backend):
    shapes = (x, weight, dy.new_empty(weight.shape[0]), lora_a, lora_b, magnitude)
    return tuple(t.new_empty(t.shape) if n else x.new_empty(_EMPTY) for t, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, _wsq, _norm, scaling, dropout_p, seed, backend = \
        inputs
    y, xa, norm, y_dora = output
    y_pre = y_dora if dropout_p > 0.0 else y
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(xa, norm, y_dora)


def _backward(ctx, dy, _dxa, _dnorm, _dy_dora):
    x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.lora_kernels.dora_linear_backward(
        dy.contiguous(), x, weight, bias, lora_a, lora_b, magnitude, xa, norm, y_pre,
        ctx.scaling, ctx.dropout_p, seed, needs, ctx.backend)
    out = [g if n else None for g, n in zip(grads, needs)]
    return (*out, None, None, None, None, None, None)


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                lora_b: Tensor, magnitude: Tensor, *, scaling: float = 1.0,
                dropout_p: float = 0.0, training: bool = True, backend: str = "auto",
                weight_sq_norm: Optional[Tensor] = None,
                dora_norm: Optional[Tensor] = None) -> Tensor:
    """PEFT's DoRA linear (see the module doc) without an N×K temporary.

    ``x [..., K]``, ``weight [N, K]`` (any strides: a Conv1D's ``[K, N]`` weight as ``.t()``),
    ``bias [N]`` or None, ``lora_a [r, K]``, ``lora_b [N, r]``, ``magnitude [N]`` (PEFT's
    ``lora_magnitude_vector``). Differentiable in x, lora_a, lora_b, magnitude (and weight/bias
    when they require grad; the norm is detached). Dropout (``dropout_p``, only when
    ``training``) follows PEFT. ``weight_sq_norm [N]``: ``‖W0_n‖²`` from
    :func:`row_sq_norm`, to skip recomputing it (a pass over W0) on every call; it must
    belong to this ``weight``. ``dora_norm [N]``: ``‖W0_n + s·(B·A)_n‖`` itself (from
    :func:`weight_norm`) for exactly these weights, e.g. cached while they do not change: skips
    the per-call norm, whose ``W0·Aᵀ`` reads all of W0 (at decode sizes as much traffic as the
    base GEMM). Factors, bias and magnitude may be fp32 with fp16/bf16 ``x``.
    """
    x2, lead, dtype, N, K, scaling, dropout_p = check_lora_linear_args(
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    V.tensor("magnitude", magnitude, 1)
    V.shape("magnitude", magnitude, (N,), "[N]")
    if weight_sq_norm is not None:
        V.tensor("weight_sq_norm", weight_sq_norm, 1)
        V.shape("weight_sq_norm", weight_sq_norm, (N,), "[N]")
    if dora_norm is not None:
        V.tensor("dora_norm", dora_norm, 1)
        V.shape("dora_norm", dora_norm, (N,), "[N]")
    V.same_device("x", x, magnitude=magnitude, weight_sq_norm=weight_sq_norm, dora_norm=dora_norm)
    name = _backend.resolve_for(backend, x2, "dora_linear")
    acc = accumulate_dtype(dtype)
    norm = None if dora_norm is None else dora_norm.detach().to(acc).contiguous()
    wsq = None
    if norm is None:
        wsq = row_sq_norm(weight) if weight_sq_norm is None else \
            weight_sq_norm.detach().to(acc).contiguous()
    seed = draw_seed() if dropout_p > 0.0 else None
    args = (x2.contiguous(), weight, V.dense(bias, dtype), V.dense(lora_a, dtype),
            V.dense(lora_b, dtype), V.dense(magnitude, acc), wsq, norm, scaling, dropout_p, seed,
            name)
    if _backend.plain_eager(x, weight, bias, lora_a, lora_b, magnitude):
        y = _forward(*args)[0]  # inference: skip the custom-op dispatch, same kernels
    else:
        y = torch.ops.lora_kernels.dora_linear(*args)[0]
    return y.reshape(*lead, N)
