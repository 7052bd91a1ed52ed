"""DoRA on the CPU torch backend against PEFT's DoRA layer, paired and interleaved.

Each round runs every contender once, in an order rotated per round (the shared VM drifts by
2x over minutes, so only same-round ratios are comparable); the report gives each contender's
min and the paired median ratios. Contenders come from ``bench_lora_linear.contenders``:
``bare`` (``x·Wᵀ`` [+ ``dY·W``]), ``torch`` (our plain LoRA), ``peft_dora``, ``dora_torch``.

    python bench/bench_dora_cpu.py [--m 2048] [--k 1024] [--n 1024] [--r 16] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_linear as BL  # noqa: E402

NAMES = ("bare", "torch", "peft_dora", "dora_torch")


def paired(table: dict, rounds: int) -> dict:
    times = {n: [] for n in NAMES}
    for fn in table.values():
        fn()  # warm-up
    for i in range(rounds):
        order = NAMES[i % len(NAMES):] + NAMES[:i % len(NAMES)]
        for n in order:
            t0 = time.perf_counter()
            table[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {"min_ms": {n: min(v) for n, v in times.items()},
            "dora/peft_dora": ratio("dora_torch", "peft_dora"),
            "dora/lora": ratio("dora_torch", "torch"),
            "peft_dora/lora": ratio("peft_dora", "torch"),
            "dora/bare": ratio("dora_torch", "bare")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fns = BL.contenders(args.m, args.k, args.n, args.r, torch.float32, "cpu", p=0.0, bias=False,
                        quick=True)
    print(f"M={args.m} K={args.k} N={args.n} r={args.r} fp32, {args.threads} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    for direction in ("fwd", "fwd+bwd"):
        res = paired({n: fns[direction][n] for n in NAMES}, args.rounds)
        mins = ", ".join(f"{n} {v:.2f}" for n, v in res.pop("min_ms").items())
        print(f"{direction}: min ms: {mins}")
        print(f"{direction}: paired medians: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
