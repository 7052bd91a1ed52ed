"""The ``cuda`` backend: the kernel-level API of docs/BACKENDS.md on the compiled extension.

This module allocates the ``cuda_*`` ops' outputs, unpacks the ``LoRABatch`` and composes the
kernels with cuBLAS (``torch.mm``) where a hand kernel would not be faster:

=====================  ==========================================  ===============================
API function           CUDA kernels                                cuBLAS / torch
=====================  ==========================================  ===============================
``lora_shrink``        ``cuda_lora_shrink``                        –
``lora_expand``        ``cuda_lora_expand``                        –
``multi_lora_fwd``     T <= 16: ``cuda_lora_shrink_expand`` (one    base GEMM ``addmm``
                       launch); else shrink + expand
``lora_linear_fwd``    ``cuda_lora_shrink`` (dropout in-kernel) +   float32: ``addmm`` + ``addmm_``
                       fused GEMM (fp16/bf16): CUTLASS sm90 where
                       TMA takes the operands, else mma.sync
``lora_linear_bwd``    fused GEMM dX (fp16/bf16): CUTLASS sm90     ``dy·B``, dA, dB, dW, db;
                       without dropout, else mma.sync (it masks    float32 dX
                       in registers)
``dropout_keep_mask``  ``cuda_dropout_keep_mask``                  –
``multi_lora_bwd``     not here: ``backend.kernel`` falls back to Triton
=====================  ==========================================  ===============================

The fused GEMMs have no float32 path (tensor cores take fp16/bf16; a tf32 variant would break
the fp32 accuracy contract), so float32 single-adapter calls use cuBLAS plus our shrink.

``cuda_cutlass_lora_gemm`` (csrc/kernels/cutlass/) runs ``[a | u]·[w | v]ᵀ`` as one K loop, so
the LoRA scaling cannot sit in its epilogue (it would scale the base term too): it is folded
into ``u``, an M×r operand this module builds anyway (forward: the shrink's fp32 output, cast;
dX: ``dy·B``). TMA wants 16-byte strides, so ``u`` (and the forward's ``v = B``) are zero-padded
to a multiple of 8 ranks; K and N must be multiples of 8 or the mma.sync kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_kernels.runtime import apply_keep, seed_int64
from lora_kernels._ext import cutlass_gemm
from lora_kernels._ext.loader import ops

# Kernel paths of cuda_lora_shrink / cuda_lora_expand (tests force each one).
PATH_AUTO, PATH_DECODE, PATH_PREFILL = 0, 1, 2
# multi_lora_fwd uses the one-launch shrink+expand up to this many tokens.
FUSED_DECODE_MAX_TOKENS = 16
# Limits of the kernels (csrc/kernels/lora_kernels.h).
MAX_SLICES = 16
FUSED_DECODE_MAX_RANK_ROWS = 8192

# A seed as the signed int64 the schema carries (same 64 bits the reference masks).
_i64 = seed_int64


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
    ops().cuda_dropout_keep_mask(out, _i64(seed), float(p), int(row_offset))
    return out


def _batch_args(batch) -> tuple:
    # the CUDA kernels take the first four tensors (no tile_map); -1 active slots exit early
    return (*batch.tensors()[:4], batch.num_active, batch.max_seg_len)


def lora_shrink(x, lora_a, batch, scalings, ranks, n_slices, *, path: int = PATH_AUTO) -> Tensor:
    out = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    ops().cuda_lora_shrink(x, lora_a, scalings, ranks, *_batch_args(batch), int(n_slices), 0.0, 0,
                            int(path), out)
    return out


def lora_expand(y, xa, lora_b, batch, ranks, out_slices, *, path: int = PATH_AUTO) -> Tensor:
    ops().cuda_lora_expand(y, xa, lora_b, ranks, *_batch_args(batch), _slices(out_slices), int(path))
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
        ops().cuda_lora_shrink_expand(y, x, lora_a, lora_b, scalings, ranks, batch.adapter_ids,
                                       slices, xa)
    else:
        xa = lora_shrink(x, lora_a, batch, scalings, ranks, max(len(slices), 1))
        lora_expand(y, xa, lora_b, batch, ranks, slices)
    return y, (xa if need_xa else None)


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, out=None):
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    xa32 = torch.empty(M, r, dtype=torch.float32, device=x.device)
    # single-adapter mode: no batch tensors, lora_a as a one-slot stack, dropout on x in-kernel
    ops().cuda_lora_shrink(x, lora_a.unsqueeze(0), None, None, None, None, None, None, 1, M, 1,
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
    if cutlass_gemm.usable(x, weight, y, bias):
        # [x | s·xa]·[W0 | B]ᵀ + b: the shrink's fp32 xa, scaled, is the second A operand
        u = cutlass_gemm.lowrank_rows(xa32, scaling, x.dtype)
        cutlass_gemm.gemm(x, weight, bias, u, cutlass_gemm.pad_ranks(lora_b), False, y)
    else:
        ops().cuda_fused_lora_gemm(x, weight, bias, xa, lora_b, float(scaling), 0.0, 0, False, y)
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
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device) \
            if dropout_p > 0.0 else None
    if need_x:
        if fp32:
            dx = torch.mm(dy, weight)
            if keep is None:
                dx.addmm_(dyb, lora_a, alpha=scaling)
            else:  # scale the rank-sized factor, not the [M, K] product
                dx.add_(apply_keep((dyb * scaling) @ lora_a, keep, dropout_p))
        else:
            dx = torch.empty_like(x)
            if dropout_p == 0.0 and cutlass_gemm.usable(dy, weight, dx):
                # [dy | s·dyb]·[W0 | A] on the transposed views: one TMA/wgmma K loop
                u = cutlass_gemm.lowrank_rows(dyb, scaling, x.dtype)
                cutlass_gemm.gemm(dy, weight, None, u, cutlass_gemm.pad_rank_rows(lora_a), True, dx)
            elif cutlass_gemm.usable_dx_dropout(dy, weight, dx, dropout_p, lora_a):
                # dy·W0 on TMA/wgmma, keep∘(s·(dy·B)·A)/(1-p) added in the epilogue
                cutlass_gemm.dx_dropout(dy, weight, torch.mul(dyb, scaling), lora_a, dropout_p,
                                        _i64(seed), dx)
            else:
                # dx = dy·W + drop(s·(dy·B)·A) in one tensor-core pass (mask applied in
                # registers: the low-rank term needs its own accumulator for that)
                ops().cuda_fused_lora_gemm(dy, weight, None, dyb, lora_a, float(scaling),
                                            float(dropout_p), _i64(seed), True, dx)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0)
    if need_a:
        da = (dyb.t() @ apply_keep(x, keep, dropout_p)) * scaling
    if need_bb:
        dbb = (dy.t() @ xa) * scaling
    return dx, dw, db, da, dbb


# multi_lora_bwd is deliberately absent: backend.kernel("cuda", "multi_lora_bwd") uses Triton's.
