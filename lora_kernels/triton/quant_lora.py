"""Triton single-adapter LoRA linear over a frozen quantized weight: NF4 (bitsandbytes /
QLoRA storage) or FP8 e4m3 with a per-output-channel scale.

Same structure as lora_linear.py, with ``w`` a :class:`gemm.formats.PackedWeight`: the GEMM core
decodes each ``[BLOCK_K, BLOCK_N]`` tile of the 4-bit storage in registers (gemm/formats.py),
so neither the forward nor dX ever holds W in a wider dtype:

* forward ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``: one fused GEMM (shrink in-loop or seeded);
* ``dX = dY·W + mask∘(s·dyb·A)/(1−p)``: the fused GEMM on the packed storage's ``Wᵀ`` view;
* ``dA``, ``dB``: the rank-sized reductions of lowrank.py; W is frozen (no dW).

``w`` is a PackedWeight, or any object with NF4Weight's attributes (lora_kernels/ops/nf4.py)
or FP8Weight's (lora_kernels/ops/fp8.py): kernels never import ops.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lora_kernels.triton.device import on_device
from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.gemm.formats import (PackedWeight, QROUND_BF16, QROUND_FP16,
                                              QROUND_FP32)
from lora_kernels.triton.gemm.modes import (LoraMode, WEIGHT_FP8_E4M3, WEIGHT_NF4,
                                            WEIGHT_NF4_NESTED)
from lora_kernels.triton import lora_linear as _lin
from lora_kernels.triton.lowrank import reduce_rows, shrink
from lora_kernels.triton.nf4_gemv import fuses_shrink, gemv_supported, nf4_gemv

__all__ = ["packed", "packed_nf4", "packed_fp8", "quant_lora_fwd", "quant_lora_bwd"]

_QROUND = {torch.float32: QROUND_FP32, torch.float16: QROUND_FP16, torch.bfloat16: QROUND_BF16}


def packed_nf4(w) -> PackedWeight:
    """The launch handle of an NF4 weight (the 16 + 256 value table is its only new tensor)."""
    lut = w.code.float() if not w.nested else torch.cat([w.code.float(), w.code2.float()])
    return PackedWeight(w.codes, w.absmax, w.absmax2, lut.contiguous(), w.offset,
                        int(WEIGHT_NF4_NESTED if w.nested else WEIGHT_NF4), int(w.blocksize),
                        int(w.blocksize2), int(_QROUND[w.dtype]), w.shape)


def packed_fp8(w) -> PackedWeight:
    """The launch handle of an e4m3 weight ``codes [N, K]`` (float8_e4m3fn, read as bytes) with
    its fp32 ``scale [N]``."""
    codes = w.codes.contiguous().view(torch.uint8).reshape(-1)
    scale = w.scale.float().contiguous()
    return PackedWeight(codes, scale, None, scale, 0.0, int(WEIGHT_FP8_E4M3), 1, 1,
                        int(QROUND_FP32), tuple(w.codes.shape))


def packed(w) -> PackedWeight:
    if isinstance(w, PackedWeight):
        return w
    return packed_fp8(w) if hasattr(w, "scale") else packed_nf4(w)


def quant_lora_fwd(x: torch.Tensor, w, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, dropout_p: float, seed: int,
                 *, mode: Optional[int] = None, config: Optional[dict] = None):
    """``(y [M, N], xa [M, r])``."""
    with on_device(x):
        M = x.shape[0]
        pw = packed(w)
        N = pw.shape[0]
        r = lora_a.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        xa = torch.empty(M, r, dtype=x.dtype, device=x.device)
        if mode is None and config is None and gemv_supported(pw, M):
            # decode rows over NF4: the CUDA-core GEMV (nf4_gemv.py) with xa from the shrink
            if r == 0:
                xa.zero_()
                nf4_gemv(x, pw, y, bias)
            elif dropout_p == 0.0 and fuses_shrink(M, r):  # one launch: x·Aᵀ in the GEMV
                nf4_gemv(x, pw, y, bias, xa, lora_b, scaling, la=lora_a)
            else:
                shrink(x, lora_a, xa, dropout_p, seed)
                nf4_gemv(x, pw, y, bias, xa, lora_b, scaling)
            return y, xa
        mode = _lin.lora_mode(M, r, dropout_p) if mode is None else mode
        small = _lin.SMALL_M_MAX
        if r == 0:
            fused_gemm(x, pw, y, bias=bias, small_m_max=small, config=config)
            xa.zero_()
        elif mode == LoraMode.SEEDED:
            shrink(x, lora_a, xa, dropout_p, seed)
            fused_gemm(x, pw, y, bias=bias, lora=LoraMode.SEEDED, u=xa, lb=lora_b,
                       scaling=scaling, small_m_max=small, config=config)
        else:
            fused_gemm(x, pw, y, bias=bias, lora=LoraMode.IN_LOOP, u=xa, la=lora_a, lb=lora_b,
                       scaling=scaling, small_m_max=small, config=config)
        return y, xa


def quant_lora_bwd(dy: torch.Tensor, x: torch.Tensor, w, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float,
                 seed: int, needs: Sequence[bool], *, config: Optional[dict] = None):
    """``(dx, dbias, dlora_a, dlora_b)``, None where ``needs`` is False."""
    need_x, need_b, need_a, need_bb = (bool(n) for n in needs)
    M, K = x.shape
    r = lora_a.shape[0]
    dx = db = da = dbb = None
    pw = packed(w)
    with on_device(x):
        dyb = None
        if r and (need_x or need_a):
            dyb = shrink(dy, lora_b.t(), torch.empty(M, r, dtype=dy.dtype, device=dy.device))
        if need_x:
            dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
            if r:
                fused_gemm(dy, pw.t(), dx, lora=LoraMode.SEEDED, u=dyb,
                           lb=lora_a.t(), scaling=scaling, dropout_p=dropout_p, seed=seed,
                           small_m_max=_lin.SMALL_M_MAX, config=config)
            else:
                fused_gemm(dy, pw.t(), dx, small_m_max=_lin.SMALL_M_MAX,
                           config=config)
        if need_a:
            da = torch.empty_like(lora_a)
            if r:
                reduce_rows(x, dyb, da.t(), scaling, dropout_p, seed)
        if need_bb:
            dbb = torch.empty_like(lora_b)
            if r:
                reduce_rows(dy, xa, dbb, scaling)
        if need_b:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, db, da, dbb
