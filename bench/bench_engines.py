"""Kernel-level bench of SGLang LoRA backends on the same batch infos: ``lora_kernels`` (ours,
bench target ≥ 1.5× csgmv on decode, no slower on prefill) against SGLang's ``csgmv`` (its
default), ``triton`` and, on the CPU, ``torch_native``.

Every backend gets the same forward batch (``prepare_lora_batch`` with the same weight
indices, ranks and scalings), the same adapter buffers (SGLang's memory-pool layout: lora_A
tight at each slot's rank) and inputs. Per case and layer, one call adds the LoRA term into a
base output, as SGLang's layers call it:

* ``qkv``   — ``run_qkv_lora`` (three slices, q wider than k/v);
* ``plain`` — ``run_lora_a_sgemm`` + ``run_lora_b_sgemm`` (o_proj / down_proj);
* ``layer`` — the whole plain layer, ``base_fn()`` + LoRA through ``forward_with_base``
  (ours fuses base GEMM + LoRA there; SGLang's backends run torch.mm then their LoRA kernels).

Decode also runs every backend on its CUDA-graph batch info (``<name>[graph-batch]``: what a
captured decode graph reads; ours then knows only bounds — all slots active, segments up to
T — instead of the exact batch, which can change the kernels' plan).

Cases (``--quick``: tiny sizes on the CPU, ours vs torch_native only):
* ``decode``  — 64 requests × 1 token over 64 distinct adapters, r = 16;
* ``prefill`` — 32 requests × 128 tokens over 32 adapters, r = 16.

Timing on CUDA: ``common.bench`` (do_bench, L2 flushed) for eager calls and
``common.bench_graph`` (CUDA-graph replay, what SGLang's decode graphs see); CPU: wall clock.
Every contender's output is checked against torch_native's (CPU) or ours (GPU) before it is
timed. GPU numbers are **pending** (no device in the session that wrote this).

    python bench/bench_engines.py [--quick] [--out DIR] [--only decode,prefill]

Writes ``bench_engines.{json,md}`` under ``--out`` (default bench/results/<device>/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import bench, bench_graph, env_info, env_line, md_table, results_dir, \
    results_payload, write_results  # noqa: E402

CASES = {  # name: (requests, tokens per request, distinct adapters)
    "decode": (64, 1, 64),
    "prefill": (32, 128, 32),
}
QUICK_CASES = {"decode": (8, 1, 8), "prefill": (4, 6, 3)}
SHAPES = dict(K=4096, q=4096, kv=1024, N=4096, r=16)
QUICK_SHAPES = dict(K=40, q=24, kv=8, N=36, r=4)


def load_backends(device):
    """``{name: backend instance or reason string}``."""
    from sglang.srt.lora.backend.base_backend import BaseLoRABackend
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend

    from lora_kernels.integrations.sglang_backend import LoRAKernelsSGLangBackend

    out = {"lora_kernels": LoRAKernelsSGLangBackend, "torch_native": TorchNativeLoRABackend}
    if device.type == "cpu":
        sys.path.insert(0, str(REPO / "tests"))
        from engine_env import unpin_sglang_torch_native
        unpin_sglang_torch_native()  # torch_native pins host copies: needs a CUDA driver
    if device.type == "cuda":
        for name, mod, cls in (("csgmv", "chunked_backend", "ChunkedSgmvLoRABackend"),
                               ("triton", "triton_backend", "TritonLoRABackend")):
            try:
                m = __import__(f"sglang.srt.lora.backend.{mod}", fromlist=[cls])
                out[name] = getattr(m, cls)
            except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
                out[name] = f"import failed: {type(exc).__name__}: {exc}"
    else:
        out["csgmv"] = out["triton"] = "needs CUDA (Triton kernels)"

    def make(cls, slots):
        if isinstance(cls, str):
            return cls
        if cls.__name__ == "ChunkedSgmvLoRABackend":
            # Its __init__ reads the server's --max-lora-chunk-size from a global config that
            # a bench has no server for: build it with the default (16) instead.
            be = cls.__new__(cls)
            BaseLoRABackend.__init__(be, slots, device)
            be.max_chunk_size = 16
            return be
        return cls(slots, device)
    return out, make


def forward_batch(reqs: int, tpr: int, device):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    lens = [tpr] * reqs
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE if tpr == 1 else ForwardMode.EXTEND, batch_size=reqs,
        extend_seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        extend_seq_lens_cpu=lens, extend_num_tokens=sum(lens), seq_lens_cpu=torch.tensor(lens),
        return_logprob=False, spec_info=None, is_extend_in_batch=tpr > 1,
        global_num_tokens_cpu=None,
        lora_ids=[f"a{i}" for i in range(reqs)])


def inputs(case, shapes, dtype, device, gen):
    reqs, tpr, n_ad = case
    S, r, K = n_ad + 1, shapes["r"], shapes["K"]          # + the rank-0 base slot
    qkv = [shapes["q"], shapes["kv"], shapes["kv"]]
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.05).to(device, dtype)  # noqa: E731
    ranks = [r] * n_ad + [0]
    return SimpleNamespace(
        S=S, T=reqs * tpr, qkv=qkv, weight_indices=[i % n_ad for i in range(reqs)], ranks=ranks,
        scalings=[2.0] * n_ad + [0.0], x=rnd(reqs * tpr, K),
        a_qkv=rnd(S, 3 * r, K), b_qkv=rnd(S, sum(qkv), r),
        a=rnd(S, r, K), b=rnd(S, shapes["N"], r), w=rnd(shapes["N"], K),
        off_qkv=torch.tensor([0, qkv[0], qkv[0] + qkv[1], sum(qkv)], dtype=torch.int32),
        off=torch.tensor([0, shapes["N"]], dtype=torch.int32))


class _PlainLayer:
    """What forward_with_base sees of an unquantized, bias-free linear layer."""

    def __init__(self, backend, inp):
        qm = type("UnquantizedLinearMethod", (), {})()
        self.base_layer = SimpleNamespace(weight=inp.w, bias=None, skip_bias_add=False,
                                          quant_method=qm)
        self.backend, self.inp = backend, inp

    def apply_lora(self, base_output, x):
        be, inp = self.backend, self.inp
        xa = be.run_lora_a_sgemm(x, inp.a)
        return be.run_lora_b_sgemm(x=xa, weights=inp.b, output_offset=inp.off.to(x.device),
                                   output_offset_cpu=inp.off, base_output=base_output)


def calls(be, inp):
    dev = inp.x.device
    off_qkv, off = inp.off_qkv.to(dev), inp.off.to(dev)
    base_qkv = torch.zeros(inp.T, sum(inp.qkv), dtype=inp.x.dtype, device=dev)
    base = torch.zeros(inp.T, inp.w.shape[0], dtype=inp.x.dtype, device=dev)
    layer = _PlainLayer(be, inp)

    def qkv():
        return be.run_qkv_lora(x=inp.x, qkv_lora_a=inp.a_qkv, qkv_lora_b=inp.b_qkv,
                               output_offset=off_qkv, output_offset_cpu=inp.off_qkv,
                               max_qkv_out_dim=max(inp.qkv), base_output=base_qkv.zero_())

    def plain():
        xa = be.run_lora_a_sgemm(inp.x, inp.a)
        return be.run_lora_b_sgemm(x=xa, weights=inp.b, output_offset=off,
                                   output_offset_cpu=inp.off, base_output=base.zero_())

    def whole():
        return be.forward_with_base(layer, inp.x, lambda: inp.x @ inp.w.T, inp.a, inp.b, off,
                                    (0, inp.w.shape[0]))
    return {"qkv": qkv, "plain": plain, "layer": whole}


def _decode_plan(fn):
    """``fn`` planned as decode: the graph batch only bounds segments by T, which makes the
    planner pick prefill-shaped tiles (the public ``override`` of lora_kernels' Triton
    planner; planning happens on the host, so a captured graph keeps the decode kernels)."""
    from lora_kernels.triton import multi_lora as tml

    def run():
        with tml.override(shape="decode"):
            return fn()
    return run


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = QUICK_CASES if args.quick else CASES
    shapes = QUICK_SHAPES if args.quick else SHAPES
    only = set(args.only.split(",")) if args.only else set(cases)
    classes, make = load_backends(device)
    rows = []
    for cname, case in cases.items():
        if cname not in only:
            continue
        gen = torch.Generator().manual_seed(0)
        inp = inputs(case, shapes, dtype, device, gen)
        fb = forward_batch(case[0], case[1], device)
        results, outputs = {}, {}
        variants = [(b, c, False) for b, c in classes.items()]
        if case[1] == 1:  # decode: also each backend's static CUDA-graph batch info
            variants += [(b + "[graph-batch]", c, True) for b, c in classes.items()]
            if device.type == "cuda":  # ours with the planner told it is decode (see notes)
                variants.append(("lora_kernels[graph-batch,decode-plan]",
                                 classes["lora_kernels"], True))
        for bname, cls, graph_batch in variants:
            be = make(cls, inp.S)
            if isinstance(be, str):
                results[bname] = be
                continue
            try:
                if graph_batch:
                    be.init_decode_cuda_graph_batch_info(case[0], case[1])
                be.prepare_lora_batch(fb, inp.weight_indices, inp.ranks, inp.scalings,
                                      graph_batch)
                fns = calls(be, inp)
                if bname.endswith("decode-plan]"):
                    fns = {k: _decode_plan(f) for k, f in fns.items()}
                outputs[bname] = {k: f().clone() for k, f in fns.items()}
                results[bname] = fns
            except Exception as exc:  # noqa: BLE001 - record why a contender did not run
                results[bname] = f"failed: {type(exc).__name__}: {exc}"
        oracle = "torch_native" if device.type == "cpu" else "lora_kernels"
        for bname, fns in results.items():
            for layer in ("qkv", "plain", "layer"):
                row = dict(case=cname, T=inp.T, adapters=case[2], r=shapes["r"], layer=layer,
                           backend=bname, ms=None, graph_ms=None, err=None, note="")
                if isinstance(fns, str):
                    row["note"] = fns
                elif oracle in outputs and layer in outputs.get(bname, {}):
                    row["err"] = rel_err(outputs[bname][layer], outputs[oracle][layer])
                    if row["err"] > (1e-2 if dtype == torch.bfloat16 else 1e-4):
                        row["note"] = f"output differs from {oracle}: not timed"
                    else:
                        row["ms"] = bench(fns[layer], rep=args.rep)
                        row["graph_ms"] = bench_graph(fns[layer], rep=args.rep)
                rows.append(row)
    return rows, device, dtype


def summarize(rows) -> list[dict]:
    """Speed-up of ours over each peer per (case, layer): the issue's target is csgmv."""
    out = []
    for (case, layer) in sorted({(r["case"], r["layer"]) for r in rows}):
        mine = [r for r in rows if (r["case"], r["layer"]) == (case, layer)]
        for r in mine:
            graph = r["backend"].endswith("[graph-batch]")
            ours = next((o for o in mine if o["backend"] ==
                         ("lora_kernels[graph-batch]" if graph else "lora_kernels")), None)
            if r["backend"].startswith("lora_kernels") or ours is None:
                continue
            for key in ("ms", "graph_ms"):
                if ours.get(key) and r.get(key):
                    out.append(dict(case=case, layer=layer, peer=r["backend"], timing=key,
                                    speedup=r[key] / ours[key]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--only", default="", help="comma-separated cases: decode,prefill")
    p.add_argument("--out", default=None, help="results folder")
    p.add_argument("--rep", type=int, default=100, help="timing budget per contender (ms)")
    args = p.parse_args(argv)
    try:
        rows, device, dtype = run(args)
    except ImportError as exc:
        print(f"bench_engines needs sglang (python tests/engine_env.py sglang): {exc}",
              file=sys.stderr)
        return 2
    env = env_info(dtype, quick=args.quick)
    speedups = summarize(rows)
    headers = ["case", "T", "layer", "backend", "ms", "graph ms", "rel err", "note"]
    md = ["# SGLang LoRA backends, kernel level", "", env_line(env), "",
          md_table(headers, [[r["case"], r["T"], r["layer"], r["backend"], r["ms"],
                              r["graph_ms"], r["err"], r["note"]] for r in rows])]
    if speedups:
        md += ["", "## lora_kernels speed-up (peer time / ours)", "",
               md_table(["case", "layer", "peer", "timing", "×"],
                        [[s["case"], s["layer"], s["peer"], s["timing"], s["speedup"]]
                         for s in speedups])]
    if device.type == "cpu":
        md += ["", "CPU run: timings are the reference paths' wall clock on a shared CPU, not "
               "kernel performance. GPU numbers are pending."]
    out = Path(args.out) if args.out else results_dir(quick=args.quick)
    payload = results_payload("bench_engines", rows, env,
                              dict(quick=args.quick, shapes=QUICK_SHAPES if args.quick else SHAPES,
                                   cases=QUICK_CASES if args.quick else CASES),
                              speedups=speedups)
    for path in write_results(out, payload, "\n".join(md)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
