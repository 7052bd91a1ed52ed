"""The torch path over a frozen quantized W (FP8 e4m3 or NF4): W is dequantized
``ROWS_PER_TILE`` rows at a time (a 256 × K slab, never N×K), the LoRA terms come from the
reference. One home for the tile loop that the single-adapter ops (``lora_linear_fp8``,
``lora_linear_nf4``) and the multi-adapter op (``multi_lora_quant``) share.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lora_kernels import reference
from lora_kernels.ops import fp8 as _fp8
from lora_kernels.ops import nf4 as _nf4
from lora_kernels.ops.cpu_dropout import dropout_keep_mask

__all__ = ["ROWS_PER_TILE", "row_tiles", "dequantize_rows", "lora_fwd", "fp8_act_fwd", "lora_bwd",
           "check_call"]

# 256 rows: the slab (256·K elements of the compute dtype) stays a few MiB at K = 8192 while
# each addmm is still a real GEMM.
ROWS_PER_TILE = 256


def row_tiles(N: int):
    for n0 in range(0, N, ROWS_PER_TILE):
        yield n0, min(N, n0 + ROWS_PER_TILE)


def dequantize_rows(w, n0: int, n1: int, dtype: Optional[torch.dtype]) -> Tensor:
    """Rows ``[n0, n1)`` of an ``FP8Weight`` or ``NF4Weight`` in ``dtype`` (each format's own
    rounding: what its Triton decode feeds the MMA)."""
    if isinstance(w, _fp8.FP8Weight):
        return _fp8.dequantize_rows(w, n0, n1, dtype)
    return _nf4.dequantize_rows(w, n0, n1, dtype)


def lora_fwd(x: Tensor, w, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
             scaling: float, dropout_p: float, seed: int,
             act_quant: str = "none") -> tuple[Tensor, Tensor]:
    """``(y, xa)``: ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with W dequantized tile by tile.
    ``act_quant="e4m3_per_token"`` (FP8 W only): :func:`fp8_act_fwd`."""
    xd = reference.apply_dropout(x, seed, dropout_p, dropout_keep_mask)
    xa = torch.nn.functional.linear(xd, lora_a)
    if act_quant != "none":
        return fp8_act_fwd(x, w, bias, xa, lora_b, scaling), xa
    y = torch.nn.functional.linear(xa * scaling, lora_b, bias)
    for n0, n1 in row_tiles(w.shape[0]):
        y[:, n0:n1].addmm_(x, dequantize_rows(w, n0, n1, x.dtype).t())
    return y, xa


def fp8_act_fwd(x: Tensor, w, bias: Optional[Tensor], xa: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
    """The fp8 x fp8 forward's numerics in fp32, as the Triton GEMM computes them: x quantized
    per token (``fp8.quantize_rows_e4m3``, the kernel's codes bit for bit), the code products
    summed in fp32, ``(acc·row_scale)·col_scale``, then ``(s·xa rounded to x's dtype)·Bᵀ`` and
    the bias in fp32, one rounding to x's dtype. xa is from the unquantized x."""
    codes, rs = _fp8.quantize_rows_e4m3(x)
    xq = codes.float()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    wc = _fp8.codes_u8(w)
    for n0, n1 in row_tiles(w.shape[0]):
        wt = wc[n0:n1].view(torch.float8_e4m3fn).float()
        y[:, n0:n1] = (xq @ wt.t()) * rs[:, None] * w.scale[n0:n1].float()[None, :]
    if xa.shape[1]:
        su = (xa.float() * scaling).to(x.dtype).float()
        y += su @ lora_b.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def lora_bwd(dy: Tensor, x: Tensor, w, lora_a: Tensor, lora_b: Tensor, xa: Tensor,
             scaling: float, dropout_p: float, seed: int, needs: Sequence[bool]):
    """``(dx, dbias, dlora_a, dlora_b)`` (None where ``needs`` is False); W is frozen."""
    need_x, need_b, need_a, need_bb = (bool(n) for n in needs)
    N, K = w.shape
    # The LoRA gradients from the reference; its weight argument is never read without dx/dW.
    no_w = x.new_zeros(()).expand(N, K)
    _, _, db, da, dbb = reference.lora_linear_backward(
        dy, x, no_w, lora_a, lora_b, xa, scaling, dropout_p, seed,
        (False, False, need_b, need_a, need_bb), keep_mask=dropout_keep_mask)
    dx = None
    if need_x:
        dx = reference.apply_dropout((dy @ lora_b) @ lora_a * scaling, seed, dropout_p,
                                     dropout_keep_mask)
        for n0, n1 in row_tiles(N):
            dx.addmm_(dy[:, n0:n1], dequantize_rows(w, n0, n1, dy.dtype))
    return dx, db, da, dbb


def check_call(x: Tensor, N: int, K: int, codes: Tensor, bias, lora_a, lora_b, scaling,
               dropout_p, training: bool, backend: str, dropout_seed, what: str):
    """The checks and choices a single-adapter op over a quantized W (``what``: "an FP8
    weight", "an NF4 weight") shares once its weight is validated: ``(x2 [M, K], lead shape,
    scaling, dropout_p, kernel family, seed tensor or None)``. The extension has no quantized
    kernel, so ``cuda`` runs its fallback (Triton), as every op missing there does; the seed is
    drawn only when dropout is on."""
    from lora_kernels.ops import backend as _backend
    from lora_kernels.ops import validation as V
    from lora_kernels.ops.lora_linear import check_lora_terms, check_seed, draw_seed
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16 for {what}, got {x.dtype}")
    V.tensor("lora_a", lora_a, 2)
    V.tensor("lora_b", lora_b, 2)
    x2, lead, scaling, dropout_p = check_lora_terms(x, N, K, codes, bias, lora_a, lora_b,
                                                    scaling, dropout_p, training)
    name = _backend.resolve_for(backend, x2, "lora_linear")
    name = "triton" if name in ("triton", "cuda") else "torch"
    if dropout_seed is not None:
        dropout_seed = check_seed(dropout_seed)
    seed = None
    if dropout_p > 0.0:
        seed = (draw_seed() if dropout_seed is None
                else torch.tensor(dropout_seed, dtype=torch.int64))
    return x2, lead, scaling, dropout_p, name, seed
