"""Fused single-adapter LoRA linear, side by side in one run, forward and forward+backward:

* ``bare``     — the base GEMM alone, cuBLAS ``torch.mm`` (fwd+bwd: ``x·Wᵀ`` and ``dY·W``, the
  two GEMMs a frozen base weight costs; the floor LoRA is measured against);
* ``unfused``  — the plain torch composition ``x·Wᵀ + s·((x·Aᵀ)·Bᵀ)`` under autograd;
* ``peft``     — PEFT's ``lora.Linear`` around an ``nn.Linear`` (adapters cast to the same dtype:
  PEFT's own default upcasts them to fp32, which would only make it slower);
* ``torch``    — ``lora_kernels.lora_linear(backend="torch")`` (cuBLAS addmm + in-place addmm_);
* ``cublas``   — the floor the dispatch table may pick (lora_kernels/ops/cublas_backend.py: y
  seeded with ``bias + s·xa·Bᵀ``, then ``addmm`` with beta=1, Unsloth's layout), through the
  public op as ``auto`` runs it when the table names it (GPU only);
* ``triton``   — ``lora_kernels.lora_linear(backend="triton")``: ours, through the public op;
* ``triton_kernel`` — the same kernels called without the custom-op/autograd layer (fwd only:
  shows what Python dispatch costs at decode sizes);
* ``triton_shrink_epi`` / ``triton_fused_loop`` — the two forward designs forced (precomputed
  ``x·Aᵀ`` + accumulator seed vs ``x·Aᵀ`` accumulated in the GEMM's K loop), to re-fit the rule
  that picks between them (``lora_kernels.triton.lora_linear.lora_mode``);
* ``triton_gemm`` — our fused GEMM with no LoRA term: Triton-vs-cuBLAS GEMM efficiency, the
  context for every ``triton / bare`` ratio;
* ``cuda`` (+ ``cuda_gemm_only``, ``cuda_fused_gemm``; ``cuda_cutlass_gemm_only``,
  ``cuda_cutlass_fused_gemm`` for the CUTLASS sm90 kernel) — the CUDA extension's columns from
  bench/cuda_columns.py, when it is built;
* ``peft_dora`` / ``dora_torch`` / ``dora_triton`` — DoRA (``use_dora=True``, magnitudes away
  from the row norms): PEFT's layer against ``lora_kernels.dora_linear`` (‖W0‖² cached, as the
  modules do); compare with the plain-LoRA ``torch`` / ``triton`` columns for DoRA's overhead;
* ``nf4_ours`` / ``nf4_peft_bnb`` / ``fp8_ours`` / ``fp8_act_ours`` / ``fp8_unfused`` —
  quantized bases (bench/quant_columns.py): ours on NF4 / FP8 e4m3 storage of the same W against PEFT over
  bitsandbytes ``Linear4bit`` and the unfused fp8 dequantize + matmul; ``bare`` and ours on
  bf16 are the other columns of the same row.

Timing: ``common.bench`` = ``triton.testing.do_bench`` median, L2 flushed before each repetition.
Decode rows (M ≤ 16, forward) also report CUDA-graph replays (``graph_ms``), i.e. without
CPU launch overhead: each replay runs the contender over ``graph_copies`` input sets with their
own weight copies, together ≥ 2× the L2 cache (a 4096² bf16 weight, 32 MiB, would otherwise stay
L2-resident across replays), and the figure is per call — so ``ms`` − ``graph_ms`` is the launch
overhead, not cache warmth. TFLOP/s counts the layer's useful FLOPs (2MKN + 2Mr(K+N) forward; backward
adds the dX GEMM, its low-rank term and dA, dB), the same count for every LoRA contender.

    python bench/bench_lora_linear.py [--out DIR] [--ms 1,8192] [--shapes 4096x4096] [--ranks 16]
                                      [--append] [--no-bwd] [--dropout 0.1]
    python bench/bench_lora_linear.py --quick     # CPU, torch-only contenders, tiny sizes

Writes ``bench_lora_linear.{json,md,png}`` under ``--out`` (default bench/results/<device>/),
after every shape, so a run cut short keeps what it measured; ``--append`` merges into an
existing JSON (split a long GPU run over several calls).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import lora_kernels as lk  # noqa: E402
from dispatch_table import timing_row  # noqa: E402  (the row format lives with its reader)
from e2e_common import quick_threads, resolve_mode  # noqa: E402

NAME = "bench_lora_linear"
FULL_MS = (1, 16, 256, 2048, 8192, 16384)
FULL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
FULL_RANKS = (8, 16, 64)
QUICK_MS = (1, 16, 256)
QUICK_SHAPES = ((256, 256), (256, 896))
QUICK_RANKS = (16,)
# The targets (H100 bf16): benchmark figures, reported in the markdown, never asserted.
TARGET_SHAPE = dict(M=8192, K=4096, N=4096, r=16)
SCALING = 2.0


def _peft_layer(w, b, a, bb, p, magnitude=None):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    N, K = w.shape
    r = a.shape[0]
    base = torch.nn.Linear(K, N, bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        if b is not None:
            base.bias.copy_(b)
    base.requires_grad_(False)
    dora = magnitude is not None
    cfg = LoraConfig(r=r, lora_alpha=SCALING * r, lora_dropout=p, use_dora=dora)
    layer = PeftLinear(base, "default", cfg, r=r, lora_alpha=SCALING * r, lora_dropout=p,
                       use_dora=dora)
    layer.lora_A["default"].to(w.dtype)
    layer.lora_B["default"].to(w.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(bb)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if dora:
        mag = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            mag.data = magnitude.to(mag.dtype).clone()
        params.append(mag)
    layer.train(p > 0)
    return layer, params


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def contenders(M, K, N, r, dtype, device, *, p, bias, quick):
    """{direction: {name: callable}} on fresh inputs of this shape."""
    g = torch.Generator(device="cpu").manual_seed(M * 7 + K * 3 + N + r)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    x, w, a, bb = mk(M, K), mk(N, K, scale=K ** -0.5), mk(r, K, scale=K ** -0.5), mk(N, r, scale=r ** -0.5)
    b = mk(N) if bias else None
    dy = mk(M, N)
    xg = x.detach().clone().requires_grad_(True)
    ag, bg = a.detach().clone().requires_grad_(True), bb.detach().clone().requires_grad_(True)
    s = SCALING

    def unfused(xx, aa, bbb):
        drop = torch.nn.functional.dropout(xx, p) if p > 0 else xx
        y = xx @ w.t() + s * ((drop @ aa.t()) @ bbb.t())
        return y + b if b is not None else y

    def op(backend, xx, aa, bbb):
        return lk.lora_linear(xx, w, b, aa, bbb, scaling=s, dropout_p=p, backend=backend)

    def floor(xx, aa, bbb):  # the public op as `auto` runs it when the table names the floor
        from lora_kernels.ops import backend as B
        with B.dispatch_override({"lora_linear": {c: "cublas" for c in ("decode", "medium", "large")}}):
            return op("auto", xx, aa, bbb)

    def fwd_bwd(fn, leaves):
        def run():
            y = fn()
            return torch.autograd.grad(y, leaves, dy)
        return run

    peft_layer, peft_params = _peft_layer(w, b, a, bb, p)
    backends = ["torch"] + ([] if quick else ["triton"])
    # DoRA: magnitudes 0.5-1.5x the row norms, so c is not ~1
    mag = (torch.linalg.vector_norm(w.float(), dim=1).cpu() *
           (0.5 + torch.rand(N, generator=g))).to(device)
    magg = mag.clone().requires_grad_(True)
    wsq = lk.ops.dora.row_sq_norm(w)
    dora_layer, dora_params = _peft_layer(w, b, a, bb, p, magnitude=mag)

    def dora(backend, xx, aa, bbb, mm):
        return lk.dora_linear(xx, w, b, aa, bbb, mm, scaling=s, dropout_p=p, backend=backend,
                              weight_sq_norm=wsq)
    fwd = {
        "bare": _no_grad(lambda: torch.mm(x, w.t())),
        "unfused": _no_grad(lambda: unfused(x, a, bb)),
        "peft": _no_grad(lambda: peft_layer(x)),
        **{be: _no_grad(lambda be=be: op(be, x, a, bb)) for be in backends},
        "peft_dora": _no_grad(lambda: dora_layer(x)),
        **{f"dora_{be}": _no_grad(lambda be=be: dora(be, x, a, bb, mag)) for be in backends},
    }
    both = {
        "bare": lambda: (torch.mm(x, w.t()), torch.mm(dy, w)),
        "unfused": fwd_bwd(lambda: unfused(xg, ag, bg), [xg, ag, bg]),
        "peft": fwd_bwd(lambda: peft_layer(xg), [xg, *peft_params]),
        **{be: fwd_bwd(lambda be=be: op(be, xg, ag, bg), [xg, ag, bg]) for be in backends},
        "peft_dora": fwd_bwd(lambda: dora_layer(xg), [xg, *dora_params]),
        **{f"dora_{be}": fwd_bwd(lambda be=be: dora(be, xg, ag, bg, magg), [xg, ag, bg, magg])
           for be in backends},
    }
    if not quick:
        fwd["cublas"] = _no_grad(lambda: floor(x, a, bb))
        both["cublas"] = fwd_bwd(lambda: floor(xg, ag, bg), [xg, ag, bg])
        import lora_kernels.triton.fused_gemm as FG
        import lora_kernels.triton.lora_linear as TL
        out = torch.empty(M, N, dtype=dtype, device=device)
        fwd["triton_kernel"] = lambda: TL.lora_linear_fwd(x, w, b, a, bb, s, p, 1, out)
        if p == 0 and r <= TL.FUSED_SHRINK_MAX_R:
            # Both forward designs forced, to re-fit TL.FUSED_SHRINK_MAX_MR on this GPU.
            fwd["triton_shrink_epi"] = lambda: TL.lora_linear_fwd(x, w, b, a, bb, s, 0.0, 1, out, mode=1)
            fwd["triton_fused_loop"] = lambda: TL.lora_linear_fwd(x, w, b, a, bb, s, 0.0, 1, out, mode=2)
        fwd["triton_gemm"] = lambda: FG.fused_gemm(x, w, out, small_m_max=TL.SMALL_M_MAX)
        try:
            import cuda_columns
            if cuda_columns.available(device):
                fwd.update(cuda_columns.cuda_fns("lora_linear", x, w, b, a, bb, scaling=s))
                both["cuda"] = fwd_bwd(lambda: op("cuda", xg, ag, bg), [xg, ag, bg])
        except Exception as exc:  # noqa: BLE001 - the CUDA column is optional
            print(f"cuda columns unavailable: {exc}", file=sys.stderr)
    # Quantized bases (#16): NF4 / FP8 ours, PEFT + bitsandbytes, the unfused fp8 dequantize.
    from quant_columns import quant_columns
    qf, qb = quant_columns(x, w, b, a, bb, s, p, "torch" if quick else "triton", _no_grad,
                           fwd_bwd)
    fwd.update(qf)
    both.update(qb)
    return {"fwd": fwd, "fwd+bwd": both}


def graph_copies(K, N, dtype, device) -> int:
    """Input sets a decode graph replay rotates over: enough base-weight copies to total
    ≥ 2× the L2 cache, so graph_ms reads weights from HBM like the L2-flushed ``ms``."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    w_bytes = N * K * torch.finfo(dtype).bits // 8
    return max(1, math.ceil(2 * l2 / w_bytes))


def rotated_graph_ms(tables, name):
    """Per-call median ms of one CUDA graph calling ``tables[i][name]`` for every copy i
    (None if it cannot be captured)."""
    calls = [t[name] for t in tables]

    def all_copies():
        for fn in calls:
            fn()
    g_ms = common.bench_graph(all_copies)
    return None if g_ms is None else g_ms / len(calls)


def flops(M, K, N, r, direction, bare):
    fwd = 2 * M * K * N + (0 if bare else 2 * M * r * (K + N))
    if direction == "fwd":
        return fwd
    # dX GEMM (+ dY·B and (dY·B)·A), dA = (dY·B)ᵀ·x, dB = dYᵀ·xa
    return fwd + 2 * M * N * K + (0 if bare else 2 * M * r * (N + K) + 2 * M * r * K + 2 * M * N * r)


def _triton_configs():
    try:
        import lora_kernels.triton.fused_gemm as FG
    except Exception:  # noqa: BLE001
        return {}
    return {p: str(t.best_config) for p, t in FG._TUNED.items() if getattr(t, "best_config", None)}


def measure(M, K, N, r, dtype, device, *, p, bias, quick, bwd, rep):
    fns = contenders(M, K, N, r, dtype, device, p=p, bias=bias, quick=quick)
    graph = not quick and M <= 16  # decode: CUDA-graph replays too, over rotated weight copies
    copies = graph_copies(K, N, dtype, device) if graph else 0
    rotated = [fns["fwd"]] + [contenders(M, K, N, r, dtype, device, p=p, bias=bias, quick=quick)["fwd"]
                              for _ in range(copies - 1)]
    rows = []
    for direction, table in fns.items():
        if direction == "fwd+bwd" and not bwd:
            continue
        ms, graph_ms, errors, configs = {}, {}, {}, {}
        for name, fn in table.items():
            try:
                fn()  # warm-up: allocator, autotuning, lazy init
                if name == "triton":
                    configs = _triton_configs()
                ms[name] = common.bench(fn, rep=rep, cuda=not quick)
                if graph and direction == "fwd":
                    g_ms = rotated_graph_ms(rotated, name)
                    if g_ms is not None:
                        graph_ms[name] = g_ms
            except Exception as exc:  # noqa: BLE001 - one broken contender must not stop the run
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                ms[name] = None
        bare = ms.get("bare")
        fl = {n: flops(M, K, N, r, direction, n in ("bare", "triton_gemm", "cuda_gemm_only",
                                                       "cuda_cutlass_gemm_only"))
              for n in ms}
        row = timing_row("lora_linear", M, ms, M=M, K=K, N=N, r=r, direction=direction,
                         dtype=str(dtype).replace("torch.", ""), dropout=p, bias=bias)
        row["tflops"] = {n: (fl[n] / (t * 1e9) if t else None) for n, t in ms.items()}
        row["ratio_to_bare"] = {n: (t / bare if t and bare else None) for n, t in ms.items()}
        if graph_ms:
            row["graph_ms"] = graph_ms
            row["graph_copies"] = copies
        if configs:
            row["triton_configs"] = configs
        if errors:
            row["errors"] = errors
        rows.append(row)
    return rows


def _fmt(v, digits=3):
    return None if v is None else round(v, digits)


def markdown(rows, env, quick):
    out = [f"# {NAME}", "", common.env_line(env), ""]
    if quick:
        out += ["> `--quick`: CPU, fp32, tiny sizes, torch-only contenders (no Triton). The numbers "
                "say nothing about the GPU kernels; they show the harness and the unfused overheads.",
                ""]
    ours = "torch" if quick else "triton"
    for direction in ("fwd", "fwd+bwd"):
        sel = [r for r in rows if r["direction"] == direction]
        if not sel:
            continue
        names = list(dict.fromkeys(n for r in sel for n in r["ms"]))
        out += [f"## {direction} (ms, median)", ""]
        headers = ["M", "K", "N", "r", *names, f"{ours}/bare", f"peft/{ours}", f"{ours} TFLOP/s"]
        table = []
        for r in sel:
            t, pe = r["ms"].get(ours), r["ms"].get("peft")
            table.append([r["M"], r["K"], r["N"], r["r"], *[_fmt(r["ms"].get(n), 4) for n in names],
                          _fmt(r["ratio_to_bare"].get(ours)), _fmt(pe / t if t and pe else None),
                          _fmt(r["tflops"].get(ours), 4)])
        out += [common.md_table(headers, table), ""]
        graphs = [r for r in sel if r.get("graph_ms")]
        if graphs:
            gnames = list(dict.fromkeys(n for r in graphs for n in r["graph_ms"]))
            out += ["CUDA-graph replay (ms per call, no launch overhead; rotated over weight "
                    "copies totalling ≥ 2× L2, so weights come from HBM as in `ms`):", "",
                    common.md_table(["M", "K", "N", "r", *gnames],
                                    [[r["M"], r["K"], r["N"], r["r"],
                                      *[_fmt(r["graph_ms"].get(n), 4) for n in gnames]] for r in graphs]),
                    ""]
    if not quick:
        out += ["## Targets (H100 bf16; benchmark figures, not tests)", "", *targets(rows), ""]
    return "\n".join(out)


def _find(rows, direction, **shape):
    for r in rows:
        if r["direction"] == direction and all(r.get(k) == v for k, v in shape.items()):
            return r
    return None


def targets(rows):
    lines = []

    def check(label, value, limit, better="≤"):
        if value is None:
            lines.append(f"* {label}: not measured")
            return
        ok = value <= limit if better == "≤" else value >= limit
        lines.append(f"* {label}: **{value:.3f}** (target {better} {limit}) — {'met' if ok else 'NOT met'}")

    f = _find(rows, "fwd", dropout=0.0, **TARGET_SHAPE)
    fb = _find(rows, "fwd+bwd", dropout=0.0, **TARGET_SHAPE)
    fbd = _find(rows, "fwd+bwd", dropout=0.05, **TARGET_SHAPE)
    shape = "M=8192, K=N=4096, r=16"
    check(f"fused forward / bare GEMM, {shape}", f and f["ratio_to_bare"].get("triton"), 1.05)
    check(f"CUDA backend forward (shrink + CUTLASS sm90 GEMM) / bare GEMM, {shape}",
          f and f["ratio_to_bare"].get("cuda"), 1.03)
    check(f"CUTLASS sm90 fused GEMM alone (xa given) / bare GEMM, {shape}",
          f and f["ratio_to_bare"].get("cuda_cutlass_fused_gemm"), 1.03)
    check(f"fwd+bwd / (bare fwd + bare dX GEMM), {shape}", fb and fb["ratio_to_bare"].get("triton"), 1.10)
    check(f"fwd+bwd with dropout p=0.05 / (bare fwd + bare dX GEMM), {shape}",
          fbd and fbd["ratio_to_bare"].get("triton"), 1.15)
    for d, r in (("fwd", f), ("fwd+bwd", fb)):  # the floor auto must never lose to
        tri, cb = (r["ms"].get("triton"), r["ms"].get("cublas")) if r else (None, None)
        check(f"triton / cuBLAS-composition floor ({d}), {shape}", tri / cb if tri and cb else None, 1.0)
    for d, r in (("fwd+bwd", fb), ("fwd", f)):
        sp = None
        if r and r["ms"].get("peft") and r["ms"].get("triton"):
            sp = r["ms"]["peft"] / r["ms"]["triton"]
        check(f"speed-up over PEFT ({d}), {shape}", sp, 1.25, "≥")
    # Quantized bases (#16; bench/quant_columns.py): ratios to the bare bf16 GEMM and to PEFT.
    check(f"FP8 fused forward / bare bf16 GEMM, {shape}", f and f["ratio_to_bare"].get("fp8_ours"),
          0.65)
    # the fp8 x fp8 path (act_quant="e4m3_per_token", ≈ 2 % error): the one meant to meet it
    check(f"FP8 fused forward, fp8 x fp8 (act_quant) / bare bf16 GEMM, {shape}",
          f and f["ratio_to_bare"].get("fp8_act_ours"), 0.65)
    check(f"NF4 fused forward / bare bf16 GEMM, {shape}", f and f["ratio_to_bare"].get("nf4_ours"),
          1.15)
    nf = None
    if fb and fb["ms"].get("nf4_peft_bnb") and fb["ms"].get("nf4_ours"):
        nf = fb["ms"]["nf4_peft_bnb"] / fb["ms"]["nf4_ours"]
    check(f"NF4 fwd+bwd speed-up over PEFT + bitsandbytes, {shape}", nf, 1.5, "≥")
    for r_ in (16, 8, 64):
        dec = _find(rows, "fwd", M=1, K=4096, N=4096, r=r_, dropout=0.0)
        if dec:
            check(f"M=1 decode forward / bare GEMV (r={r_})", dec["ratio_to_bare"].get("triton"), 1.2)
            g = dec.get("graph_ms", {})
            if g.get("triton") and g.get("bare"):
                check(f"M=1 decode, CUDA-graph replay, / bare GEMV (r={r_})", g["triton"] / g["bare"], 1.2)
            nf4_dec = dec["ms"].get("nf4_ours")
            check(f"NF4 M=1 decode speed-up over the bf16 GEMV (r={r_})",
                  dec["ms"]["bare"] / nf4_dec if nf4_dec and dec["ms"].get("bare") else None,
                  2.5, "≥")
    return lines


# Legend names: "torch" alone reads as plain PyTorch, so every one of ours says whose it is.
PLOT_LABELS = {"unfused": "unfused torch ops (autograd)", "peft": "PEFT LoRA",
               "torch": "lora-kernels (torch backend)", "triton": "lora-kernels (Triton)",
               "triton_gemm": "our Triton GEMM, no LoRA", "cuda": "lora-kernels (CUDA)"}


def plot_fn(rows, quick):
    ours = "torch" if quick else "triton"
    r = min((x["r"] for x in rows), default=16)
    shapes = sorted({(x["K"], x["N"]) for x in rows if x["r"] == r})

    def plot(fig):
        directions = [d for d in ("fwd", "fwd+bwd") if any(x["direction"] == d for x in rows)]
        axes = fig.subplots(len(directions), max(len(shapes), 1), squeeze=False)
        for i, direction in enumerate(directions):
            for j, (K, N) in enumerate(shapes):
                ax = axes[i][j]
                sel = sorted((x for x in rows if x["direction"] == direction and x["K"] == K
                              and x["N"] == N and x["r"] == r), key=lambda x: x["M"])
                for name in dict.fromkeys(("unfused", "peft", "torch", ours, "triton_gemm",
                                           "cuda")):
                    pts = [(x["M"], x["ratio_to_bare"].get(name)) for x in sel
                           if x["ratio_to_bare"].get(name)]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=PLOT_LABELS.get(name, name))
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("M (rows)")
                ax.set_ylabel("time / bare base GEMM(s)")
                ax.set_title(f"{direction}, K={K} N={N} r={r}", fontsize=9)
                ax.legend(fontsize=7)
        mode = ("CPU --quick: fp32, tiny sizes, 1 thread; per-call overhead, not GPU kernels"
                if quick else "GPU")
        fig.suptitle(f"lora_linear vs the bare base GEMM (lower is better) — {mode}", fontsize=10)
        fig.tight_layout()
    return plot


def _row_key(r):
    return (r["M"], r["K"], r["N"], r["r"], r["direction"], r.get("dtype"), r.get("dropout"), r.get("bias"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny sizes, torch-only contenders")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN, e.g. 4096x4096,4096x14336")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--bias", action="store_true", help="give the base layer a bias (default none, like Llama)")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--rep", type=int, default=None, help="timing budget per measurement, ms")
    ap.add_argument("--append", action="store_true", help="merge into an existing results JSON")
    args = ap.parse_args(argv)
    mode = resolve_mode(args.quick, args.dtype)  # no GPU: --quick on the CPU, said so
    with quick_threads(mode):  # --quick: one thread (tiny GEMMs gain nothing from more)
        return run(args, mode.quick, mode.device, mode.dtype)


def run(args, quick, device, dtype):
    ms = [int(v) for v in args.ms.split(",")] if args.ms else list(QUICK_MS if quick else FULL_MS)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
              if args.shapes else list(QUICK_SHAPES if quick else FULL_SHAPES))
    ranks = [int(v) for v in args.ranks.split(",")] if args.ranks else list(QUICK_RANKS if quick else FULL_RANKS)
    rep = args.rep or (20 if quick else 100)
    out_dir = args.out or common.results_dir(quick)
    env = common.env_info(dtype, quick)
    settings = dict(ms=ms, shapes=shapes, ranks=ranks, dropout=args.dropout, bias=args.bias,
                    scaling=SCALING, rep_ms=rep, timer="do_bench median, L2 flushed" if not quick
                    else "perf_counter median, 1 thread",
                    graph_timer=None if quick else ("do_bench_cudagraph median per call, rotated over "
                                                    "graph_copies weight copies (>= 2x L2)"))

    rows = []
    json_path = Path(out_dir) / f"{NAME}.json"
    if args.append and json_path.exists():
        rows = json.loads(json_path.read_text()).get("rows", [])

    # The target shapes first, so a run cut short still answers them.
    grid = [(M, K, N, r) for (K, N) in shapes for r in ranks for M in ms]
    first = lambda t: (0 if (t[1], t[2], t[3]) == (4096, 4096, 16) and t[0] in (8192, 1) else 1)
    grid.sort(key=first)
    for M, K, N, r in grid:
        print(f"M={M} K={K} N={N} r={r}", flush=True)
        new = measure(M, K, N, r, dtype, device, p=args.dropout, bias=args.bias, quick=quick,
                      bwd=not args.no_bwd, rep=rep)
        keys = {_row_key(x) for x in new}
        rows = [x for x in rows if _row_key(x) not in keys] + new
        rows.sort(key=lambda x: (x["direction"], x["K"], x["N"], x["r"], x["M"]))
        common.write_results(out_dir, common.results_payload(NAME, rows, env, settings),
                             markdown(rows, env, quick), plot_fn(rows, quick), figsize=(12, 8))
        if not quick:
            torch.cuda.empty_cache()
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
