"""CPU speed of the torch backend vs the bare F.linear and PEFT, side by side in one process.

Default: 2 threads, M=2048, K=N=1024, r=16, float32 (issue #2's setting). This machine is noisy
(±10% run to run), so candidates are interleaved round by round and the *minimum* per candidate
is compared. Writes ``cpu_torch_backend.{json,md}`` (bench/common.write_results: the record
carries commit, device and versions) under bench/results/cpu/ (``--out`` to change).

    python bench/bench_cpu_torch.py [--rounds 15] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lora_kernels as lk  # noqa: E402

NAME = "cpu_torch_backend"


def _peft_layer(lin, r, n_adapters=1):
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = lin

        def forward(self, x, **kw):
            return self.proj(x)

    model = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                              init_lora_weights=False))
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                              init_lora_weights=False))
    return model.eval()  # adapter_names= is inference-only in PEFT; no dropout anyway


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(M=2048, K=1024, N=1024, r=16, n_mixed=16, rounds=15, threads=2):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=True)
    lin.requires_grad_(False)
    x = torch.randn(M, K)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(M, N)
    A = (torch.randn(r, K) / K ** 0.5).requires_grad_(True)
    B = torch.randn(N, r).requires_grad_(True)
    s = 2.0

    # multi-adapter stack
    S = n_mixed
    As = torch.randn(S, r, K) / K ** 0.5
    Bs = torch.randn(S, N, r)
    ids = torch.arange(M) % S
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    scal = torch.full((S,), s)

    peft1 = _peft_layer(lin, r)
    peftm = _peft_layer(torch.nn.Linear(K, N).requires_grad_(False), r, n_mixed)
    names = ["default"] + [f"a{i}" for i in range(1, n_mixed)]
    mixed_names = [names[i] for i in ids.tolist()]

    def fwd_base():
        with torch.no_grad():
            F.linear(x, lin.weight, lin.bias)

    def fwd_ours():
        with torch.no_grad():
            lk.lora_linear(x, lin.weight, lin.bias, A, B, scaling=s, backend="torch")

    def fwd_peft():
        with torch.no_grad():
            peft1(x)

    def fb_base():
        F.linear(xg, lin.weight, lin.bias).backward(dy)

    def fb_ours():
        lk.lora_linear(xg, lin.weight, lin.bias, A, B, scaling=s, backend="torch").backward(dy)

    def fb_peft():
        peft1(xg).backward(dy)

    def mixed_ours():
        with torch.no_grad():
            lk.multi_lora_linear(x, lin.weight, lin.bias, As, Bs, batch, scalings=scal, backend="torch")

    def mixed_peft():
        with torch.no_grad():
            peftm(x, adapter_names=mixed_names)

    cands = {"fwd/bare F.linear": fwd_base, "fwd/ours": fwd_ours, "fwd/PEFT": fwd_peft,
             "fwd+bwd/bare F.linear": fb_base, "fwd+bwd/ours": fb_ours, "fwd+bwd/PEFT": fb_peft,
             f"mixed{n_mixed}/ours": mixed_ours, f"mixed{n_mixed}/PEFT adapter_names": mixed_peft}
    for fn in cands.values():  # warm-up
        fn()
    times = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():  # interleaved: drift hits every candidate alike
            times[k].append(_timeit(fn))
    best = {k: min(v) * 1e3 for k, v in times.items()}
    denom = {"fwd/ours": "fwd/bare F.linear", "fwd/PEFT": "fwd/bare F.linear",
             "fwd+bwd/ours": "fwd+bwd/bare F.linear", "fwd+bwd/PEFT": "fwd+bwd/bare F.linear",
             f"mixed{n_mixed}/ours": "fwd/bare F.linear",
             f"mixed{n_mixed}/PEFT adapter_names": "fwd/bare F.linear"}
    ratio = {k: best[k] / best[d] for k, d in denom.items()}
    # Paired: each round's candidate over the same round's baseline, median over rounds — the
    # VM's slow drift (seen: the same GEMM at 25 ms and 45 ms minutes apart) cancels out.
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times[d]))
              for k, d in denom.items()}
    return {"setting": dict(M=M, K=K, N=N, r=r, n_mixed=n_mixed, rounds=rounds, threads=threads,
                            dtype="float32"),
            "min_ms": best, "ratio_to_bare": ratio, "paired_median_ratio": paired}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--M", type=int, default=2048)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(M=a.M, rounds=a.rounds, threads=a.threads)
    env = common.env_info(torch.float32, quick=True)  # after run(): records its thread count
    env["mode"], env["device_label"] = "cpu", "cpu"  # a full-size CPU run, not the --quick check
    rows = [{"candidate": k, "min_ms": v, "ratio_to_bare": res["ratio_to_bare"].get(k),
             "paired_median_ratio": res["paired_median_ratio"].get(k)}
            for k, v in res["min_ms"].items()]
    table = common.md_table(["candidate", "min ms", "× bare (min/min)", "× bare (paired median)"],
                            [[r["candidate"], r["min_ms"], r["ratio_to_bare"], r["paired_median_ratio"]]
                             for r in rows])
    print(table)
    # Not results_dir(): these CPU runs have always lived in bench/results/cpu/ (cited by the docs).
    out = Path(a.out) if a.out else common.REPO / "bench" / "results" / "cpu"
    md = "\n".join([f"# {NAME}", "", common.env_line(env), "",
                    f"Setting: {res['setting']}; minimum over interleaved rounds.", "", table])
    paths = common.write_results(out, common.results_payload(NAME, rows, env, res["setting"]), md)
    print("wrote", *map(str, paths))


if __name__ == "__main__":
    main()
