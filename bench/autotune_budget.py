"""Bounded Triton autotuning for the GPU campaign (bench/gpu.sh), from the outside.

Autotuning costs one compile (~1-4 s for a Hopper GEMM variant on 16 cores) plus a few
benchmark repetitions (~0.1 s) per config per new autotune key; a fused-GEMM list has up to 8
(large M) or 16 (decode) configs. Within one campaign the cost is paid once:
``TRITON_CACHE_DIR`` is shared by every process of the run (compiled kernels) and
``TRITON_CACHE_AUTOTUNING=1`` stores each key's timings on disk (Triton ≥ 3.4, so 3.6 on the
device), so the GPU tests and the model benches reuse what the headline bench tuned.

* :func:`limit_configs` keeps the first ``n`` configs of every autotuner in
  ``lora_kernels.triton`` (the smoke test: correctness needs one compile per variant, not the
  fastest). Triton's disk cache keys include the config list, so a reduced run never poisons
  the full one.
* :func:`tuning_seconds` sums what the autotuners spent benchmarking (Triton records
  ``bench_time`` per autotuner for its last tuning), for the campaign summary.
* :func:`plan_cost` is the static estimate ``bench/gpu.sh --plan`` prints.
"""

from __future__ import annotations

import importlib
import pkgutil

# Per config: compile (Hopper GEMM with wgmma, 16 cores, Triton 3.6) + do_bench's warm-up and reps.
COMPILE_S_PER_CONFIG = 2.5
BENCH_S_PER_CONFIG = 0.15


def _gemm_autotuners() -> list:
    """The fused GEMM's autotuners, which ``fused_gemm.autotuned`` builds lazily per (shape
    class, device) and keeps in an lru_cache (not a module attribute a scan could find):
    built here for this machine's device, so they are the very objects later launches use."""
    import torch

    from lora_kernels.triton import fused_gemm, tuned
    name = tuned.device_name("cuda" if torch.cuda.is_available() else "cpu")
    return [(f"fused_gemm.autotuned[{cls}]", fused_gemm.autotuned(cls, name))
            for cls in fused_gemm.SHAPE_CLASSES]


def _autotuners():
    """Every triton Autotuner object reachable from lora_kernels.triton's modules."""
    from triton.runtime.autotuner import Autotuner

    import lora_kernels.triton as pkg
    found = _gemm_autotuners()
    seen = {id(t) for _, t in found}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            objs = obj.items() if isinstance(obj, dict) else [(name, obj)]
            for sub, o in objs:
                if isinstance(o, Autotuner) and id(o) not in seen:
                    seen.add(id(o))
                    found.append((f"{info.name}.{name}" + (f"[{sub}]" if sub != name else ""), o))
    return found


def limit_configs(n: int) -> dict:
    """Keep the first ``n`` configs of every autotuner; returns {autotuner: (before, after)}."""
    out = {}
    for name, tuner in _autotuners():
        before = len(tuner.configs)
        if n > 0 and before > n:
            tuner.configs = tuner.configs[:n]
        out[name] = (before, len(tuner.configs))
    return out


def tuning_seconds() -> dict:
    """{autotuner: seconds of its last tuning run} for the autotuners that tuned in this process."""
    return {name: round(float(t.bench_time), 2) for name, t in _autotuners()
            if getattr(t, "bench_time", None)}


def config_counts() -> dict:
    """{autotuner: configs in its list} without importing torch's CUDA state (CPU-safe)."""
    return {name: len(t.configs) for name, t in _autotuners()}


def plan_cost(keys_per_tuner: dict, max_configs: int | None = None) -> tuple[float, str]:
    """Estimated autotune seconds for ``keys_per_tuner`` = {autotuner name prefix: new keys}."""
    counts = config_counts()
    total, parts = 0.0, []
    for prefix, keys in keys_per_tuner.items():
        n = max((c for name, c in counts.items() if name.startswith(prefix)), default=0)
        if max_configs:
            n = min(n, max_configs)
        cost = keys * n * (COMPILE_S_PER_CONFIG + BENCH_S_PER_CONFIG)
        total += cost
        parts.append(f"{prefix}: {keys} keys x {n} configs")
    return total, "; ".join(parts)
