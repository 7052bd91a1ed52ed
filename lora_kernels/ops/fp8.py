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

__all__ = ["FP8Weight", "quantize_fp8", "dequantize", "dequantize_rows", "check_fp8", "from_torchao",
           "codes_u8", "ACT_QUANT", "check_act_quant", "quantize_rows_e4m3"]

E4M3_MAX = 448.0

# Activation quantization of the fp8 x fp8 path (``act_quant=``; None = weight-only FP8, x
# stays in its dtype). "e4m3_per_token": x rounded to e4m3 with one fp32 scale per row.
ACT_QUANT = (None, "e4m3_per_token")


def check_act_quant(act_quant) -> str:
    """The op-level name of ``act_quant`` ("none" | "e4m3_per_token"); ValueError naming it
    otherwise."""
    if act_quant is not None and (not isinstance(act_quant, str) or act_quant not in ACT_QUANT):
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    return "none" if act_quant is None else act_quant


def quantize_rows_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token e4m3 codes of ``x [M, K]`` as the Triton quantizer makes them
    (triton/fp8_act_quant.py, bit for bit): ``(codes float8_e4m3fn [M, K], scale fp32 [M])``,
    ``scale[m] = max_k |x[m, k]| / 448`` (1 for an all-zero row), codes = RNE of ``x / scale``
    saturated to ±448 (fp32 division: correctly rounded, as the kernel's ``div_rn``)."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (xf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


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




def codes_u8(w: FP8Weight) -> Tensor:
    """The e4m3 codes as their uint8 bytes ``[N, K]`` (a view, no copy)."""
    return w.codes if w.codes.dtype == torch.uint8 else w.codes.view(torch.uint8)


def check_fp8(name: str, w) -> FP8Weight:
    """``w`` as an :class:`FP8Weight` with float8_e4m3fn (or uint8) codes ``[N, K]`` and a
    float32 ``scale [N]`` (``[N, 1]`` accepted, as compressed-tensors ships it) on the codes'
    device; TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(w, FP8Weight):
        raise TypeError(f"{name} must be an FP8Weight (lora_kernels.ops.fp8), got "
                        f"{type(w).__name__}")
    codes, scale = w.codes, w.scale
    if not isinstance(codes, Tensor) or codes.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"{name}.codes must be a float8_e4m3fn (or uint8) tensor, got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() != 2:
        raise ValueError(f"{name}.codes must be [N, K], got shape {tuple(codes.shape)}")
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise TypeError(f"{name}.scale must be a floating-point tensor [N]")
    N = codes.shape[0]
    if scale.shape not in ((N,), (N, 1)):
        raise ValueError(f"{name}.scale must be [{N}] (or [{N}, 1]), got {tuple(scale.shape)}")
    if scale.device != codes.device:
        raise ValueError(f"{name}.scale is on {scale.device}, its codes on {codes.device}")
    if scale.dtype != torch.float32 or scale.dim() != 1:
        w = FP8Weight(codes=codes, scale=scale.reshape(N).float())
    return w


def from_torchao(weight) -> FP8Weight:
    """The FP8Weight of a torchao ``Float8Tensor`` (``Float8WeightOnlyConfig`` /
    ``Float8DynamicActivationFloat8WeightConfig`` with per-row granularity; read by attribute,
    torchao is not imported): ``qdata`` float8_e4m3fn ``[N, K]``, ``scale`` fp32 ``[N, 1]``,
    ``block_size [1, K]``. Tested with torchao 0.18.0. Other granularities (per-tensor
    ``block_size [N, K]`` is broadcast; 2-D blocks) and e5m2 raise ValueError."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if not isinstance(qdata, Tensor) or not isinstance(scale, Tensor):
        raise TypeError(f"weight must be a torchao Float8Tensor (qdata + scale), got "
                        f"{type(weight).__name__}")
    if qdata.dtype != torch.float8_e4m3fn or qdata.dim() != 2:
        raise ValueError(f"weight.qdata must be float8_e4m3fn [N, K], got {qdata.dtype} "
                         f"{tuple(qdata.shape)}")
    N, K = qdata.shape
    block = list(getattr(weight, "block_size", [1, K]))
    if block == [N, K] and scale.numel() == 1:
        scale = scale.reshape(1).expand(N)
    elif block != [1, K]:
        raise ValueError(f"weight.block_size must be [1, {K}] (per row) or [{N}, {K}] (per "
                         f"tensor), got {block}")
    return FP8Weight(codes=qdata, scale=scale.float().reshape(N).contiguous())


def dequantize_rows(w: FP8Weight, n0: int, n1: int, dtype: torch.dtype) -> Tensor:
    """Rows ``[n0, n1)`` of W: ``code·scale`` in fp32, then ``dtype`` (what the Triton decode
    feeds the MMA)."""
    codes = codes_u8(w)[n0:n1].view(torch.float8_e4m3fn)
    return (codes.float() * w.scale[n0:n1].float()[:, None]).to(dtype)
