"""bench/bench_moe_lora.py --quick writes its files with every row and field (never checks
the numbers: CPU timings on a shared box are noise)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from lora_kernels.bench_runner import find_bench_dir

pytest.importorskip("peft")
sys.path.insert(0, str(find_bench_dir()))
import bench_moe_lora  # noqa: E402


def test_quick_run_writes_every_row(tmp_path):
    assert bench_moe_lora.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_moe_lora.json").read_text())
    rows = {r["mode"]: r for r in payload["rows"]}
    assert {"fwd", "fwd+bwd"} <= rows.keys() and any(m.startswith("decode") for m in rows)
    for mode in ("fwd", "fwd+bwd"):
        for key in ("base_ms", "peft_ms", "ours_ms", "ours_vs_base", "peft_vs_ours"):
            assert math.isfinite(rows[mode][key]) and rows[mode][key] > 0, (mode, key)
    assert payload["ours_vs_peft_rel_err"] <= 1e-4
    assert (tmp_path / "bench_moe_lora.md").read_text().count("|") > 20
