"""``lora-kernels bench --quick`` runs on the CPU and writes every file with every row.

Only the presence of files, rows and fields is checked — never the numbers (timings on a shared
CPU are noise; numbers belong in results files, not assertions). One suite run (about 1.5
minutes on 2 cores) is shared by the tests below.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys

import pytest

from lora_kernels import cli
from lora_kernels.bench_runner import find_bench_dir, run_benchmarks

BENCHES = ("paper_table1", "bench_training", "bench_serving")

# The row labels paper_table1 writes (bench/ is not a package: import it from its folder).
sys.path.insert(0, str(find_bench_dir()))
import paper_table1  # noqa: E402

TABLE1_ROWS = {k: v for k, v in paper_table1.ROWS.items() if k != "peft_patched"}
PATCHED_TABLE1 = paper_table1.ROWS["peft_patched"]
SCENARIOS = ("1 adapter", "8 adapters", "32 adapters", "32 adapters + half base")


def _in_git_checkout() -> bool:
    repo = find_bench_dir().parent
    return shutil.which("git") is not None and subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode == 0


def _has_patch_peft() -> bool:
    try:
        return hasattr(importlib.import_module("lora_kernels.integrations.peft"), "patch_peft_model")
    except ImportError:
        return False


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    rc = cli.main(["bench", "--quick", "--out", str(out)])  # the command users run
    payloads = {}
    for name in BENCHES:
        path = out / f"{name}.json"
        payloads[name] = json.loads(path.read_text()) if path.exists() else None
    return rc, out, payloads


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_suite_exits_cleanly_and_writes_all_files(results):
    rc, out, _ = results
    assert rc == 0
    for name in BENCHES:
        for ext in ("json", "md", "png"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "SUMMARY.md").read_text()
    assert "GPU figures pending" in summary
    for name in BENCHES:
        assert name in summary
    # The kernel-level script with a CPU quick mode runs too (its rows are its own tests' job).
    if (find_bench_dir() / "bench_lora_linear.py").is_file():
        for ext in ("json", "md"):
            assert (out / f"bench_lora_linear.{ext}").is_file()


@pytest.mark.parametrize("name", BENCHES)
def test_json_records_where_and_how(results, name):
    payload = results[2][name]
    assert payload is not None and payload["benchmark"] == name
    env = payload["env"]
    for key in ("device", "torch", "triton", "transformers", "peft", "git_commit", "date", "dtype"):
        assert key in env, key
    if _in_git_checkout():  # run from the repo: the commit is known, so it must be recorded
        assert isinstance(env["git_commit"], str) and len(env["git_commit"]) == 40, env["git_commit"]
        assert isinstance(env["git_dirty"], bool)
    assert env["mode"] == "quick"
    assert payload["settings"] and payload["rows"]


def test_table1_has_every_row_in_every_column(results):
    payload = results[2]["paper_table1"]
    columns = payload["settings"]["columns"]
    assert len(columns) == 3
    got = {(r["key"], r["setting"]): r for r in payload["rows"]}
    for col in columns:
        for key in TABLE1_ROWS:
            row = got.get((key, col))
            assert row is not None, (key, col)
            assert "error" not in row, row.get("error")
            assert _finite(row["mean_ms"]) and _finite(row["median_ms"]) and row["n"] >= 5
            if key != "base":
                assert row["pct_over_base_mean"] is not None
        if _has_patch_peft():
            assert ("peft_patched", col) in got
    md = (results[1] / "paper_table1.md").read_text()
    for label in TABLE1_ROWS.values():
        assert md.count(label) >= 2, label  # mean table and median table
    if _has_patch_peft():
        assert PATCHED_TABLE1 in md
    # Adapter rows carry their bottleneck, LoRA rows their rank.
    some = payload["rows"]
    assert all("bottleneck" in r for r in some if r["key"] in ("adapter_l", "adapter_h"))
    assert all("rank" in r for r in some if r["key"] in ("peft", "ours", "ours_merged", "ours_multi"))


def test_training_has_every_row(results):
    payload = results[2]["bench_training"]
    got = {(r["model"], r["method"], r["target_key"]): r for r in payload["rows"]}
    wanted = [(m, "full", "full") for m in ("gpt2", "llama")]
    wanted += [(m, meth, t) for m in ("gpt2", "llama") for meth in ("peft", "ours")
               for t in ("qv", "all")]
    if _has_patch_peft():
        wanted += [(m, "peft_patched", t) for m in ("gpt2", "llama") for t in ("qv", "all")]
    for key in wanted:
        row = got.get(key)
        assert row is not None, key
        assert "error" not in row, row.get("error")
        assert _finite(row["tokens_per_s"]) and _finite(row["state_mb"])
        assert "peak_mem_gb" in row and "throughput_vs_full_pct" in row
    md = (results[1] / "bench_training.md").read_text()
    for label in ("full fine-tuning", "PEFT LoRA", "lora-kernels fused LoRA", "q,v", "all linear"):
        assert label in md


def test_training_has_joint_multi_adapter_rows(results):
    payload = results[2]["bench_training"]
    got = {(r["contender"], r["k"]): r for r in payload["joint"]}
    wanted = [("single", 1)] + [(c, k) for k in (1, 4, 8) for c in ("joint", "sequential")]
    for key in wanted:
        row = got.get(key)
        assert row is not None, key
        assert "error" not in row, row.get("error")
        assert _finite(row["tokens_per_s"]) and _finite(row["median_ms"])
    for k in (1, 4, 8):
        assert _finite(got[("joint", k)]["cost_vs_single"])
        assert _finite(got[("joint", k)]["speedup_vs_sequential"])
        assert len(got[("joint", k)]["ranks"]) == k
    md = (results[1] / "bench_training.md").read_text()
    assert "Joint multi-adapter training" in md and "K sequential PEFT trainings" in md


def test_serving_has_every_row(results):
    payload = results[2]["bench_serving"]
    got = {(r["scenario"], r["method"]): r for r in payload["rows"]}
    methods = ["base", "peft", "ours"] + (["peft_patched"] if _has_patch_peft() else [])
    for sc in SCENARIOS:
        for m in methods:
            row = got.get((sc, m))
            assert row is not None, (sc, m)
            if m != "peft_patched":  # the integration's own tests own its failures
                assert "error" not in row, row.get("error")
                assert _finite(row["tokens_per_s"]) and _finite(row["prefill_ms"])
                assert "pct_of_base" in row
    assert "met" in payload["target"]
    md = (results[1] / "bench_serving.md").read_text()
    for sc in SCENARIOS:
        assert f"| {sc} |" in md
    assert "% of base-only" in md


def test_unknown_benchmark_name_is_a_clear_error(capsys, tmp_path):
    assert run_benchmarks(quick=True, out=tmp_path, only="paper_table1,nope") == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_bench_dir_is_found_next_to_the_package():
    assert (find_bench_dir() / "paper_table1.py").is_file()
