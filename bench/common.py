"""Shared helpers for every script in bench/: where results go, what was measured on, one
timing function, one markdown table and one results writer.

* :func:`device_name` / :func:`results_dir` — ``bench/results/<device>/`` (``cpu-quick`` for CPU
  runs, else the GPU's name as a slug, e.g. ``nvidia-h100-80gb-hbm3``);
* :func:`git_commit` / :func:`git_dirty` / :func:`env_info` / :func:`env_line` — device, torch /
  CUDA / triton / transformers / peft versions, git commit (+ dirty flag; None where unknown),
  date, and that record as one line;
* :func:`bench` — median milliseconds: ``triton.testing.do_bench`` on CUDA (warm-up, L2 flushed
  before every repetition so caches cannot flatter), ``perf_counter`` on the CPU;
  :func:`bench_graph` — the same callable replayed from a CUDA graph (no CPU launch overhead);
* :func:`md_table` — a markdown table;
* :func:`results_payload` / :func:`write_results` — ``<name>.json`` (benchmark, env, settings,
  rows: the shape bench/dispatch_table.py and the tests read), ``<name>.md`` and ``<name>.png``
  when matplotlib is importable and a plot function is given.

The end-to-end benchmarks' own helpers (models, contenders, timer) live in e2e_common.py.
Numbers go in these files, never in test assertions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
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


def git_commit() -> Optional[str]:
    """HEAD's hash; None when unknown. A copy of the tree without .git (a device machine) gets
    it from ``LORA_KERNELS_GIT_COMMIT`` (bench/gpu.sh); unset or empty means unknown."""
    return (_git("rev-parse", "HEAD") or os.environ.get("LORA_KERNELS_GIT_COMMIT", "").strip()
            or None)


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from HEAD; None when git cannot tell (no git, no .git)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken optional package is just "None"
        return None


def env_info(dtype: Optional[torch.dtype] = None, quick: bool = False) -> dict:
    """Everything a reader needs to trust or reproduce a number."""
    cuda = torch.cuda.is_available() and not quick
    info = {
        "device": (torch.cuda.get_device_name(0) if cuda
                   else (platform.processor() or platform.machine()) + " CPU"),
        "device_label": device_name(quick),
        "mode": "quick" if quick else "full",
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"),
        "peft": _version("peft"), "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        from lora_kernels.ops import backend
        info["backends"] = {k: str(v) for k, v in backend.describe().items()}
    except Exception:  # noqa: BLE001 - describing backends must never stop a benchmark
        pass
    return info


def env_line(env: dict) -> str:
    dirty = env.get("git_dirty")
    commit = (env.get("git_commit") or "unknown")[:10] + (
        " (dirty tree)" if dirty else " (tree state unknown)" if dirty is None else "")
    return (f"Measured on **{env['device']}** ({env['mode']} mode, {env['dtype']}), "
            f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
            f"peft {env['peft']}, commit `{commit}`, {env['date']}.")


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


def md_table(headers: Sequence, rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else (f"{v:,.1f}" if abs(v) < 1e4 else f"{v:,.0f}")
        return str(v)
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def results_payload(name: str, rows: Sequence[dict], env: dict, settings: dict, **extra) -> dict:
    """The JSON every benchmark writes; ``extra`` keys (a benchmark's own summary) go after."""
    return {"benchmark": name, "env": env, "settings": settings, "rows": list(rows), **extra}


def write_results(out_dir, payload: dict, markdown: str,
                  plot: Optional[Callable[[object], None]] = None, *,
                  figsize: tuple = (12, 6)) -> list[Path]:
    """Write ``<benchmark>.json`` / ``.md`` (/ ``.png``) under ``out_dir``; returns the paths.

    ``plot(fig)`` draws on a matplotlib figure. Without matplotlib the PNG is skipped: the
    numbers are already on disk, and a long GPU run must not end in an ImportError.
    """
    name = payload["benchmark"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    if plot is None:
        return paths
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {name}.png", file=sys.stderr)
        return paths
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=figsize, dpi=110)
    try:
        plot(fig)
        if fig.get_layout_engine() is None:  # a plot that set its own layout (legends) keeps it
            fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        paths.append(out_dir / f"{name}.png")
    finally:
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------
# Multi-adapter benchmark cases (bench_multi_lora.py, its peers in multi_lora_baselines.py and
# bench_serving.py share them; here so those modules do not import each other)
# ------------------------------------------------------------------------------------------
SHAPES = {"square": (4096, (4096,)), "qkv": (4096, (4096, 1024, 1024)), "mlp": (4096, (14336,))}


@dataclass
class Case:
    phase: str        # decode | prefill
    T: int
    dist: str         # distinct | uniform8 | n<adapters>
    shape: str
    rank: object      # int or "mixed" (alternating 8 / 64 over the pool)
    K: int = 0
    slices: tuple = ()

    def __post_init__(self):
        if not self.K:
            self.K, self.slices = SHAPES[self.shape]

    @property
    def r_max(self):
        return 64 if self.rank == "mixed" else int(self.rank)

    @property
    def n_distinct(self):
        if self.dist == "distinct":
            return self.T
        return int(self.dist.removeprefix("uniform").removeprefix("n"))

    def label(self):
        return f"{self.phase} T={self.T} {self.dist} {self.shape} r={self.rank}"


@dataclass
class Inputs:
    case: Case
    S: int
    A: torch.Tensor
    B: torch.Tensor
    Ws: list                  # rotated copies of the base weight (used as Ws[j % len])
    scal: torch.Tensor
    ranks: torch.Tensor       # int32 [S] (real ranks)
    ranks_arg: object         # None when every rank is r_max
    ranks_host: list          # PEFT keeps rank and scaling as Python numbers per adapter
    scal_host: list
    xs: list
    ys: list
    ids: list
    batches: list
    groups: list              # per rotation: [(slot, rows, rank)]
    sgl: list = field(default_factory=list)
    static_batches: list = field(default_factory=list)  # bounded (CUDA-graph) batches, same ids
    names: list = field(default_factory=list)  # per rotation: PEFT adapter_names (per sample)
    adapter_bytes: int = 0
