"""Write ``lora_kernels/ops/dispatch_table.json``: which backend ``auto`` runs on CUDA tensors.

    python bench/dispatch_table.py --results bench/results/<device> --junit gpu-out/gpu-tests.xml \
        [--sanitizer-dir gpu-out] [--out lora_kernels/ops/dispatch_table.json]

The table is ``{op: {shape_class: "cuda" | "triton" | "cublas"}}`` with shape classes from
``lora_kernels.ops.backend.shape_class`` (decode / medium / large rows). ``backend._auto_cuda``
falls back to Triton for anything missing, so an empty table means "always Triton".

Inputs
------
* **Timings**: every ``*.json`` under ``--results`` whose payload has a ``"rows"`` list (the
  bench scripts' format, bench/common.write_results). A row counts when it has
  ``"op"`` (``lora_linear`` | ``multi_lora_linear`` | ``lora_shrink`` | ``lora_expand``), a row
  count (``"rows"``, or ``"M"`` / ``"T"``) and ``"ms": {backend: milliseconds or null}``.
  :func:`timing_row` (re-exported by bench/cuda_columns.py) builds such rows.
* **Validation**: the junit XML of ``pytest -m gpu tests/`` (test_ext.py, test_cutlass.py; bench/gpu.sh writes
  ``$OUT/gpu-tests.xml``). An op's CUDA kernels are validated when every test in
  ``OP_TESTS[op]`` and ``COMMON_TESTS`` ran on the GPU and passed — none failed, errored or
  skipped. With ``--sanitizer-dir``, every op is vetoed unless that folder holds
  compute-sanitizer logs (bench/sanitize.sh) and each one is complete (has its
  ``ERROR SUMMARY`` line) and reports no errors.
* **The floor** (``cublas``: the cuBLAS composition, lora_kernels/ops/cublas_backend.py) is a
  candidate for ``lora_linear`` once every test in ``FLOOR_TESTS`` (tests/test_cublas_backend.py,
  from the same junit file) ran on the GPU and passed. It runs no kernel of ours but Triton's
  mask, so the sanitizer does not veto it.

Rule
----
Per (op, shape class), a candidate (``cuda``, ``cublas``) is eligible iff it is validated for
the op and was timed on every shape of the class where Triton was; the eligible candidate
with the lowest geometric mean of ``candidate_ms / triton_ms`` wins iff that mean is below
``1 - MARGIN``. Otherwise Triton (ties and noise go to the default). So ``auto`` is never
slower than the validated floor by more than the margin.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_kernels.ops.backend import shape_class  # noqa: E402

MARGIN = 0.02
OPS = ("lora_linear", "multi_lora_linear", "lora_shrink", "lora_expand")
# GPU tests (tests/test_ext.py and tests/test_cutlass.py, by function name) that must pass
# before CUDA may serve an op.
OP_TESTS = {
    "lora_shrink": ("test_gpu_shrink",),
    "lora_expand": ("test_gpu_expand",),
    "multi_lora_linear": ("test_gpu_shrink", "test_gpu_expand", "test_gpu_shrink_expand_fused",
                          "test_gpu_multi_lora_fwd", "test_gpu_public_multi_lora_cuda_backend"),
    "lora_linear": ("test_gpu_fused_gemm", "test_gpu_fused_gemm_strided_views",
                    "test_gpu_lora_linear_backend", "test_gpu_public_lora_linear_cuda_backend",
                    "test_gpu_dropout_mask", "test_gpu_cutlass_lora_gemm",
                    "test_gpu_cutlass_lora_gemm_strided_views", "test_gpu_cutlass_lora_linear",
                    "test_gpu_cutlass_dx_dropout", "test_gpu_cutlass_dx_dropout_refuses_with_its_rule"),
}
COMMON_TESTS = ("test_gpu_empty_batches", "test_gpu_bad_input_raises_instead_of_faulting")
# GPU tests (tests/test_cublas_backend.py) that must pass before the floor may serve an op.
FLOOR_TESTS = {"lora_linear": ("test_gpu_cublas_lora_linear", "test_gpu_cublas_selected_by_auto")}


def timing_row(op: str, rows: int, ms: dict, **shape) -> dict:
    """One benchmark measurement in the format this tool reads: ``ms`` maps backend (and any
    baseline) names to milliseconds, ``None`` where that backend could not run."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return {"op": op, "rows": int(rows), "shape_class": shape_class(int(rows)), "ms": dict(ms), **shape}


def load_rows(results_dirs) -> list[dict]:
    rows = []
    for d in results_dirs:
        for path in sorted(Path(d).rglob("*.json")):
            try:
                payload = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for row in payload.get("rows", []) if isinstance(payload, dict) else []:
                if isinstance(row, dict) and row.get("op") in OPS and isinstance(row.get("ms"), dict):
                    n = row.get("rows", row.get("M", row.get("T")))
                    if n is not None:
                        rows.append({**row, "rows": int(n)})
    return rows


def _sanitizer_clean(sanitizer_dir) -> bool:
    """True iff there is at least one sanitizer log and every log is complete (has its
    ``ERROR SUMMARY`` line; a run cut off by the timeout has none) and reports no errors."""
    logs = sorted(Path(sanitizer_dir).glob("*.log"))
    if not logs:
        return False  # sanitizer missing or never ran: nothing vouches for the kernels
    for log in logs:
        summaries = re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text(errors="replace"))
        if not summaries or any(int(n) > 0 for n in summaries):
            return False
    return True


def _test_status(junit_path, module) -> dict:
    """{test function: ["pass" | "fail" | "skip", ...]} for the tests of ``module`` (a name or a
    tuple of names: the CUDA kernels are validated by test_ext and test_cutlass)."""
    status = defaultdict(list)
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        if not case.get("classname", "").endswith(module):
            continue
        name = case.get("name", "").split("[", 1)[0]
        if case.find("failure") is not None or case.find("error") is not None:
            status[name].append("fail")
        elif case.find("skipped") is not None:
            status[name].append("skip")
        else:
            status[name].append("pass")
    return status


def _passed(status, tests) -> bool:
    return all(bool(status[t]) and all(s == "pass" for s in status[t]) for t in tests)


def validated_ops(junit_path, sanitizer_dir=None) -> set:
    """Ops whose CUDA kernels passed their GPU tests (see the module docstring)."""
    if sanitizer_dir is not None and not _sanitizer_clean(sanitizer_dir):
        return set()
    status = _test_status(junit_path, ("test_ext", "test_cutlass"))
    return {op for op, tests in OP_TESTS.items() if _passed(status, tests + COMMON_TESTS)}


def floor_validated_ops(junit_path) -> set:
    """Ops the cuBLAS floor may serve: its GPU tests ran and passed."""
    status = _test_status(junit_path, "test_cublas_backend")
    return {op for op, tests in FLOOR_TESTS.items() if _passed(status, tests)}


def build_table(rows, validated, floor_validated=frozenset()) -> dict:
    """``validated``: ops whose CUDA kernels may serve; ``floor_validated``: ops the cuBLAS
    composition (``cublas``) may serve."""
    allowed = {"cuda": set(validated), "cublas": set(floor_validated) & set(FLOOR_TESTS)}
    ratios = defaultdict(lambda: defaultdict(list))  # (op, class) -> name -> [name/triton or None]
    for row in rows:
        tri = row["ms"].get("triton")
        if not tri:
            continue  # nothing to compare against
        for name in allowed:
            t = row["ms"].get(name)
            ratios[(row["op"], shape_class(row["rows"]))][name].append(t / tri if t else None)
    table: dict = {}
    for (op, cls), by_name in sorted(ratios.items()):
        best, best_mean = "triton", 1.0 - MARGIN
        for name in allowed:  # cuda first: on a tie within float noise the own kernel stays
            rs = by_name[name]
            if op not in allowed[name] or not rs or any(r is None for r in rs):
                continue
            mean = math.exp(sum(math.log(r) for r in rs) / len(rs))
            if mean < best_mean:
                best, best_mean = name, mean
        table.setdefault(op, {})[cls] = best
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", action="append", required=True, help="benchmark results dir (repeatable)")
    ap.add_argument("--junit", required=True, help="junit XML of `pytest -m gpu tests/test_ext.py`")
    ap.add_argument("--sanitizer-dir", help="directory of bench/sanitize.sh logs (an error, an incomplete log or no log vetoes CUDA)")
    ap.add_argument("--out", default=str(REPO / "lora_kernels" / "ops" / "dispatch_table.json"))
    args = ap.parse_args(argv)
    validated = validated_ops(args.junit, args.sanitizer_dir)
    floor = floor_validated_ops(args.junit)
    rows = load_rows(args.results)
    table = build_table(rows, validated, floor)
    Path(args.out).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"validated CUDA ops: {sorted(validated) or 'none'}; cuBLAS floor validated for: "
          f"{sorted(floor) or 'none'}; {len(rows)} timing rows")
    print(json.dumps(table, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
