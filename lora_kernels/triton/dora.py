"""Triton backend of the DoRA linear's forward (docs/BACKENDS.md, "DoRA").

``y = c⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``: the fused LoRA GEMM of fused_gemm.py with DoRA's column
factor ``c`` applied in its epilogue (before the bias), so y is written once, exactly like a
plain LoRA forward. ``W0·Aᵀ`` (the weight-side term of the norm) is the shrink kernel run over
the rows of W0. The backward needs no kernel of its own: it is the LoRA backward on ``dy⊙c``.
"""

from __future__ import annotations

from typing import Optional

import torch

from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.lora_linear import SMALL_M_MAX, _on_device, lora_mode
from lora_kernels.triton.lowrank import shrink

__all__ = ["dora_weight_a", "dora_linear_fwd"]


def dora_weight_a(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``W0·Aᵀ`` ``[N, r]`` in fp32 (any strides of W0: a Conv1D weight comes as a view)."""
    N, K = weight.shape
    out = torch.empty(N, lora_a.shape[0], dtype=torch.float32, device=weight.device)
    if N == 0 or K == 0 or lora_a.shape[0] == 0:
        return out.zero_()
    with _on_device(weight):
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
    with _on_device(x):
        if r == 0:
            fused_gemm(x, weight, y, **common)
        elif mode == 1:
            shrink(x, lora_a, xa)
            fused_gemm(x, weight, y, lora=1, u=xa, lb=lora_b, scaling=scaling, **common)
        else:
            fused_gemm(x, weight, y, lora=2, u=xa, la=lora_a, lb=lora_b, scaling=scaling,
                       **common)
    return y, xa
