"""FP8 e4m3 frozen weights with one fp32 scale per output channel (the weight-only layout of
compressed-tensors / torchao float8 checkpoints): ``W[n, k] = float(codes[n, k]) · scale[n]``.

The Triton GEMM core decodes the e4m3 bytes by integer arithmetic in its K loop
(triton/gemm/formats.py ``e4m3_to_f32``: bit-exact for all 256 codes, no float8 type needed)
and multiplies by the row's scale; :func:`dequantize` is the torch definition it is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FP8Weight", "quantize_fp8", "dequantize"]

E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8Weight:
    codes: Tensor  # float8_e4m3fn [N, K] (or its uint8 bytes)
    scale: Tensor  # fp32 [N]

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)


def quantize_fp8(weight: Tensor) -> FP8Weight:
    """Per-output-channel e4m3 quantization of ``weight [N, K]``: ``scale[n] = max|W[n]| / 448``
    (1 for an all-zero row), codes = round-to-nearest-even of ``W / scale``."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor [N, K]")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Weight(codes=codes, scale=scale)


def dequantize(w: FP8Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """``codes · scale`` computed in fp32, then ``dtype`` (tests and references: an N×K tensor)."""
    codes = w.codes if w.codes.dtype == torch.float8_e4m3fn else w.codes.view(torch.float8_e4m3fn)
    return (codes.float() * w.scale.float()[:, None]).to(dtype)
