"""CPU speed of the torch backend vs the bare F.linear and PEFT, side by side in one process.

Default: 2 threads, M in {1, 16, 2048}, K=N=1024, r=16, float32 (issue #2's setting plus the
small-M shapes of issue #22, where per-call overhead decides). This machine is noisy (±10% run
to run), so candidates are interleaved round by round and both the *minimum* per candidate and
the paired median ratio are reported. At small M one timed sample is a block of calls (one call
is tens of µs, below the timer's noise). Writes ``cpu_torch_backend[.TAG].{json,md}``
(bench/common.write_results: the record carries commit, device and versions) under
bench/results/cpu/ (``--out`` to change).

    python bench/bench_cpu_torch.py [--Ms 1,16,2048] [--KN 1024] [--rounds 15] [--threads 2]
                                    [--tag TAG] [--out DIR]
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


def _timeit(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def calls_per_sample(M: int, K: int, N: int) -> int:
    """Calls per timed sample: enough that a sample is ~>= 1 ms of work on this box."""
    flops = 2 * M * K * N
    return max(1, min(200, int(2e8 // max(flops, 1))))


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
    reps = calls_per_sample(M, K, N)
    for fn in cands.values():  # warm-up
        for _ in range(min(reps, 10)):
            fn()
    times = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():  # interleaved: drift hits every candidate alike
            times[k].append(_timeit(fn, reps))
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
                            dtype="float32", calls_per_sample=reps),
            "min_ms": best, "ratio_to_bare": ratio, "paired_median_ratio": paired,
            "times": times}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--Ms", default="1,16,2048", help="comma-separated row counts M")
    p.add_argument("--KN", type=int, default=1024, help="K = N")
    p.add_argument("--tag", default=None, help="results file suffix: cpu_torch_backend.TAG.*")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    Ms = [int(m) for m in a.Ms.split(",")]
    results = [run(M=M, K=a.KN, N=a.KN, rounds=a.rounds, threads=a.threads) for M in Ms]
    env = common.env_info(torch.float32, quick=True)  # after run(): records its thread count
    env["mode"], env["device_label"] = "cpu", "cpu"  # a full-size CPU run, not the --quick check
    rows = [{"M": res["setting"]["M"], "candidate": k, "min_ms": v,
             "ratio_to_bare": res["ratio_to_bare"].get(k),
             "paired_median_ratio": res["paired_median_ratio"].get(k),
             "ours_over_peft_paired": _ours_over_peft(res, k)}
            for res in results for k, v in res["min_ms"].items()]
    table = common.md_table(["M", "candidate", "min ms", "× bare (min/min)",
                             "× bare (paired median)", "ours / PEFT (paired median)"],
                            [[r["M"], r["candidate"], r["min_ms"], r["ratio_to_bare"],
                              r["paired_median_ratio"], r["ours_over_peft_paired"]] for r in rows])
    print(table)
    # Not results_dir(): these CPU runs have always lived in bench/results/cpu/ (cited by the docs).
    out = Path(a.out) if a.out else common.REPO / "bench" / "results" / "cpu"
    setting = {k: v for k, v in results[0]["setting"].items() if k not in ("M", "calls_per_sample")}
    setting["Ms"] = Ms
    setting["calls_per_sample"] = {r["setting"]["M"]: r["setting"]["calls_per_sample"]
                                   for r in results}
    md = "\n".join([f"# {NAME}", "", common.env_line(env), "",
                    f"Setting: {setting}; interleaved rounds. 'ours / PEFT' is the median over "
                    f"rounds of ours over PEFT in the same round (< 1: ours faster).", "", table])
    name = NAME if not a.tag else f"{NAME}.{a.tag}"
    paths = common.write_results(out, common.results_payload(name, rows, env, setting), md)
    print("wrote", *map(str, paths))


def _ours_over_peft(res: dict, candidate: str):
    """Paired median of ours / PEFT for an 'ours' row (per round, same round's PEFT)."""
    if not candidate.endswith("/ours"):
        return None
    group = candidate.split("/")[0]
    peft = next(k for k in res["times"] if k.startswith(group + "/PEFT"))
    pairs = zip(res["times"][candidate], res["times"][peft])
    return statistics.median(a / b for a, b in pairs)


if __name__ == "__main__":
    main()
