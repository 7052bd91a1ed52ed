"""bench/roofline.py runs on a CPU and its numbers are self-consistent: every plan moves at
least the minimal bytes and issues at least the useful FLOPs, no plan is predicted faster than
the ideal single pass, and the plans come from the launchers themselves."""

import math
import subprocess
import sys
from pathlib import Path

from helpers import load_bench_tool

REPO = Path(__file__).resolve().parents[1]
OPS = ("fwd", "fwd p=0.05", "fwd+bwd", "fwd+bwd p=0.05", "decode M=1",
       "multi decode T=64 distinct", "prefill T=8192 64 adapters", "fwd fp8 act_quant",
       "nf4 fwd", "nf4 fwd+bwd", "nf4 decode M=1", "fp8 fwd", "fp8 fwd+bwd", "fp8 decode M=1",
       "fp8 fwd M=512", "nf4 decode M=4")


def test_roofline_plans_are_consistent_with_the_minimum():
    rf = load_bench_tool("roofline")
    rep = rf.report(["H100", "H200"])
    assert rep["assumptions"]["launchers"] == "called"  # the launchers' choices, not defaults
    assert set(rep["ops"]) == set(OPS)
    for name, e in rep["ops"].items():
        mn = e["minimal"]
        assert {"ours", "bare", "minimal"} <= set(e["plans"]), name
        for pname, p in e["plans"].items():
            t = p["total"]
            assert t["read"] + t["write"] >= (mn["read"] + mn["write"]) * (1 - 1e-9) or pname == "bare"
            assert t["flops"] >= mn["flops"] * (1 - 1e-9) or pname == "bare"
            assert t["flops_fp8"] >= mn["flops_fp8"] * (1 - 1e-9) or pname == "bare"
            for d in ("H100", "H200"):
                assert math.isfinite(p["us"][d]) and p["us"][d] > 0
                assert p["us"][d] >= e["plans"]["minimal"]["us"][d] * (1 - 1e-9) or pname == "bare"
        # at large M the fused plan never moves more than the composition it replaces (at
        # M=1 its split-K workspace adds a few KiB over the floor's 32 MiB: not a pass)
        if "floor" in e["plans"] and not name.startswith("decode"):
            fl, ours = e["plans"]["floor"]["total"], e["plans"]["ours"]["total"]
            assert ours["read"] + ours["write"] <= fl["read"] + fl["write"], name
    # dropout costs integer work (the mask) and nothing else in bytes for the fused plan
    a, b = rep["ops"]["fwd"]["plans"]["ours"]["total"], rep["ops"]["fwd p=0.05"]["plans"]["ours"]["total"]
    # (without dropout the panel-shared forward also skips the shrink's pass over x)
    assert b["int_ops"] > 0 == a["int_ops"] and a["read"] + a["write"] <= b["read"] + b["write"]


def test_roofline_script_prints_the_table():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "roofline.py"), "--device", "H100"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    for name in OPS:
        assert f"| {name} |" in res.stdout
    assert "% of HBM bandwidth" in res.stdout
