"""Decode steps as captured CUDA graphs, one per token bucket, serving any adapter mix
(bench_serving.py's graph section; also runnable alone).

The model is the linear part of a Llama-3-8B decode step (per layer: packed qkv, o, packed
gate_up, down, with RMSNorm and SiLU·mul between them; no attention over a KV cache, so the
base-only step here is *cheaper* than a real one and LoRA's share is an upper bound). LoRA sits
on all four linears of every layer: ``MAX_ADAPTERS`` slots, ranks cycling {8, 16, 64} (r_max
64; mixed ranks cost their real rank).

For each token bucket T:
  * **base**: the stack with plain ``F.linear``, one graph;
  * **ours**: ``multi_lora_linear`` over a static ``LoRABatch`` (``LoRABatch.static``), one
    graph captured **once**; for every adapter mix (1/8/32/128 adapters, sequence i → adapter
    i mod n) the batch is refreshed in place (no host sync) and the same graph replayed; each
    replay is checked bit-equal to an eager call on the same batch, and against the exact
    (host-int) batch within bf16 tolerance;
  * **sglang_csgmv / sglang_triton**: SGLang's chunked-SGMV kernels and its "triton" backend's
    segment GEMMs (``sgemm_lora_a`` + ``qkv_lora_b`` / ``gate_up_lora_b`` / ``sgemm_lora_b``)
    from the installed wheel, metadata built per mix on the host (no in-place refresh), a graph
    captured per mix — generous to them; left out with the reason when the wheel won't import.
  * vLLM's punica Triton ops: reported as unavailable unless ``vllm`` imports (no wheel can
    travel with this torch build; the column says so instead of guessing an API).
tokens/s = T / median replay time (CUDA events, L2 not flushed between replays: weights
exceed L2 many times over). CPU (--quick): tiny shapes, the same harness without graphs.
"""

from __future__ import annotations

import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lora_kernels, not an installed copy
sys.path.insert(0, str(REPO / "bench"))

RANKS = (8, 16, 64)
MAX_ADAPTERS = 128
MIXES = (1, 8, 32, 128)


def shapes(quick: bool) -> dict:
    if quick:
        return dict(H=64, KV=16, I=96, layers=2, buckets=(8,), reps=3, slots=16,
                    mixes=(1, 4, 16))
    return dict(H=4096, KV=1024, I=14336, layers=4, buckets=(16, 64, 256), reps=50,
                slots=MAX_ADAPTERS, mixes=MIXES)


class Stack:
    """Weights of the linear decode stack and its LoRA stacks (random, seeded)."""

    def __init__(self, sh: dict, dev, dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        H, KV, I, S, R = sh["H"], sh["KV"], sh["I"], sh["slots"], max(RANKS)

        def rnd(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)
        self.shapes = {"qkv": (H, (H, KV, KV)), "o": (H, (H,)), "gate_up": (H, (I, I)),
                       "down": (I, (H,))}
        self.ranks = torch.tensor([RANKS[s % len(RANKS)] for s in range(S)], dtype=torch.int32,
                                  device=dev)
        self.scal = torch.full((S,), 0.5, device=dev)
        self.layers = []
        for _ in range(sh["layers"]):
            layer = {}
            for name, (K, slices) in self.shapes.items():
                N, n = sum(slices), len(slices)
                live = (torch.arange(R)[None, :] < self.ranks.cpu()[:, None]).to(dev, dtype)
                A = rnd(S, n * R, K, scale=K ** -0.5) * live.repeat(1, n)[:, :, None]
                B = rnd(S, N, R, scale=0.02) * live[:, None, :]
                layer[name] = (rnd(N, K, scale=K ** -0.5), A, B, slices)
            self.layers.append(layer)

    def step(self, x, linear):
        """One decode step of the stack; ``linear(x, name, layer)`` applies one projection."""
        H = self.shapes["o"][0]
        for layer in self.layers:
            h = F.rms_norm(x, (H,))
            q, k, v = linear(h, "qkv", layer).split(list(self.shapes["qkv"][1]), -1)
            # Attention stand-in: over the current token alone, attention returns v for every
            # query head of its group (q and k would meet the KV cache, which is not modelled).
            attn = v.repeat(1, H // v.shape[-1]) + 0 * q[:, :1]
            x = x + linear(attn, "o", layer)
            g_, u = linear(F.rms_norm(x, (H,)), "gate_up", layer).chunk(2, -1)
            x = x + linear(F.silu(g_) * u, "down", layer)
        return x


def base_linear(h, name, layer):
    return F.linear(h, layer[name][0])


def ours_linear(stack: Stack, batch, backend="auto"):
    import lora_kernels as lk

    def linear(h, name, layer):
        W, A, B, slices = layer[name]
        return lk.multi_lora_linear(h, W, None, A, B, batch, scalings=stack.scal,
                                    ranks=stack.ranks, backend=backend,
                                    out_slices=slices if len(slices) > 1 else None)
    return linear


def sglang_linear(stack: Stack, ids, kernels):
    """SGLang's csgmv shrink + expand on top of the base GEMM (its own metadata for ``ids``)."""
    from multi_lora_baselines import make_sgl
    shrink, expand = kernels
    deltas = {}

    def linear(h, name, layer):
        W, A, B, slices = layer[name]
        key = (id(layer), name)
        if key not in deltas:  # per layer: SGLang's A layout for mixed ranks + its batch info
            ns = types.SimpleNamespace(ids=[ids], ranks=stack.ranks, scal=stack.scal, A=A, B=B,
                                       case=types.SimpleNamespace(slices=slices, r_max=A.shape[1]
                                                                  // len(slices), rank="mixed"))
            deltas[key] = (ns, make_sgl(ns, shrink, expand))
        ns, delta = deltas[key]
        y = F.linear(h, W)
        ns.xs, ns.ys = [h.contiguous()], [y]
        delta(ns, 0)
        return ns.ys[0]
    return linear


def load_sglang_triton():
    """SGLang's "triton" LoRA backend kernels (segment GEMMs: ``sgemm_lora_a``, ``qkv_lora_b``,
    ``gate_up_lora_b``, ``sgemm_lora_b``) from the installed wheel, or ``(None, why)``."""
    import importlib
    from multi_lora_baselines import load_sglang
    shrink, _, how = load_sglang()  # imports sglang (or stubs its srt helpers) once
    if shrink is None:
        return None, how
    base = "sglang.kernels.ops.lora.dense."
    try:
        mods = {n: importlib.import_module(base + n) for n in
                ("sgemm_lora_a", "sgemm_lora_b", "qkv_lora_b", "gate_up_lora_b")}
    except Exception as exc:  # noqa: BLE001
        return None, f"sglang triton backend not importable ({type(exc).__name__}: {exc})"
    return mods, how


def sglang_triton_linear(stack: Stack, ids, mods):
    """SGLang's triton backend on top of the base GEMM: the A-side segment GEMM, then the
    qkv / gate_up / plain B-side kernel, each adding into y. Its adapter pool packs the slices
    of a rank-r adapter at stride r: A is re-laid once per layer (same weights)."""
    from multi_lora_baselines import sgl_batch_info
    info = sgl_batch_info(ids, stack.ranks, stack.scal)
    ranks = stack.ranks.tolist()
    relaid = {}

    def linear(h, name, layer):
        W, A, B, slices = layer[name]
        n = len(slices)
        key = (id(layer), name)
        if key not in relaid:
            R = A.shape[1] // n
            a = torch.zeros_like(A)
            for slot, rk in enumerate(ranks):
                a[slot, :n * rk] = A[slot].view(n, R, -1)[:, :rk].reshape(n * rk, -1)
            edges = [0]
            for w in slices:
                edges.append(edges[-1] + w)
            relaid[key] = (a.contiguous(), torch.tensor(edges, dtype=torch.int32, device=A.device))
        a, offsets = relaid[key]
        y = F.linear(h, W)
        xa = mods["sgemm_lora_a"].sgemm_lora_a_fwd(h.contiguous(), a, info, n)
        if name == "qkv":
            return mods["qkv_lora_b"].qkv_lora_b_fwd(xa, B, info, offsets, max(slices), y, n)
        if name == "gate_up":
            return mods["gate_up_lora_b"].gate_up_lora_b_fwd(xa, B, info, slices[0], y)
        return mods["sgemm_lora_b"].sgemm_lora_b_fwd(xa, B, info, y)
    return linear


def _vllm_status() -> str:
    try:
        import vllm.lora.ops.triton_ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: vllm not importable ({type(exc).__name__})"
    return "unavailable: vllm imports, but its punica call path is not wired here yet"


class Graph:
    """``fn()`` captured once on CUDA (replay = ``run()``); on the CPU ``run()`` calls it."""

    def __init__(self, fn, cuda: bool):
        self.fn, self.cuda = fn, cuda
        self.out = fn()  # warm-up: compiles kernels, fills caches, checks ranks once
        if cuda:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            self.g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.g):
                self.out = fn()

    def run(self):
        if self.cuda:
            self.g.replay()
            return self.out
        return self.fn()


def time_ms(run, cuda: bool, reps: int) -> float:
    import time
    times = []
    for i in range(reps + 2):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 2:
            times.append(ms)
    return statistics.median(times)


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mix_ids(T: int, n: int) -> torch.Tensor:
    return torch.arange(T) % n


def run_rows(quick: bool, dev, dtype, errors: dict) -> list[dict]:
    """One row per (bucket, mix, contender): tokens/s, % of base, and the replay check."""
    import lora_kernels as lk
    from multi_lora_baselines import load_sglang
    sh = shapes(quick)
    cuda = dev.type == "cuda"
    stack = Stack(sh, dev, dtype)
    sgl = load_sglang() if cuda else (None, None, "sglang: CUDA only")
    # SGLang's triton backend also runs under the Triton interpreter (TRITON_INTERPRET=1).
    sgl_tri = load_sglang_triton() if cuda or _interpreting() else (None, "sglang: CUDA only")
    vllm = _vllm_status()
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    rows = []
    for T in sh["buckets"]:
        x = (torch.randn(T, sh["H"], generator=torch.Generator().manual_seed(T)) * 0.5).to(dev, dtype)
        base = Graph(lambda: stack.step(x, base_linear), cuda)
        base_ms = time_ms(base.run, cuda, sh["reps"])
        rows.append({"T": T, "adapters": 0, "method": "base", "ms": base_ms,
                     "tokens_per_s": T / base_ms * 1e3, "pct_of_base": 100.0})
        batch = lk.LoRABatch.static(T, sh["slots"], dev)
        batch.refresh_(mix_ids(T, sh["mixes"][0]).to(dev))
        ours = Graph(lambda: stack.step(x, ours_linear(stack, batch)), cuda)  # captured once
        for n in sh["mixes"]:
            ids = mix_ids(T, n)
            batch.refresh_(ids.to(dev))
            out = ours.run().clone()
            eager = stack.step(x, ours_linear(stack, batch))
            exact = stack.step(x, ours_linear(stack, lk.LoRABatch.from_adapter_ids(ids.to(dev),
                                                                                  sh["slots"])))
            err = ((out.float() - exact.float()).norm() / exact.float().norm()).item()
            ms = time_ms(ours.run, cuda, sh["reps"])
            rows.append({"T": T, "adapters": n, "method": "ours", "ms": ms,
                         "tokens_per_s": T / ms * 1e3, "pct_of_base": 100.0 * base_ms / ms,
                         "replay_equals_eager": bool(torch.equal(out, eager)),
                         "rel_err_vs_exact_batch": err, "ok": bool(torch.equal(out, eager))
                         and err <= tol, "graph": "one per bucket" if cuda else "eager (CPU)"})
            peers = []
            if sgl[0] is not None:  # SGLang builds its metadata per mix (host), on warm-up
                peers.append(("sglang_csgmv", lambda: sglang_linear(stack, ids.to(dev), sgl[:2])))
            if sgl_tri[0] is not None:
                peers.append(("sglang_triton",
                              lambda: sglang_triton_linear(stack, ids.to(dev), sgl_tri[0])))
            for method, make in peers:
                try:
                    lin = make()
                    g = Graph(lambda: stack.step(x, lin), cuda)
                    got = g.run()
                    serr = ((got.float() - exact.float()).norm() / exact.float().norm()).item()
                    sms = time_ms(g.run, cuda, sh["reps"])
                    rows.append({"T": T, "adapters": n, "method": method, "ms": sms,
                                 "tokens_per_s": T / sms * 1e3,
                                 "pct_of_base": 100.0 * base_ms / sms,
                                 "rel_err_vs_exact_batch": serr, "ok": serr <= tol,
                                 "graph": "one per mix" if cuda else "eager (CPU)"})
                except Exception as exc:  # noqa: BLE001 - a peer failing must not stop ours
                    errors[f"{method} T={T} n={n}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del ours, base, batch
        if cuda:
            torch.cuda.empty_cache()
    if sgl[0] is None:
        errors["sglang_csgmv"] = sgl[2]
    if sgl_tri[0] is None:
        errors["sglang_triton"] = sgl_tri[1]
    errors["vllm_punica"] = vllm
    return rows


def markdown_section(rows: list[dict], errors: dict) -> str:
    import common
    table = [[r["T"], r["adapters"] or "-", r["method"], f"{r['tokens_per_s']:,.0f}",
              f"{r['pct_of_base']:.1f}%", f"{r['ms'] * 1e3:.0f}", r.get("graph", "-"),
              "-" if "ok" not in r else ("yes" if r["ok"] else "**NO**")] for r in rows]
    notes = "\n".join(f"- {k}: {v}" for k, v in errors.items()
                      if k in ("sglang_csgmv", "sglang_triton", "vllm_punica")
                      or k.startswith("sglang_"))
    return f"""## Captured decode graphs, any adapter mix (linear stack of Llama-3-8B layers)

Ranks cycle {{8, 16, 64}} over the slots; sequence i uses adapter i mod n. One graph per token
bucket for ours, refreshed in place between mixes; "ok" = replay bit-equal to eager on the same
batch and within tolerance of the exact batch.

{common.md_table(["T", "adapters", "method", "tokens/s", "% of base", "µs/step", "graph", "ok"],
                 table)}

{notes}
"""


if __name__ == "__main__":
    quick = "--quick" in sys.argv or not torch.cuda.is_available()
    dev = torch.device("cpu" if quick else "cuda")
    errs: dict = {}
    rs = run_rows(quick, dev, torch.float32 if quick else torch.bfloat16, errs)
    print(markdown_section(rs, errs))
