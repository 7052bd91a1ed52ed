"""Backend selection: auto, env override, unavailable backends explain themselves."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
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


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_every_backend_resolves_every_api_function(name):
    """kernel() returns the backend's own function where its module has one, else its
    fallback's; the torch backend (the end of every fallback chain) implements all of them."""
    module = backend._module(name)
    for fn in backend.KERNEL_API:
        impl = backend.kernel(name, fn)
        assert callable(impl), (name, fn)
        own = getattr(module, fn, None)
        assert impl is (own if own is not None else backend.kernel(backend.FALLBACK[name], fn))
        if name == "torch":
            assert own is not None, f"the torch backend lacks {fn}"


def test_float64_runs_on_torch_only(monkeypatch):
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    a, b = torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    y = lk.lora_linear(x, w, None, a, b)
    assert y.dtype == torch.float64
    assert torch.allclose(y, ref.lora_linear(x, w, None, a, b), rtol=1e-12, atol=1e-12)
    # Wherever auto would pick another backend (a GPU), float64 still goes to torch, and an
    # explicit other backend is refused rather than silently downcast.
    monkeypatch.setattr(backend, "resolve", lambda *args, **kw: "triton")
    assert backend.resolve_for("auto", x, "lora_linear") == "torch"
    with pytest.raises(TypeError, match="float64 inputs run on backend='torch' only"):
        backend.resolve_for("triton", x, "lora_linear")


def test_describe_lists_every_backend():
    d = backend.describe()
    assert set(d) == {"torch", "triton", "cuda"} and d["torch"] == "available"
