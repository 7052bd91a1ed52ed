"""The serving-engine integrations against the engines' own reference backends, each suite
in its own Python process.

Importing SGLang or vLLM has process-wide side effects (vLLM's ``env_override`` patches
torch Inductor and sets ``TORCHINDUCTOR_COMPILE_THREADS``; both configure logging), which must
not leak into the rest of this suite. So the cases live in ``sglang_backend_cases.py`` and
``vllm_punica_cases.py`` (not collected here: no ``test_`` prefix) and each runs under its own
``pytest``; its summary is printed, its failures fail this test with the output attached.
Run one directly for details: ``pytest tests/sglang_backend_cases.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_env import vllm_src_dir  # noqa: E402


def _run_cases(name: str) -> None:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         str(HERE / name)], cwd=HERE.parent, env=env, capture_output=True, text=True,
        timeout=900)
    out = proc.stdout + proc.stderr
    summary = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    print(f"{name}: {summary[0]}")
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{out[-12000:]}"
    assert " passed" in summary[0], f"{name} ran no test:\n{out[-4000:]}"


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                    reason="sglang not installed (make test installs it --no-deps)")
def test_sglang_backend_against_torch_native():
    _run_cases("sglang_backend_cases.py")


@pytest.mark.skipif(not (vllm_src_dir() / "vllm").is_dir()
                    and "LORA_KERNELS_VLLM_SRC" not in os.environ,
                    reason="vLLM's LoRA modules not unpacked (python tests/engine_env.py vllm)")
def test_vllm_punica_against_vllm_cpu_wrapper():
    _run_cases("vllm_punica_cases.py")
