"""pytest plugin: run PEFT's own test suite with every PEFT LoRA model patched by lora-kernels.

Loaded with ``-p lk_patch_plugin`` (``tests/peft_suite/run.sh`` does this); not part of the
default test run. ``LK_PEFT_PATCH=0`` loads the plugin but patches nothing, so the baseline run
and the patched run differ only in the patch.

Every ``LoraModel`` (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``,
``inject_adapter_in_model``...) goes through ``BaseTuner.inject_adapter``; after each call the
model is (re)patched, so layers added later run on our ops too. Non-LoRA PEFT methods are left
alone (their tuner classes are not ``LoraModel``).
"""

from __future__ import annotations

import os

import pytest

ENABLED = os.environ.get("LK_PEFT_PATCH", "1") != "0"
_HANDLE = "_lk_patch_handle"
COUNTS = {"patched_models": 0, "no_lora_layers": 0}


def _repatch(lora_model) -> None:
    from lora_kernels import patch_peft_model

    old = lora_model.__dict__.get(_HANDLE)
    if old is not None:
        old.unpatch()
    try:
        lora_model.__dict__[_HANDLE] = patch_peft_model(lora_model)
        COUNTS["patched_models"] += 1
    except ValueError as exc:  # e.g. only target_parameters / trainable tokens: nothing to patch
        if "found no PEFT LoRA layers" not in str(exc):
            raise
        COUNTS["no_lora_layers"] += 1


def pytest_configure(config):
    if not ENABLED:
        return
    from peft.tuners.lora.model import LoraModel

    original = LoraModel.inject_adapter

    def inject_adapter(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        _repatch(self)
        return out

    LoraModel.inject_adapter = inject_adapter


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"lora-kernels patch: enabled={ENABLED} {COUNTS}")
