"""The CUDA column for bench_lora_linear.py and bench_multi_lora.py (whose authors own them).

Call it with the same inputs as the other columns and time each returned callable with the same
``do_bench``; write one :func:`timing_row` per shape so bench/dispatch_table.py can read it::

    from cuda_columns import cuda_fns, timing_row

    fns = cuda_fns("lora_linear", x, weight, bias, lora_a, lora_b, scaling=s)
    ms = {"torch_mm": ..., "triton": do_bench(triton_fn)}
    ms.update({name: do_bench(fn) for name, fn in fns.items()})
    rows.append(timing_row("lora_linear", M, ms, M=M, N=N, K=K, r=r, dtype="bf16"))

Columns (absent when the extension is not built, so a CPU run writes none):

* ``cuda`` — the public op with ``backend="cuda"``: what ``auto`` would run. This is the column
  the dispatch table compares with ``triton`` (the public op with ``backend="triton"``).
* ``lora_linear`` only: ``cuda_gemm_only`` — the fused GEMM kernel with no LoRA term, i.e. the
  base GEMM alone; set it beside cuBLAS (``torch.mm``) for the issue's "within 15% of cuBLAS"
  check (fp16/bf16; float32 has no tensor-core kernel). ``cuda_fused_gemm`` — the fused kernel
  with the low-rank term (xa precomputed), to show what the LoRA term adds.
  ``cuda_cutlass_gemm_only`` / ``cuda_cutlass_fused_gemm`` — the same two for the CUTLASS sm90
  kernel (csrc/kernels/cutlass/), where it is built and TMA takes the shape; the issue's target
  is ``cuda_cutlass_fused_gemm`` ≤ 1.03× ``torch.mm``.
* ``multi_lora_linear``: ``cuda_decode`` / ``cuda_prefill`` — shrink + expand with the kernel
  path forced, and ``cuda_fused_decode`` (T <= 16 shapes) — the one-launch shrink+expand; the
  base GEMM is included in none of these three (add ``torch.mm``'s time to compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch_table import timing_row  # noqa: E402  (the row format lives with its reader)

import lora_kernels as lk  # noqa: E402
from lora_kernels import _ext  # noqa: E402
from lora_kernels._ext import cutlass_gemm  # noqa: E402

# timing_row is re-exported (see the example above): callers need one import for both.
__all__ = ["available", "cuda_fns", "timing_row"]


def available(device="cuda") -> bool:
    return torch.device(device).type == "cuda" and _ext.why_unavailable() is None


def cuda_fns(op: str, *args, **kwargs) -> dict:
    """``{column: zero-argument callable}`` for ``op`` on these inputs; ``{}`` if unavailable.

    ``op`` and arguments as the public functions: ``lora_linear(x, weight, bias, lora_a, lora_b,
    scaling=...)`` or ``multi_lora_linear(x, weight, bias, lora_a, lora_b, batch, scalings=...,
    ranks=None, out_slices=None)``.
    """
    x = args[0]
    if not available(x.device):
        return {}
    if op == "lora_linear":
        return _lora_linear(*args, **kwargs)
    if op == "multi_lora_linear":
        return _multi(*args, **kwargs)
    raise ValueError(f"op must be 'lora_linear' or 'multi_lora_linear', got {op!r}")


def _lora_linear(x, weight, bias, lora_a, lora_b, *, scaling=1.0, **kw):
    fns = {"cuda": lambda: lk.lora_linear(x, weight, bias, lora_a, lora_b, scaling=scaling,
                                          backend="cuda", **kw)}
    if x.dtype in (torch.float16, torch.bfloat16):
        ops = torch.ops.lora_kernels
        x2 = x.reshape(-1, x.shape[-1])
        M, N = x2.shape[0], weight.shape[0]
        out = x2.new_empty(M, N)
        xa = (x2 @ lora_a.t()).contiguous()
        no_u, no_v = x2.new_empty(M, 0), x2.new_empty(N, 0)
        fns["cuda_gemm_only"] = lambda: ops.cuda_fused_lora_gemm(x2, weight, None, no_u, no_v, 1.0, 0.0,
                                                                 0, False, out)
        fns["cuda_fused_gemm"] = lambda: ops.cuda_fused_lora_gemm(x2, weight, bias, xa, lora_b,
                                                                  float(scaling), 0.0, 0, False, out)
        if _ext.why_no_cutlass() is None and cutlass_gemm.usable(x2, weight, out, bias):
            u = cutlass_gemm.lowrank_rows(xa, scaling, x.dtype)  # as the backend builds it
            v = cutlass_gemm.pad_ranks(lora_b)
            fns["cuda_cutlass_gemm_only"] = lambda: cutlass_gemm.gemm(x2, weight, None, no_u, no_v,
                                                                      False, out)
            fns["cuda_cutlass_fused_gemm"] = lambda: cutlass_gemm.gemm(x2, weight, bias, u, v, False,
                                                                       out)
    return fns


def _multi(x, weight, bias, lora_a, lora_b, batch, *, scalings, ranks=None, out_slices=None, **kw):
    fns = {"cuda": lambda: lk.multi_lora_linear(x, weight, bias, lora_a, lora_b, batch,
                                                scalings=scalings, ranks=ranks,
                                                out_slices=out_slices, backend="cuda", **kw)}
    sc = torch.as_tensor(scalings, dtype=torch.float32).to(x.device)
    sc = sc.expand(lora_a.shape[0]).contiguous() if sc.dim() == 0 else sc.contiguous()
    rk = None if ranks is None else ranks.to(device=x.device, dtype=torch.int32).contiguous()
    n_slices = 1 if out_slices is None else len(out_slices)
    y = x.new_empty(x.shape[0], weight.shape[0])

    def split(path):
        def run():
            xa = _ext.lora_shrink(x, lora_a, batch, sc, rk, n_slices, path=path)
            _ext.lora_expand(y, xa, lora_b, batch, rk, out_slices, path=path)
        return run

    fns["cuda_decode"] = split(_ext.PATH_DECODE)
    fns["cuda_prefill"] = split(_ext.PATH_PREFILL)
    RR = lora_a.shape[1]
    if x.shape[0] <= _ext.FUSED_DECODE_MAX_TOKENS and RR <= _ext.FUSED_DECODE_MAX_RANK_ROWS:
        xa = torch.empty(x.shape[0], RR, dtype=torch.float32, device=x.device)
        fns["cuda_fused_decode"] = lambda: torch.ops.lora_kernels.cuda_lora_shrink_expand(
            y, x, lora_a, lora_b, sc, rk, batch.adapter_ids, list(out_slices or []), xa)
    return fns
