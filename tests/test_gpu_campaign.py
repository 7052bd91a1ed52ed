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


def test_plan_under_a_small_budget_says_what_does_not_fit(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_campaign  # in-process: torch is already imported here
    assert gpu_campaign.plan(200, [s.name for s in gpu_campaign.stages()]) == 0
    out = capsys.readouterr().out
    assert _total(out) <= 200
    assert "does not fit the budget" in out


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


def test_device_scripts_run_cleanly_without_a_gpu(tmp_path):
    """gpu_smoke.py and headline.py import everything they need and exit 0 with a line saying
    there is no device (the campaign's CPU dry run relies on it)."""
    for script, args in (("gpu_smoke.py", ["--out", str(tmp_path / "smoke.json")]),
                         ("headline.py", ["--out", str(tmp_path / "results")])):
        res = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO,
                             capture_output=True, text=True, timeout=240,
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        assert res.returncode == 0 and "no CUDA device" in res.stdout, res.stdout + res.stderr


def test_autotune_budget_finds_and_limits_every_autotuner():
    sys.path.insert(0, str(REPO / "bench"))
    import autotune_budget as ab
    counts = ab.config_counts()
    assert any(n.startswith("fused_gemm") for n in counts) and all(c >= 1 for c in counts.values())
    tuners = dict(ab._autotuners())
    saved = {n: list(t.configs) for n, t in tuners.items()}
    try:
        limited = ab.limit_configs(1)
        assert limited.keys() == counts.keys()
        assert all(after == min(before, 1) for before, after in limited.values())
        assert all(len(t.configs) == 1 for t in tuners.values())
    finally:
        for n, t in tuners.items():
            t.configs = saved[n]


def test_a_stage_past_its_deadline_is_killed_and_out_repacked_meanwhile(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    import time

    import gpu_campaign
    monkeypatch.setattr(gpu_campaign, "PACK_EVERY_S", 0.3)
    camp = gpu_campaign.Campaign(60, tmp_path / "out", tmp_path / "work")
    t0 = time.monotonic()
    status = camp.run("echo started; sleep 30", "slow.log", t0 + 1.5)
    assert status == "timed out" and time.monotonic() - t0 < 10  # killed, not waited for
    assert (tmp_path / "out" / "gpu-results.tgz").exists()       # packed while it ran
    assert "started" in (tmp_path / "work" / "logs" / "slow.log").read_text()
    assert camp.run("exit 3", "fail.log", time.monotonic() + 10) == "rc=3"
