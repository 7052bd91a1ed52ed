"""Triton backend of the DoRA linear's forward (docs/BACKENDS.md, "DoRA").

``y = c⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``: the fused LoRA GEMM of fused_gemm.py with DoRA's column
factor ``c`` applied in its epilogue (before the bias), so y is written once, exactly like a
plain LoRA forward. ``W0·Aᵀ`` (the weight-side term of the norm) is the shrink kernel run over
the rows of W0. The backward is the LoRA backward on ``g = dy⊙c``; ``g`` and the magnitude's
column sums ``Σ_m dy·(y − b)`` come from one elementwise pass (:func:`dora_scale_grad`) that
reads dy and y once, instead of three torch passes with an fp32 M×N temporary.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton import configs as C
from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.device import on_device
from lora_kernels.triton.lora_linear import SMALL_M_MAX, lora_mode
from lora_kernels.triton.lowrank import shrink

__all__ = ["dora_weight_a", "dora_linear_fwd", "dora_scale_grad"]


def dora_weight_a(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``W0·Aᵀ`` ``[N, r]`` in fp32 (any strides of W0: a Conv1D weight comes as a view)."""
    N, K = weight.shape
    out = torch.empty(N, lora_a.shape[0], dtype=torch.float32, device=weight.device)
    if N == 0 or K == 0 or lora_a.shape[0] == 0:
        return out.zero_()
    with on_device(weight):
        return shrink(weight, lora_a, out)


def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, col_scale: torch.Tensor,
                    scaling: float, *, mode: Optional[int] = None,
                    config: Optional[dict] = None):
    """``(y [M, N], xa [M, r])``; ``col_scale`` fp32 ``[N]``; ``mode``/``config`` force a path."""
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    xa = torch.empty(M, r, dtype=x.dtype, device=x.device)
    if K == 0 or N == 0:  # degenerate: c⊙0 + b
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros((), dtype=x.dtype))
        return y, xa.zero_()
    mode = lora_mode(M, r, 0.0) if mode is None else mode
    common = dict(bias=bias, col_scale=col_scale.contiguous(), small_m_max=SMALL_M_MAX,
                  config=config)
    with on_device(x):
        if r == 0:
            fused_gemm(x, weight, y, **common)
        elif mode == 1:
            shrink(x, lora_a, xa)
            fused_gemm(x, weight, y, lora=1, u=xa, lb=lora_b, scaling=scaling, **common)
        else:
            fused_gemm(x, weight, y, lora=2, u=xa, la=lora_a, lb=lora_b, scaling=scaling,
                       **common)
    return y, xa


@triton.jit
def _scale_grad_kernel(dy_ptr, y_ptr, b_ptr, c_ptr, g_ptr, part_ptr, M, N,
                       stride_dym, stride_ym, stride_gm,
                       HAS_BIAS: tl.constexpr, NEED_G: tl.constexpr, NEED_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``g = dy⊙c`` and per-row-block partial sums ``part[pid_m, n] = Σ dy·(y − b)`` (fp32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    ok = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)
    dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :], mask=ok, other=0.0)
    dy = dy.to(tl.float32)
    if NEED_G:
        c = tl.load(c_ptr + rn, mask=n_ok, other=0.0)
        tl.store(g_ptr + rm64[:, None] * stride_gm + rn[None, :],
                 (dy * c[None, :]).to(g_ptr.dtype.element_ty), mask=ok)
    if NEED_DOT:
        pre = tl.load(y_ptr + rm64[:, None] * stride_ym + rn[None, :], mask=ok, other=0.0)
        pre = pre.to(tl.float32)
        if HAS_BIAS:
            pre = pre - tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        part = tl.sum(tl.where(ok, dy * pre, 0.0), axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part, mask=n_ok)


def dora_scale_grad(dy: torch.Tensor, y_pre: torch.Tensor, bias: Optional[torch.Tensor],
                    col_scale: torch.Tensor, need_g: bool, need_dot: bool):
    """``(g [M, N] dy.dtype, dot [N] fp32)``, None where not needed. Rows of ``dy``/``y_pre``
    must have unit column stride (the op passes contiguous tensors). Deterministic: the
    per-block partials are summed by ``torch.sum`` in a fixed order."""
    M, N = dy.shape
    if not (need_g or need_dot):
        return None, None
    if M == 0 or N == 0:  # nothing to launch over
        return (torch.empty_like(dy) if need_g else None,
                torch.zeros(N, dtype=torch.float32, device=dy.device) if need_dot else None)
    dy, y_pre = dy.contiguous(), y_pre.contiguous() if need_dot else y_pre
    g = torch.empty_like(dy) if need_g else None
    if C.interpreting():
        bm, bn, warps = 16, 32, 1
    else:
        bm, bn, warps = 32, 128, 4
    grid_m = triton.cdiv(M, bm)
    part = torch.empty(grid_m, N, dtype=torch.float32, device=dy.device) if need_dot else None
    dummy = dy
    with on_device(dy):
        _scale_grad_kernel[(grid_m, triton.cdiv(N, bn))](
            dy, y_pre if need_dot else dummy, bias if bias is not None else dummy,
            col_scale.contiguous(), g if need_g else dummy, part if need_dot else dummy, M, N,
            dy.stride(0), y_pre.stride(0) if need_dot else 0, g.stride(0) if need_g else 0,
            HAS_BIAS=bias is not None, NEED_G=need_g, NEED_DOT=need_dot,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return g, (part.sum(0) if need_dot else None)
