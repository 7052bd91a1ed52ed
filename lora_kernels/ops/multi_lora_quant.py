"""Heterogeneous multi-adapter LoRA over a frozen *quantized* base weight: FP8 e4m3 with one
scale per output channel (:class:`~lora_kernels.ops.fp8.FP8Weight`) or bitsandbytes NF4
(:class:`~lora_kernels.ops.nf4.NF4Weight`).

``y[t] = x[t]·W0ᵀ + b + s_i·(x[t]·A_iᵀ)·B_iᵀ`` with ``i = adapter_ids[t]`` (``-1``: base only),
exactly :func:`lora_kernels.multi_lora_linear`'s contract with ``weight`` quantized and frozen
(gradients flow to x, bias, lora_a, lora_b). LoRA dropout per slot uses the per-token mask of
:mod:`~lora_kernels.ops.multi_lora_dropout`, composed around the quantized base GEMM (the
base reads plain x, the shrink ``drop(x)``, the dX low-rank part is masked alike).

Backends: ``triton`` (and ``cuda``, whose extension has no quantized kernel: its Triton
fallback, as for the NF4 single-adapter op) decodes W in the GEMM core's K loop — prefill on
the fused multi-adapter GEMM (``multi_gemm_kernel`` with the quantized spec), decode as the
split-K quantized GEMM plus the planned shrink/expand, dX on the packed storage's Wᵀ view;
``torch`` dequantizes ``ROWS_PER_TILE`` rows of W at a time. No N×K tensor on any path.

The storage travels through the custom ops as plain tensors (``codes`` and up to four
tables) plus ``qmeta = [kind, N, K, blocksize, blocksize2]``, ``offset`` and the storage dtype,
so ``torch.compile`` sees tensors only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels import reference
from lora_kernels.ops import backend as _backend
from lora_kernels.ops import nf4 as _nf4
from lora_kernels.ops import validation as V
from lora_kernels.ops.batch import LoRABatch
from lora_kernels.ops.fp8 import FP8Weight
from lora_kernels.ops import multi_lora_dropout as _drop
from lora_kernels.ops.lora_linear import check_seed, draw_seed, seed_int
from lora_kernels.ops.quant_tiles import ROWS_PER_TILE, dequantize_rows, row_tiles

__all__ = ["is_quantized", "quant_multi_lora_linear", "dequantize_rows", "ROWS_PER_TILE"]

_EMPTY = (0,)
_FP8, _NF4 = 0, 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_quantized(weight) -> bool:
    return isinstance(weight, (FP8Weight, _nf4.NF4Weight))


def _parts(w):
    """``(codes, q1, q2, q3, q4, qmeta, offset, storage dtype)`` of a quantized weight."""
    N, K = (int(s) for s in w.shape)
    if isinstance(w, FP8Weight):  # codes: float8_e4m3fn or its uint8 bytes, as given
        return (w.codes, w.scale, None, None, None, [_FP8, N, K, 1, 1], 0.0, torch.float32)
    return (w.codes, w.absmax, w.code, w.absmax2, w.code2,
            [_NF4, N, K, int(w.blocksize), int(w.blocksize2)], float(w.offset), w.dtype)


def _weight(codes, q1, q2, q3, q4, qmeta, offset, wdtype):
    kind, N, K, bs, bs2 = (int(v) for v in qmeta)
    if kind == _FP8:
        return FP8Weight(codes=codes, scale=q1)
    return _nf4.NF4Weight(codes=codes, absmax=q1, code=q2, shape=(N, K), dtype=wdtype,
                          blocksize=bs, absmax2=q3, code2=q4, offset=offset, blocksize2=bs2)


# ------------------------------------------------------------------------------------------
# The torch path (any device): W by row tiles, the low-rank terms from the reference
# ------------------------------------------------------------------------------------------
def _host_rank(ranks, slot: int, j: int, R: int) -> int:
    if ranks is None:
        return R
    r = ranks[slot]
    return int(r[j] if isinstance(r, list) else r)


def _bounds(out_slices, N: int):
    widths = list(out_slices) if out_slices is not None else [N]
    edges = [0]
    for wd in widths:
        edges.append(edges[-1] + wd)
    return list(zip(edges[:-1], edges[1:]))


def torch_base(x, w, bias):
    """``x·Wᵀ + b`` with W dequantized ``ROWS_PER_TILE`` rows at a time."""
    N = w.shape[0]
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    for n0, n1 in row_tiles(N):
        wt = dequantize_rows(w, n0, n1, x.dtype)
        if bias is not None:
            torch.addmm(bias[n0:n1], x, wt.t(), out=y[:, n0:n1])
        else:
            torch.mm(x, wt.t(), out=y[:, n0:n1])
    return y


def torch_base_dx(dy, w, dx=None):
    """``dx (+)= dY·W`` by the same row tiles (a fresh zero dx when None)."""
    N, K = w.shape
    if dx is None:
        dx = torch.zeros(dy.shape[0], K, dtype=dy.dtype, device=dy.device)
    for n0, n1 in row_tiles(N):
        dx.addmm_(dy[:, n0:n1], dequantize_rows(w, n0, n1, dy.dtype))
    return dx


def torch_fwd(x, w, bias, lora_a, lora_b, scalings, ranks, batch, out_slices, need_xa):
    y = torch_base(x, w, bias)
    n_slices = 1 if out_slices is None else len(out_slices)
    xa = reference.lora_shrink(x, lora_a, batch.adapter_ids, scalings, ranks, n_slices)
    reference.lora_expand(y, xa, lora_b, batch.adapter_ids, ranks, out_slices)
    return y, (xa if need_xa else None)


def torch_bwd(dy, x, w, lora_a, lora_b, xa, scalings, ranks, batch, out_slices, needs):
    """``(dx, dw=None, dbias, dlora_a, dlora_b)``; W is frozen."""
    need_x, _need_w, need_b, need_a, need_bb = needs
    N, K = w.shape
    R = lora_b.shape[2]
    # dA, dB (and db) from the reference; without dx / dW it reads only weight.shape[0], so
    # an empty [N, 0] stand-in carries it.
    no_w = dy.new_empty(N, 0)
    sc = scalings.tolist()  # the torch (CPU reference) path: host values, read once
    rk = None if ranks is None else ranks.tolist()
    _, _, db, da, dbb = reference.multi_lora_backward(
        dy, x, no_w, lora_a, lora_b, sc, batch.groups(),
        (False, False, need_b, need_a, need_bb), rk, out_slices, xa)
    dx = None
    if need_x:
        acc = torch.promote_types(dy.dtype, torch.float32)
        low = torch.zeros(x.shape[0], K, dtype=acc, device=x.device)
        for slot, rows in batch.groups():
            for j, (c0, c1) in enumerate(_bounds(out_slices, N)):
                r = _host_rank(rk, slot, j, R)
                if r == 0:
                    continue
                u = (dy[rows, c0:c1].to(acc) @ lora_b[slot, c0:c1, :r].to(acc)) * float(sc[slot])
                low.index_add_(0, rows, u @ lora_a[slot, j * R:j * R + r].to(acc))
        dx = torch_base_dx(dy, w, low.to(dy.dtype))
    return dx, None, db, da, dbb


def _kernels(backend: str) -> str:
    """The backend whose kernels run: the extension has no quantized kernel (its fallback)."""
    return "triton" if backend in ("triton", "cuda") else "torch"


def _impl(backend: str, fn: str):
    if _kernels(backend) == "triton":
        from lora_kernels.triton import multi_lora as _tm
        return {"fwd": _tm.multi_lora_fwd, "bwd": _tm.multi_lora_bwd, "base": _tm.base_gemm,
                "base_dx": _tm.base_dx}[fn]
    return {"fwd": torch_fwd, "bwd": torch_bwd, "base": torch_base, "base_dx": torch_base_dx}[fn]


# ------------------------------------------------------------------------------------------
# LoRA dropout (per-slot p, the per-token mask of ops/multi_lora_dropout.py, regenerated from
# the seed in the backward): that module's composed path around the quantized base GEMM
# ------------------------------------------------------------------------------------------
def _keep(backend, x, batch, dropout_p, seed):
    if dropout_p is None:
        return None
    return _drop.token_keep_mask(_kernels(backend), seed_int(seed), batch.adapter_ids,
                                 x.shape[1], tuple(float(p) for p in dropout_p))


def _dropout_fwd(backend, x, w, bias, lora_a, lora_b, scalings, ranks, batch, slices, keep,
                 dropout_p):
    name = _kernels(backend)
    n_slices = 1 if slices is None else len(slices)
    xd = _drop.apply_keep(x, keep, _drop.row_scale(batch.adapter_ids, dropout_p, x.dtype))
    y = _impl(backend, "base")(x, w, bias)
    xa = _backend.kernel(name, "lora_shrink")(xd, lora_a, batch, scalings, ranks, n_slices)
    y = _backend.kernel(name, "lora_expand")(y, xa, lora_b, batch, ranks, slices)
    return y, xa


def _dropout_bwd(backend, dy, x, w, lora_a, lora_b, xa, scalings, ranks, batch, slices,
                 needs, keep, dropout_p):
    need_x, need_b, need_a, need_bb = needs
    name = _kernels(backend)
    n_slices = 1 if slices is None else len(slices)
    N = int(w.shape[0])
    scale = _drop.row_scale(batch.adapter_ids, dropout_p, x.dtype)
    db = da = dbb = dx = None
    if need_a or need_bb or need_b:
        xd = _drop.apply_keep(x, keep, scale)
        # without dx / dW the backends read only weight.shape[0]: an empty [N, 0] stand-in
        _, _, db, da, dbb = _backend.kernel(name, "multi_lora_bwd")(
            dy, xd, dy.new_empty(N, 0), lora_a, lora_b, xa, scalings, ranks, batch, slices,
            (False, False, need_b, need_a, need_bb))
    if need_x:
        u = _backend.kernel(name, "lora_shrink")(dy, _drop.transposed_b(lora_b, slices), batch,
                                                 scalings, ranks, n_slices)
        low = _backend.kernel(name, "lora_expand")(
            torch.zeros_like(x), u, _drop.transposed_a(lora_a, ranks, n_slices), batch, None,
            None)
        dx = _drop.apply_keep(low, keep, scale) + _impl(backend, "base_dx")(dy, w)
    return dx, db, da, dbb


# ------------------------------------------------------------------------------------------
# Custom ops and autograd
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::multi_lora_linear_quant", mutates_args=())
def _q_op(x: Tensor, codes: Tensor, q1: Optional[Tensor], q2: Optional[Tensor],
          q3: Optional[Tensor], q4: Optional[Tensor], qmeta: Sequence[int], offset: float,
          wdtype: torch.dtype, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
          scalings: Tensor, ranks: Optional[Tensor], adapter_ids: Tensor,
          sorted_token_ids: Tensor, seg_offsets: Tensor, active_slots: Tensor,
          tile_map: Tensor, batch_ints: Sequence[int], out_slices: Optional[Sequence[int]],
          need_xa: bool, dropout_p: Optional[Sequence[float]], seed: Optional[Tensor],
          backend: str) -> tuple[Tensor, Tensor]:
    w = _weight(codes, q1, q2, q3, q4, qmeta, offset, wdtype)
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    return _forward(x, w, bias, lora_a, lora_b, scalings, ranks, batch, out_slices, need_xa,
                    backend, dropout_p, seed)


def _forward(x, w, bias, lora_a, lora_b, scalings, ranks, batch, out_slices, need_xa, backend,
             dropout_p=None, seed=None):
    slices = None if out_slices is None else tuple(out_slices)
    keep = _keep(backend, x, batch, dropout_p, seed)
    if keep is not None:
        y, xa = _dropout_fwd(backend, x, w, bias, lora_a, lora_b, scalings, ranks, batch,
                             slices, keep, tuple(float(p) for p in dropout_p))
    else:
        y, xa = _impl(backend, "fwd")(x, w, bias, lora_a, lora_b, scalings, ranks, batch,
                                      slices, need_xa)
    if not need_xa or xa is None:
        xa = x.new_empty(_EMPTY, dtype=torch.float32)
    return y, xa


@_q_op.register_fake
def _(x, codes, q1, q2, q3, q4, qmeta, offset, wdtype, bias, lora_a, lora_b, scalings, ranks,
      adapter_ids, sorted_token_ids, seg_offsets, active_slots, tile_map, batch_ints,
      out_slices, need_xa, dropout_p, seed, backend):
    xa_shape = (x.shape[0], lora_a.shape[1]) if need_xa else _EMPTY
    return (x.new_empty(x.shape[0], int(qmeta[1])),
            x.new_empty(xa_shape, dtype=torch.promote_types(x.dtype, torch.float32)))


@torch.library.custom_op("lora_kernels::multi_lora_linear_quant_backward", mutates_args=())
def _q_backward_op(dy: Tensor, x: Tensor, codes: Tensor, q1: Optional[Tensor],
                   q2: Optional[Tensor], q3: Optional[Tensor], q4: Optional[Tensor],
                   qmeta: Sequence[int], offset: float, wdtype: torch.dtype, lora_a: Tensor,
                   lora_b: Tensor, xa: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                   adapter_ids: Tensor, sorted_token_ids: Tensor, seg_offsets: Tensor,
                   active_slots: Tensor, tile_map: Tensor, batch_ints: Sequence[int],
                   out_slices: Optional[Sequence[int]], needs: Sequence[bool],
                   dropout_p: Optional[Sequence[float]], seed: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = _weight(codes, q1, q2, q3, q4, qmeta, offset, wdtype)
    batch = LoRABatch.from_parts(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                                 tile_map, batch_ints)
    need_x, need_b, need_a, need_bb = (bool(n) for n in needs)
    slices = None if out_slices is None else tuple(out_slices)
    xa_in = xa if xa.numel() else None
    keep = _keep(backend, x, batch, dropout_p, seed)  # the forward's mask, from its seed
    if keep is not None:
        grads = _dropout_bwd(backend, dy, x, w, lora_a, lora_b, xa_in, scalings, ranks, batch,
                             slices, (need_x, need_b, need_a, need_bb), keep,
                             tuple(float(p) for p in dropout_p))
    else:
        dx, _, db, da, dbb = _impl(backend, "bwd")(dy, x, w, lora_a, lora_b, xa_in, scalings,
                                                   ranks, batch, slices,
                                                   (need_x, False, need_b, need_a, need_bb))
        grads = (dx, db, da, dbb)
    return tuple(g if n else x.new_empty(_EMPTY) for g, n in zip(grads, (need_x, need_b,
                                                                        need_a, need_bb)))


@_q_backward_op.register_fake
def _(dy, x, codes, q1, q2, q3, q4, qmeta, offset, wdtype, lora_a, lora_b, xa, scalings, ranks,
      adapter_ids, sorted_token_ids, seg_offsets, active_slots, tile_map, batch_ints,
      out_slices, needs, dropout_p, seed, backend):
    shapes = (x.shape, (int(qmeta[1]),), lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if n else _EMPTY) for s, n in zip(shapes, needs))


# Positions of the differentiable inputs of the forward op: x, bias, lora_a, lora_b.
_GRAD_INPUTS = (0, 9, 10, 11)
_N_INPUTS = 25


def _setup_context(ctx, inputs, output):
    (x, codes, q1, q2, q3, q4, qmeta, offset, wdtype, bias, lora_a, lora_b, scalings, ranks,
     ids, order, offsets, active, tiles, ints, out_slices, need_xa, dropout_p, seed,
     backend) = inputs
    ctx.save_for_backward(x, codes, q1, q2, q3, q4, lora_a, lora_b, output[1], scalings, ranks,
                          ids, order, offsets, active, tiles, seed)
    ctx.meta = (list(qmeta), offset, wdtype, list(ints), out_slices,
                None if dropout_p is None else list(dropout_p), backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dxa):
    (x, codes, q1, q2, q3, q4, lora_a, lora_b, xa, scalings, ranks, ids, order, offsets, active,
     tiles, seed) = ctx.saved_tensors
    qmeta, offset, wdtype, ints, out_slices, dropout_p, backend = ctx.meta
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = torch.ops.lora_kernels.multi_lora_linear_quant_backward(
        dy.contiguous(), x, codes, q1, q2, q3, q4, qmeta, offset, wdtype, lora_a, lora_b, xa,
        scalings, ranks, ids, order, offsets, active, tiles, ints, out_slices, needs,
        dropout_p, seed, backend)
    out = [None] * _N_INPUTS
    for i, g, n in zip(_GRAD_INPUTS, grads, needs):
        out[i] = g if n else None
    return tuple(out)


_q_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public entry (reached through lora_kernels.multi_lora_linear)
# ------------------------------------------------------------------------------------------
def _check_weight(weight, x: Tensor) -> None:
    if isinstance(weight, FP8Weight):
        codes, scale = weight.codes, weight.scale
        if not isinstance(codes, Tensor) or codes.dim() != 2 or \
                codes.dtype not in (torch.float8_e4m3fn, torch.uint8):
            raise TypeError("weight.codes must be a 2-D float8_e4m3fn (or uint8) tensor [N, K], "
                            f"got {getattr(codes, 'dtype', type(codes).__name__)}")
        if not isinstance(scale, Tensor) or scale.shape != (codes.shape[0],) or \
                not scale.is_floating_point():
            raise ValueError(f"weight.scale must be a float tensor [N] = [{codes.shape[0]}], got "
                             f"{list(getattr(scale, 'shape', []))}")
        tabs = (scale,)
    else:
        if weight.dtype not in _DTYPES:
            raise TypeError(f"weight's storage dtype must be fp32/fp16/bf16, got {weight.dtype}")
        codes, tabs = weight.codes, (weight.absmax, weight.code)
    for t in (codes, *tabs):
        if t.device != x.device:
            raise ValueError(f"weight (quantized) is on {t.device} but x is on {x.device}")


def _check_stack(x2, N: int, K: int, bias, lora_a, lora_b, out_slices):
    """``ops.validation.check_stack``'s rules and words for a W known by its shape only."""
    V.tensor("lora_a", lora_a, 3)
    V.tensor("lora_b", lora_b, 3)
    S, R = lora_b.shape[0], lora_b.shape[2]
    V.shape("x", x2, (x2.shape[0], K), "[T, K]")
    slices = V.check_slices(out_slices, N)
    n_slices = 1 if slices is None else len(slices)
    V.shape("lora_b", lora_b, (S, N, R), "[S, N, r_max]")
    V.shape("lora_a", lora_a, (S, n_slices * R, K), "[S, n_slices·r_max, K]")
    if bias is not None:
        V.tensor("bias", bias, 1)
        V.shape("bias", bias, (N,), "[N]")
    V.same_device("x", x2, bias=bias, lora_a=lora_a, lora_b=lora_b)
    return S, R, slices, n_slices


def quant_multi_lora_linear(x: Tensor, weight, bias: Optional[Tensor], lora_a: Tensor,
                            lora_b: Tensor, batch: LoRABatch, *, scalings, ranks=None,
                            out_slices=None, backend: str = "auto", dropout_p=None,
                            training: bool = True, dropout_seed=None) -> Tensor:
    """:func:`lora_kernels.multi_lora_linear` with ``weight`` an ``FP8Weight`` / ``NF4Weight``
    (``x`` in fp32/fp16/bf16: the compute dtype; the adapters are cast to it). ``dropout_p``
    (per slot, only when ``training``) and ``dropout_seed`` as there."""
    V.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [T, K], got a 0-D tensor")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 over a quantized weight, got "
                        f"{x.dtype}")
    _check_weight(weight, x)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    N, K = (int(s) for s in weight.shape)
    dtype = x.dtype
    S, R, slices, n_slices = _check_stack(x2, N, K, bias, lora_a, lora_b, out_slices)
    batch = V.check_batch(batch, x2.shape[0], S, x.device)
    V.check_index_math("x", x2.shape[0])
    sc = V.check_scalings(scalings, S, x.device)
    rk = V.check_ranks(ranks, S, R, n_slices, x.device)
    drop = _drop.check_dropout_p(dropout_p, S, training)
    seed = None
    if drop is not None:
        seed = (draw_seed() if dropout_seed is None
                else torch.tensor(check_seed(dropout_seed), dtype=torch.int64))
    elif dropout_seed is not None:
        check_seed(dropout_seed)
    drop = None if drop is None else list(drop)
    name = _backend.resolve_for(backend, x2, "multi_lora_linear")
    bias_c = V.dense(bias, dtype)
    a, b = V.dense(lora_a, dtype), V.dense(lora_b, dtype)
    x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x2.new_zeros(*lead, N) if bias_c is None else bias_c.expand(*lead, N).clone()
    need_xa = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    parts = _parts(weight)
    if _backend.plain_eager(x, bias, lora_a, lora_b):
        y, _ = _forward(x2, weight, bias_c, a, b, sc, rk, batch, slices, False, name, drop, seed)
    else:
        y, _ = torch.ops.lora_kernels.multi_lora_linear_quant(
            x2, *parts, bias_c, a, b, sc, rk, *batch.tensors(), batch.host_ints(), slices,
            need_xa, drop, seed, name)
    return y.reshape(*lead, N)
