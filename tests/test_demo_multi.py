"""``lora-kernels demo --multi-train`` end to end (fewer steps than the real run)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_kernels.cli import main  # noqa: E402
from lora_kernels.demo_multi import run_multi_train  # noqa: E402


def test_multi_train_demo_runs_and_its_checks_pass(capsys):
    assert main(["demo", "--multi-train", "--device", "cpu", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("well below chance") == 4 and "NOT" not in out
    assert "each adapter best on its own task: yes" in out
    assert out.count("reloaded into plain PEFT") == 4 and "reload check: PASS" in out
    assert "multi-train demo: PASS" in out


def test_multi_train_demo_rejects_bad_steps(capsys):
    assert run_multi_train(steps=0, device="cpu") == 2
