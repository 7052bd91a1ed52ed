"""The quantized-base columns of bench_lora_linear.py (issue #16, item 3), on the same x, W,
A, B as its other columns (``bare`` and ``triton`` / ``torch`` = ours on the bf16 weight):

* ``nf4_ours``       — ``lora_linear_nf4`` on bitsandbytes' NF4 storage of W (nested = False);
* ``nf4_peft_bnb``   — PEFT's LoRA layer over a bitsandbytes ``Linear4bit`` (its forward
  dequantizes W to an N×K tensor, then matmul; the backward does it again for dX);
* ``fp8_ours``       — ``lora_linear_fp8`` on W quantized to e4m3 with per-row scales;
* ``fp8_act_ours``   — the same with ``act_quant="e4m3_per_token"``: x rounded to e4m3 per
  token by the quantizer pass (which also makes xa), then the fp8 x fp8 GEMM (wgmma e4m3);
  the one column that can reach #16's "FP8 forward ≤ 0.65× bare" (≈ 2 % relative error);
* ``fp8_unfused``    — the same e4m3 W dequantized to x's dtype, then the torch composition
  ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` (what a framework without an fp8 LoRA kernel runs);
* ``fp8_mainloop``   — forward only, Triton: ``fp8_ours`` forced onto the in-mainloop route
  (W decoded in the K loop, no slab) whatever M is, so a GPU run measures where the slab
  threshold (``nf4_slabs.min_rows``) should sit for FP8 side by side with ``fp8_ours``.

A contender whose library is missing (bitsandbytes, peft) is left out; ``quant_columns``
returns ``({}, {})`` entries for it, never raises.
"""

from __future__ import annotations

import torch

import lora_kernels as lk
from lora_kernels.ops import fp8 as F8
from lora_kernels.ops import nf4 as N4


def _nf4_base(w, b):
    import bitsandbytes as bnb
    N, K = w.shape
    lin = bnb.nn.Linear4bit(K, N, bias=b is not None, compute_dtype=w.dtype, quant_type="nf4",
                            compress_statistics=False)
    lin.weight = bnb.nn.Params4bit(w.detach().cpu().clone(), requires_grad=False,
                                   quant_type="nf4", compress_statistics=False)
    if b is not None:
        lin.bias = torch.nn.Parameter(b.detach().cpu().clone(), requires_grad=False)
    lin = lin.to(w.device)  # quantizes
    lin.support_avx512bf16_for_cpu = False  # keep the portable layout our kernels read
    return lin


def _peft_over(base, a, bb, s, p):
    import peft

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = base

        def forward(self, x):
            return self.q(x)
    r = a.shape[0]
    model = peft.get_peft_model(One(), peft.LoraConfig(r=r, lora_alpha=s * r, lora_dropout=p,
                                                       target_modules=["q"]))
    layer = model.base_model.model.q
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(bb)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    for t in params:
        t.data = t.data.to(a.dtype)
    return model, params


def quant_columns(x, w, b, a, bb, s, p, backend, no_grad, fwd_bwd):
    """``(fwd, both)``: name → callable, like bench_lora_linear.contenders' tables."""
    xg = x.detach().clone().requires_grad_(True)
    ag, bg = a.detach().clone().requires_grad_(True), bb.detach().clone().requires_grad_(True)
    fwd, both = {}, {}
    fw = F8.quantize_fp8(w)

    def fp8_ours(xx, aa, bbb):
        return lk.ops.lora_linear_fp8(xx, fw, b, aa, bbb, scaling=s, dropout_p=p,
                                      backend=backend)

    def fp8_act_ours(xx, aa, bbb):
        return lk.ops.lora_linear_fp8(xx, fw, b, aa, bbb, scaling=s, dropout_p=p,
                                      backend=backend, act_quant="e4m3_per_token")

    def fp8_unfused(xx, aa, bbb):
        wd = F8.dequantize(fw, xx.dtype)
        drop = torch.nn.functional.dropout(xx, p) if p > 0 else xx
        y = xx @ wd.t() + s * ((drop @ aa.t()) @ bbb.t())
        return y + b if b is not None else y
    fwd["fp8_ours"] = no_grad(lambda: fp8_ours(x, a, bb))
    fwd["fp8_act_ours"] = no_grad(lambda: fp8_act_ours(x, a, bb))
    fwd["fp8_unfused"] = no_grad(lambda: fp8_unfused(x, a, bb))
    if backend == "triton":
        from lora_kernels.triton import quant_lora as TQ
        fwd["fp8_mainloop"] = no_grad(lambda: TQ.quant_lora_fwd(x, fw, b, a, bb, s, 0.0, 0,
                                                                 route="mainloop")[0])
    both["fp8_ours"] = fwd_bwd(lambda: fp8_ours(xg, ag, bg), [xg, ag, bg])
    both["fp8_act_ours"] = fwd_bwd(lambda: fp8_act_ours(xg, ag, bg), [xg, ag, bg])
    both["fp8_unfused"] = fwd_bwd(lambda: fp8_unfused(xg, ag, bg), [xg, ag, bg])
    try:
        base = _nf4_base(w, b)
    except ImportError:
        return fwd, both
    nw = N4.from_params4bit(base.weight)

    def nf4_ours(xx, aa, bbb):
        return lk.ops.lora_linear_nf4(xx, nw, b, aa, bbb, scaling=s, dropout_p=p,
                                      backend=backend)
    fwd["nf4_ours"] = no_grad(lambda: nf4_ours(x, a, bb))
    both["nf4_ours"] = fwd_bwd(lambda: nf4_ours(xg, ag, bg), [xg, ag, bg])
    try:
        model, params = _peft_over(base, a, bb, s, p)
    except ImportError:
        return fwd, both
    fwd["nf4_peft_bnb"] = no_grad(lambda: model(x))
    both["nf4_peft_bnb"] = fwd_bwd(lambda: model(xg), [xg, *params])
    return fwd, both
