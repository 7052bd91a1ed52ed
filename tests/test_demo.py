"""``lora-kernels demo`` end to end (smaller sizes and fewer steps than the real tour)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import lora_kernels.demo as demo  # noqa: E402
from lora_kernels.cli import main  # noqa: E402


def test_demo_runs_and_its_checks_pass(monkeypatch, capsys):
    real = demo._sizes

    def small(device):
        sz = real(device)
        sz.update(n_embd=64, seq=24, reps=2)
        return sz
    monkeypatch.setattr(demo, "_sizes", small)
    assert main(["demo", "--device", "cpu", "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "check vs PEFT: PASS" in out and "loss went down" in out
    for row in ("trainable / total params (1 : ", "train step, fwd+bwd", "mixed batch",
                "max |logits - PEFT adapter_names|"):
        assert row in out
    assert "patched 8 PEFT LoRA layers" in out and "(0 left on PEFT's forward)" in out


def test_demo_rejects_bad_steps(capsys):
    assert demo.run_demo(device="cpu", steps=0) == 2
