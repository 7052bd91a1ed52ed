"""bitsandbytes' NF4 (QLoRA) weight storage as plain tensors, and its torch-backend LoRA linear.

bitsandbytes stores a frozen ``W [N, K]`` flattened row-major (element ``f = n·K + k``):

* ``codes``: uint8 ``[ceil(N·K/2)]``, element ``f`` in byte ``f // 2``, the *high* nibble for
  even ``f`` and the low nibble for odd ``f``;
* ``absmax``: one scale per block of ``blocksize`` (64) consecutive elements, ``f // blocksize``;
  fp32, or (``compress_statistics``, "nested") uint8 codes into ``code2 [256]`` scaled by
  ``absmax2[b // blocksize2]`` (fp32, blocksize2 = 256) plus a scalar ``offset``;
* ``code``: the 16 NF4 values (fp32).

``W[f] = (code[nibble(f)] · absmax(f // blocksize))`` computed in fp32 and rounded to the
storage dtype (``quant_state.dtype``), exactly as ``bitsandbytes.functional.dequantize_4bit``.
Blocks may straddle rows (K need not be a multiple of 64): every index here is a flat one.

This module never imports bitsandbytes: :func:`from_params4bit` reads ``weight.quant_state``
by attribute. The torch path (``ops/quant_tiles.py``) dequantizes ``ROWS_PER_TILE`` rows of W
at a time, so no N×K tensor exists at once (one ``tile × K`` slab at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


__all__ = ["NF4Weight", "from_params4bit", "dequantize_rows", "dequantize"]


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one NF4 weight (views of bitsandbytes' own storage, no copies)."""
    codes: Tensor                 # uint8 [ceil(N·K/2)]
    absmax: Tensor                # fp32 [blocks], or uint8 [blocks] when nested
    code: Tensor                  # fp32 [16]
    shape: tuple                  # (N, K)
    dtype: torch.dtype            # storage dtype (quant_state.dtype)
    blocksize: int
    absmax2: Optional[Tensor] = None   # fp32 [ceil(blocks / blocksize2)] (nested only)
    code2: Optional[Tensor] = None     # fp32 [256] (nested only)
    offset: float = 0.0
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def from_params4bit(weight) -> NF4Weight:
    """The NF4 storage of a bitsandbytes ``Params4bit`` (``Linear4bit.weight``) after
    quantization. Raises ``ValueError`` for FP4 or an unquantized weight."""
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("weight has no quant_state (not a quantized bitsandbytes Params4bit)")
    if qs.quant_type != "nf4":
        raise ValueError(f"weight.quant_state.quant_type must be 'nf4', got {qs.quant_type!r}")
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2:
        raise ValueError(f"weight.quant_state.shape must be 2-D, got {shape}")
    codes = weight.data if isinstance(weight, torch.Tensor) else weight
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    codes = codes.reshape(-1)
    n_el = shape[0] * shape[1]
    if codes.numel() != (n_el + 1) // 2:
        raise ValueError(f"weight holds {codes.numel()} bytes, NF4 {shape} needs {(n_el + 1) // 2}")
    nested = bool(getattr(qs, "nested", False))
    kw = {}
    if nested:
        s2 = qs.state2
        kw = dict(absmax2=s2.absmax.float(), code2=s2.code.float(),
                  offset=float(qs.offset), blocksize2=int(s2.blocksize))
    absmax = qs.absmax if nested else qs.absmax.float()
    return NF4Weight(codes=codes, absmax=absmax.reshape(-1), code=qs.code.float(), shape=shape,
                     dtype=qs.dtype, blocksize=int(qs.blocksize), **kw)


def _block_scales(w: NF4Weight, b0: int, b1: int) -> Tensor:
    """fp32 absmax of blocks ``[b0, b1)`` (nested: ``code2[q]·absmax2[b // bs2] + offset``,
    bitsandbytes' dequantize_blockwise then ``+= offset``)."""
    if not w.nested:
        return w.absmax[b0:b1]
    b = torch.arange(b0, b1, device=w.absmax.device)
    return w.code2[w.absmax[b0:b1].long()] * w.absmax2[b // w.blocksize2] + w.offset


def dequantize_rows(w: NF4Weight, n0: int, n1: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows ``[n0, n1)`` of W ``[n1 − n0, K]`` in the storage dtype (then ``dtype``)."""
    N, K = w.shape
    f0, f1 = n0 * K, n1 * K
    f = torch.arange(f0, f1, device=w.codes.device)
    byte = w.codes[f // 2]
    nib = torch.where(f % 2 == 0, byte >> 4, byte & 0xF).long()
    b0 = f0 // w.blocksize
    scale = _block_scales(w, b0, (f1 - 1) // w.blocksize + 1 if f1 > f0 else b0)
    vals = w.code[nib] * scale[f // w.blocksize - b0]
    out = vals.to(w.dtype).reshape(n1 - n0, K)
    return out if dtype is None else out.to(dtype)


def dequantize(w: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The whole W (tests and the reference only: an N×K tensor)."""
    return dequantize_rows(w, 0, w.shape[0], dtype)
