"""Backend selection: auto, env override, unavailable backends explain themselves."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve("auto", torch.device("cpu"), "lora_linear") == "torch"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.resolve("auto", torch.device("cpu"), "lora_linear") == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.resolve("auto", torch.device("cpu"), "lora_linear")


def test_explicit_backend_wins_over_env(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    assert backend.resolve("torch", torch.device("cpu"), "lora_linear") == "torch"


def test_unknown_and_unavailable():
    with pytest.raises(ValueError, match="backend"):
        backend.resolve("tpu", torch.device("cpu"), "lora_linear")
    with pytest.raises(lk.BackendUnavailableError, match="CUDA tensors"):
        backend.resolve("cuda", torch.device("cpu"), "lora_linear")


def test_every_backend_module_exposes_only_api_names():
    for fn in backend.KERNEL_API:
        assert callable(backend.kernel("torch", fn))


def test_float64_runs_on_torch_only():
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    a, b = torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    assert lk.lora_linear(x, w, None, a, b).dtype == torch.float64


def test_describe_lists_every_backend():
    d = backend.describe()
    assert set(d) == {"torch", "triton", "cuda"} and d["torch"] == "available"
