"""The headline benchmarks in one process, most important first, each written when it finishes.

1. fused single-adapter forward and forward+backward at M=8192, K=N=4096, r=16 (bf16) against
   the bare cuBLAS GEMM, the cuBLAS composition floor, PEFT and the CUDA extension
   (bench/bench_lora_linear.py: every contender side by side in this process);
2. multi-adapter decode T=64 all distinct r=16 against SGLang's kernels, and prefill T=8192
   with 64 adapters (bench/bench_multi_lora.py --headline);
3. the same single-adapter shape with dropout p=0.05 (the ≤ 1.15× target);
4. M=1 decode (≤ 1.2× the bare GEMV).

One process: CUDA context, imports, compiled kernels and autotune results are shared by every
part (the per-script startup is paid once). ``--budget`` stops starting new parts once spent;
``--max-configs`` bounds autotuning (the first N configs of each list, which are the
Hopper-sized ones). Writes ``headline.json`` (seconds and autotune seconds per part) beside the
bench scripts' own results under ``--out``.

    python bench/headline.py --out DIR [--budget 240] [--max-configs 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import autotune_budget  # noqa: E402

TARGET = ["--shapes", "4096x4096", "--ranks", "16"]


def parts(out: str) -> list:
    """(name, callable) in priority order; each writes its results into ``out``."""
    import bench_lora_linear as bll
    import bench_multi_lora as bml
    return [
        ("single-adapter M=8192 fwd, fwd+bwd", lambda: bll.main(["--ms", "8192", *TARGET, "--out", out])),
        ("multi-adapter decode T=64 + prefill T=8192", lambda: bml.main(["--headline", "--out", out])),
        ("single-adapter M=8192 fwd+bwd, dropout 0.05",
         lambda: bll.main(["--ms", "8192", *TARGET, "--dropout", "0.05", "--append", "--out", out])),
        ("single-adapter M=1 decode", lambda: bll.main(["--ms", "1", *TARGET, "--no-bwd", "--append",
                                                        "--out", out])),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; no new part starts after")
    ap.add_argument("--max-configs", type=int, default=0, help="autotune configs per kernel (0 = all)")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("headline: no CUDA device; nothing to measure")
        return 0
    t0 = time.monotonic()
    limited = autotune_budget.limit_configs(args.max_configs) if args.max_configs else {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = {"budget_s": args.budget, "max_configs": args.max_configs, "autotuners": limited, "parts": []}
    failed = 0
    for name, fn in parts(args.out):
        spent = time.monotonic() - t0
        if spent >= args.budget:
            print(f"[headline] SKIPPED {name}: budget {args.budget:.0f} s spent", flush=True)
            record["parts"].append({"part": name, "status": "skipped (budget)"})
            continue
        print(f"[headline] {name} (at {spent:.0f} s)", flush=True)
        t = time.monotonic()
        try:
            rc = fn()
            status = f"rc={rc}"
        except Exception as exc:  # noqa: BLE001 - the next part still runs
            status = f"crashed: {type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        failed += status != "rc=0"
        record["parts"].append({"part": name, "status": status,
                                "seconds": round(time.monotonic() - t, 1),
                                "autotune_s": autotune_budget.tuning_seconds()})
        print(f"[headline] {name}: {status} in {time.monotonic() - t:.0f} s", flush=True)
        (Path(args.out) / "headline.json").write_text(json.dumps(record, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
