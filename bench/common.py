"""Small shared helpers for the kernel-level benchmarks (bench_lora_linear.py, bench_multi_lora.py):
where results go, what was measured on, one timing function, one results writer.

* :func:`device_name` / :func:`results_dir` — ``bench/results/<device>/`` (``cpu-quick`` for CPU
  runs, else the GPU's name as a slug, e.g. ``nvidia-h100-80gb-hbm3``; same rule as
  e2e_common.device_label);
* :func:`env_info` — device, torch / CUDA / triton / peft versions, git commit (+ dirty flag), date;
* :func:`bench` — median milliseconds: ``triton.testing.do_bench`` on CUDA (warm-up, L2 flushed
  before every repetition so caches cannot flatter), ``perf_counter`` on the CPU;
  :func:`bench_graph` — the same callable replayed from a CUDA graph (no CPU launch overhead);
* :func:`write_results` — ``<name>.json`` (env, settings, rows), ``<name>.md`` (env line + table)
  and ``<name>.png`` when matplotlib is importable and a plot function is given.

Numbers go in these files, never in test assertions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


def device_name(quick: bool = False) -> str:
    """Results folder name: ``cpu-quick`` off the GPU, else the GPU's name as a slug."""
    if quick or not torch.cuda.is_available():
        return "cpu-quick"
    name = torch.cuda.get_device_name(0).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def results_dir(quick: bool = False) -> Path:
    return REPO / "bench" / "results" / device_name(quick)


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken optional package is just "None"
        return None


def env_info(dtype: Optional[torch.dtype] = None, quick: bool = False) -> dict:
    """Everything a reader needs to trust or reproduce a number."""
    cuda = torch.cuda.is_available() and not quick
    commit = _git("rev-parse", "HEAD") or os.environ.get("LORA_KERNELS_GIT_COMMIT")
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU",
        "device_label": device_name(quick),
        "mode": "quick" if quick else "full",
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "peft": _version("peft"),
        "python": platform.python_version(),
        "git_commit": commit, "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def env_line(env: dict) -> str:
    commit = (env.get("git_commit") or "unknown")[:10] + (" (dirty tree)" if env.get("git_dirty") else "")
    return (f"Measured on **{env['device']}** ({env['mode']} mode, {env.get('dtype')}), "
            f"torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
            f"commit `{commit}`, {env['date']}.")


def bench(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100,
          cuda: Optional[bool] = None) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` in ms; it zeroes a 256 MB buffer before
    each repetition, so inputs and weights come from HBM as in a real model). CPU: 3 warm-up
    calls, then the median of ``perf_counter`` over at least 5 calls / ``rep`` ms. ``cuda``
    picks the timer (default: CUDA when available).
    """
    if torch.cuda.is_available() if cuda is None else cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(3):
        fn()
    times, spent = [], 0.0
    while len(times) < 5 or spent < rep / 1000.0:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= 200:
            break
    return 1000.0 * statistics.median(times)


def bench_graph(fn: Callable[[], object], *, rep: int = 100) -> Optional[float]:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (what a serving engine that
    captures its decode step sees: no Python or launch overhead). None off CUDA or if ``fn``
    cannot be captured."""
    if not torch.cuda.is_available():
        return None
    import triton.testing
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception:  # noqa: BLE001 - a contender that cannot be captured just has no figure
        return None


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else (f"{v:,.1f}" if abs(v) < 1e4 else f"{v:,.0f}")
        return str(v)
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _flat(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_results(name: str, rows: Sequence[dict], out_dir, *, env: Optional[dict] = None,
                  settings: Optional[dict] = None, markdown: Optional[str] = None,
                  plot: Optional[Callable[[object], None]] = None) -> list[Path]:
    """Write ``<name>.json`` / ``.md`` (/ ``.png``) under ``out_dir``; returns the paths.

    ``markdown`` defaults to the env line plus one table of the flattened rows; ``plot(fig)``
    draws on a matplotlib figure (skipped when matplotlib is not installed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env or env_info()
    payload = {"benchmark": name, "env": env, "settings": settings or {}, "rows": list(rows)}
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if markdown is None:
        flat = [_flat(r) for r in rows]
        headers = list(dict.fromkeys(k for r in flat for k in r))
        markdown = f"# {name}\n\n{env_line(env)}\n\n" + md_table(headers, [[r.get(h) for h in headers] for r in flat])
    paths[1].write_text(markdown.rstrip() + "\n")
    if plot is not None:
        try:
            import matplotlib
        except ImportError:
            return paths
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure(figsize=(12, 6), dpi=110)
        try:
            plot(fig)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png")
            paths.append(out_dir / f"{name}.png")
        finally:
            plt.close(fig)
    return paths
