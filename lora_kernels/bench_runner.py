"""``lora-kernels bench``: run the benchmark suite in ``bench/`` and write its results files.

The scripts live in the repository's ``bench/`` folder, next to the package (an editable
install, ``pip install -e .``); a wheel does not ship them, so the runner says so and how to get
them. ``LORA_KERNELS_BENCH_DIR`` points it elsewhere.

``--quick`` (or no GPU): every benchmark at tiny sizes on the CPU, minutes on a laptop, results
in ``bench/results/cpu-quick/`` — the tables any user can see; the numbers say nothing about the
GPU kernels. On a GPU without ``--quick``: the full suite, results in
``bench/results/<gpu-name>/``. Each benchmark writes JSON + markdown + PNG; the runner adds
``SUMMARY.md`` (what ran, where, on which commit, and every table).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

# End-to-end benchmarks run in-process (``run(quick, out_dir)``); the kernel-level scripts run
# as subprocesses with ``[--quick] --out DIR`` (their CLI is their only contract). Under --quick
# only scripts whose --quick is a fast CPU mode run: bench_multi_lora's CPU mode (--smoke) runs
# the Triton interpreter for many minutes, so the quick suite skips it.
E2E = ("paper_table1", "bench_training", "bench_serving")
KERNEL_SCRIPTS = ("bench_lora_linear", "bench_multi_lora")
QUICK_ON_CPU = ("bench_lora_linear",)
ORDER = KERNEL_SCRIPTS + E2E
ALIASES = {"table1": "paper_table1", "training": "bench_training", "serving": "bench_serving",
           "lora_linear": "bench_lora_linear", "multi_lora": "bench_multi_lora"}


class BenchSetupError(RuntimeError):
    """The suite cannot start (no bench/ folder, unknown benchmark name)."""


def find_bench_dir() -> Path:
    env = os.environ.get("LORA_KERNELS_BENCH_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent / "bench")
    for d in candidates:
        if (d / "paper_table1.py").is_file():
            return d
    raise BenchSetupError(
        "lora-kernels bench needs the repository's bench/ folder, which is not part of the "
        "installed package. Clone the repository and install it editable "
        "(git clone ... && cd lora-kernels && pip install -e '.[bench,peft]'), or set "
        f"LORA_KERNELS_BENCH_DIR to a bench/ folder. Looked in: {', '.join(map(str, candidates))}")


def select(only: Optional[str], bench_dir: Path) -> list[str]:
    """Benchmarks to run, in suite order; ``only`` is comma-separated names or aliases."""
    present = [n for n in ORDER if (bench_dir / f"{n}.py").is_file()]
    if not only:
        return present
    wanted = []
    for raw in only.split(","):
        name = raw.strip()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in ORDER:
            raise BenchSetupError(f"unknown benchmark {raw.strip()!r}; choose from "
                                  f"{', '.join(ORDER)} (or {', '.join(ALIASES)})")
        if name not in present:
            raise BenchSetupError(f"benchmark {name!r} has no script {bench_dir / (name + '.py')}")
        wanted.append(name)
    return [n for n in ORDER if n in wanted]


def _run_script(path: Path, quick: bool, out: Path) -> tuple[str, str]:
    if quick and path.stem not in QUICK_ON_CPU:
        return "skipped", f"no fast CPU mode (GPU only; see python bench/{path.name} --help)"
    cmd = [sys.executable, str(path), *(["--quick"] if quick else []), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = out / f"{path.stem}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return "failed", f"exit {proc.returncode}, see {log.name}"
    return "ok", ""


def _run_module(name: str, quick: bool, out: Path) -> tuple[str, str]:
    mod = importlib.import_module(name)
    payload = mod.run(quick=quick, out_dir=out)
    bad = [r.get("row", "?") for r in payload.get("rows", []) if "error" in r]
    if bad:
        return "failed", f"{len(bad)} row(s) errored: {', '.join(sorted(set(bad)))}"
    return "ok", ""


def _demote(markdown: str) -> str:
    """One heading level down, so each benchmark's page nests under the summary's title."""
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in markdown.splitlines())


def _summary(out: Path, results: list, quick: bool, started: float) -> Path:
    import e2e_common as C  # bench/ is on sys.path (run_benchmarks put it there)
    mode = C.resolve_mode(quick)
    env = C.env_info(mode)
    lines = [f"# lora-kernels benchmark suite ({'quick, CPU' if mode.quick else 'full, GPU'})", "",
             C.env_line(env), ""]
    if mode.quick:
        lines += ["> GPU figures pending: this is the `--quick` CPU run (tiny models, torch "
                  "reference backend). It shows every table and plot the suite produces; run "
                  "`lora-kernels bench` on a GPU for the numbers.", ""]
    lines += [C.md_table(["benchmark", "status", "seconds", "note"],
                         [[n, s, f"{t:.0f}", note] for n, s, t, note in results]), ""]
    # Suite order first, then any other page a script wrote during this run.
    fresh = [md for md in sorted(out.glob("*.md"))
             if md.name != "SUMMARY.md" and md.stat().st_mtime >= started]
    rank = {n: i for i, (n, *_rest) in enumerate(results)}
    fresh.sort(key=lambda md: rank.get(md.stem, len(rank)))
    for md in fresh:
        png = md.with_suffix(".png")
        lines += [f"<!-- from {md.name} -->", _demote(md.read_text()), ""]
        if png.exists():
            lines += [f"![{md.stem}]({png.name})", ""]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def run_benchmarks(quick: bool = False, out=None, only: Optional[str] = None) -> int:
    """Run the suite; returns 0 when every selected benchmark ran, 1 if one failed, 2 when the
    suite cannot start."""
    try:
        bench_dir = find_bench_dir()
        names = select(only, bench_dir)
    except BenchSetupError as exc:
        print(f"lora-kernels bench: {exc}", file=sys.stderr)
        return 2
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    import torch
    if not quick and not torch.cuda.is_available():
        print("lora-kernels bench: no CUDA device, running --quick on the CPU instead "
              "(GPU figures pending)", file=sys.stderr)
        quick = True
    from common import device_name  # bench/common.py: names every benchmark's results folder
    out = Path(out) if out else bench_dir / "results" / device_name(quick)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety; the suite runs without it
        tqdm = None
    bar = tqdm(total=len(names), desc="lora-kernels bench", position=0) if tqdm else None
    started, results = time.time() - 1.0, []
    for name in names:
        if bar is not None:
            bar.set_postfix_str(name)
        t0 = time.time()
        try:
            if name in E2E:
                status, note = _run_module(name, quick, out)
            else:
                status, note = _run_script(bench_dir / f"{name}.py", quick, out)
        except Exception as exc:  # noqa: BLE001 — one benchmark failing must not stop the rest
            traceback.print_exc()
            status, note = "failed", f"{type(exc).__name__}: {exc}"[:200]
        results.append((name, status, time.time() - t0, note))
        if bar is not None:
            bar.update(1)
        if status != "ok":
            print(f"lora-kernels bench: {name} {status}: {note}", file=sys.stderr)
    if bar is not None:
        bar.close()
    summary = _summary(out, results, quick, started)
    print(f"results in {out} (summary: {summary.name})")
    for name, status, secs, note in results:
        print(f"  {name:<18} {status:<8} {secs:6.0f} s  {note}")
    return 0 if all(s in ("ok", "skipped") for _, s, _, _ in results) else 1
