"""Triton single-adapter LoRA linear over a frozen quantized weight: NF4 (bitsandbytes /
QLoRA storage) or FP8 e4m3 with a per-output-channel scale.

Same structure as lora_linear.py, with ``w`` a :class:`gemm.formats.PackedWeight`: the GEMM core
decodes each ``[BLOCK_K, BLOCK_N]`` tile of the 4-bit storage in registers (gemm/formats.py),
so neither the forward nor dX ever holds W in a wider dtype:

* forward ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``: one fused GEMM (shrink in-loop or seeded);
* ``dX = dY·W + mask∘(s·dyb·A)/(1−p)``: the fused GEMM on the packed storage's ``Wᵀ`` view;
* ``dA``, ``dB``: the rank-sized reductions of lowrank.py; W is frozen (no dW).

NF4 and weight-only FP8 at ``M ≥ nf4_slabs.min_rows()`` (compute-bound M) take the slab route
instead for the forward and dX: W decoded once, a bounded slab at a time, then the dense fused
GEMM (nf4_slabs.py); ``route=`` forces ``"slabs"`` or ``"mainloop"`` (tests, benchmarks). The
fp8 x fp8 forward (``act_quant``) keeps its own GEMM; its backward is the weight-only one.

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
from lora_kernels.triton.fp8_act_quant import quantize_rows_e4m3
from lora_kernels.triton import nf4_slabs
from lora_kernels.triton.dropout import dropout_keep_packed
from lora_kernels.triton.lowrank import reduce_rows, shrink
from lora_kernels.triton.nf4_gemv import fuses_shrink, gemv_supported, nf4_gemv

__all__ = ["packed", "packed_nf4", "packed_fp8", "fp8_act_fwd", "quant_lora_fwd",
           "quant_lora_bwd"]

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


def fp8_act_fwd(x: torch.Tensor, w, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float, seed: int,
                *, config: Optional[dict] = None):
    """``(y [M, N], xa [M, r])`` of the fp8 x fp8 path (``act_quant="e4m3_per_token"``): one
    pass over x makes its per-token e4m3 codes, row scales and xa = x·Aᵀ from the unquantized x
    (fp8_act_quant.py), then the fp8 x fp8 GEMM core (spec weight ``fp8_act``) multiplies the
    codes by the e4m3 W, scales the fp32 sum by ``row_scale[m]·w.scale[n]`` and adds
    ``s·xa·Bᵀ + b``. With dropout (or r > 64) xa comes from the shrink kernel instead (the
    quantizer has no mask): one more read of x. ``w``: FP8Weight's attributes (codes
    ``[N, K]``, fp32 ``scale [N]``)."""
    with on_device(x):
        M, r = x.shape[0], lora_a.shape[0]
        codes_w = w.codes if w.codes.dtype == torch.float8_e4m3fn else \
            w.codes.view(torch.float8_e4m3fn)
        codes_w = codes_w.contiguous()
        N = codes_w.shape[0]
        fused_shrink = 0 < r <= 64 and dropout_p == 0.0
        codes, row_scale, xa = quantize_rows_e4m3(x, lora_a if fused_shrink else None)
        if not fused_shrink:
            xa = torch.empty(M, r, dtype=x.dtype, device=x.device)
            if r:
                shrink(x, lora_a, xa, dropout_p, seed)
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        lora = LoraMode.SEEDED if r else LoraMode.NONE
        fused_gemm(codes.view(torch.float8_e4m3fn), codes_w, y, bias=bias, lora=lora,
                   u=xa if r else None, lb=lora_b if r else None, scaling=scaling,
                   a_scale=row_scale, w_scale=w.scale.float().contiguous(),
                   small_m_max=_lin.SMALL_M_MAX, config=config)
        return y, xa


def quant_lora_fwd(x: torch.Tensor, w, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, dropout_p: float, seed: int,
                 act_quant: str = "none", *, mode: Optional[int] = None,
                 config: Optional[dict] = None, route: Optional[str] = None):
    """``(y [M, N], xa [M, r])``; ``act_quant="e4m3_per_token"`` (an FP8 w):
    :func:`fp8_act_fwd`; ``route``: the slab route's override (nf4_slabs.py; NF4 and
    weight-only FP8)."""
    if act_quant != "none":
        return fp8_act_fwd(x, w, bias, lora_a, lora_b, scaling, dropout_p, seed, config=config)
    with on_device(x):
        M = x.shape[0]
        pw = packed(w)
        N = pw.shape[0]
        r = lora_a.shape[0]
        if _slabs(route, M, pw):
            first = _lin.forward_mode(M, r, dropout_p) if mode is None else mode
            done = nf4_slabs.slab_fwd(x, pw, bias, lora_a, lora_b, scaling, dropout_p, seed,
                                      first, _lin.SMALL_M_MAX, config)
            if done is not None:
                return done
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
                 seed: int, needs: Sequence[bool], *, config: Optional[dict] = None,
                 route: Optional[str] = None):
    """``(dx, dbias, dlora_a, dlora_b)``, None where ``needs`` is False."""
    need_x, need_b, need_a, need_bb = (bool(n) for n in needs)
    M, K = x.shape
    r = lora_a.shape[0]
    dx = db = da = dbb = None
    pw = packed(w)
    with on_device(x):
        dyb = bits = None
        slabs = need_x and _slabs(route, M, pw) and nf4_slabs.dx_plan(
            M, pw, dy.element_size(), dy.device) is not None
        # The slab dX at large M makes dyb (and dB) in its first slab's panel-shared GEMM,
        # as the dense dX does (lora_linear._bwd); elsewhere the shrink makes dyb first.
        panel = bool(slabs and r and _lin.forward_mode(M, r, 0.0) == LoraMode.PANEL)
        if r and (need_x or need_a):
            dyb = torch.empty(M, r, dtype=dy.dtype, device=dy.device)
            if not panel:
                shrink(dy, lora_b.t(), dyb)
        if slabs:
            # the packed mask once for the slabs' dX epilogues and dA (each reads its bits)
            if r and dropout_p > 0.0:
                bits = dropout_keep_packed(seed, M, K, dropout_p, x.device)
            if panel and need_bb:
                dbb = torch.empty_like(lora_b)
            dx = nf4_slabs.slab_dx(dy, pw, lora_a, lora_b, dyb, scaling, dropout_p, seed,
                                   _lin.SMALL_M_MAX, config, keep_bits=bits, panel=panel,
                                   xa=xa, db_out=dbb)
        if need_x and dx is None:
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
                reduce_rows(x, dyb, da.t(), scaling, dropout_p, seed, bits)
        if need_bb and dbb is None:
            dbb = torch.empty_like(lora_b)
            if r:
                reduce_rows(dy, xa, dbb, scaling)
        if need_b:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, db, da, dbb


def _slabs(route: Optional[str], M: int, pw: PackedWeight) -> bool:
    """The slab route (nf4_slabs.py) for this call: forced by ``route``, else by M."""
    if route is not None:
        if route not in ("slabs", "mainloop"):
            raise ValueError(f"route must be 'slabs' or 'mainloop', got {route!r}")
        return route == "slabs" and nf4_slabs.use_slabs(M, pw, 0)
    return nf4_slabs.use_slabs(M, pw)
