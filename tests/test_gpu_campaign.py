"""``bash bench/gpu.sh`` on a CPU: the plan adds up within the budget, and the budget logic
(skip with a line saying so, summary + tarball after every stage, at most 8 files in $OUT)
works without a GPU. The stages themselves need a device (bench/gpu_campaign.py)."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "build+smoke", "headline", "tests", "sanitize", "dispatch", "models")


def _gpu_sh(*args, env=None, timeout=240):
    full = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _total(out: str) -> int:
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"total: (\d+) s", last)
    assert m, f"last line must be 'total: N s', got {last!r}"
    return int(m.group(1))


def test_plan_lists_every_stage_and_fits_the_default_budget():
    res = _gpu_sh("--plan", env={"GPU_BUDGET_S": "480"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for st in STAGES:
        assert any(re.match(rf"\s+{re.escape(st)}\s+\d+ s", ln) for ln in lines), st
    assert re.search(r"autotuning: headline ≈ \d+ s .*smoke ≈ \d+ s", res.stdout), res.stdout
    assert 0 < _total(res.stdout) <= 480


def test_plan_under_a_small_budget_says_what_does_not_fit():
    res = _gpu_sh("--plan", env={"GPU_BUDGET_S": "200"})
    assert res.returncode == 0, res.stderr
    assert _total(res.stdout) <= 200
    assert "does not fit the budget" in res.stdout


def test_out_of_budget_stages_are_skipped_and_results_still_packed(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = _gpu_sh("dispatch", "models",
                  env={"OUT": str(out), "GPU_WORK": str(work), "GPU_BUDGET_S": "12"})
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu-results.tgz", "gpu.log", "summary.md"] and len(files) <= 8
    summary = (out / "summary.md").read_text()
    for st in ("dispatch", "models"):
        assert re.search(rf"\| {st} \| skipped \| 0 \| \d+ \| SKIPPED: needs >= \d+ s", summary), summary
    assert "SKIPPED" in (out / "gpu.log").read_text()
    with tarfile.open(out / "gpu-results.tgz") as tar:
        assert "logs" in tar.getnames()


def test_unknown_stage_is_refused():
    res = _gpu_sh("nonsense")
    assert res.returncode != 0 and "unknown stage" in res.stderr
