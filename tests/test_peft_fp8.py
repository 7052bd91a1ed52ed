"""PEFT LoRA over an FP8 e4m3 base (integrations/peft_fp8.py): PEFT builds its own lora.Linear
over FP8Linear through ``register_fp8_lora``; PEFT's forward over it is the oracle for
``patch_peft_model`` (outputs, LoRA gradients, mixed batches), checked in turn against a float64
reference of the dequantized weight; merge re-quantizes, DoRA is refused, adapters saved over
FP8 load into the dense model."""

import warnings

import pytest
import torch
from torch import nn

from helpers import (check_patched_dropout_trains, check_patched_step_matches_peft,
                     interpreting, patched_joint_step, peft_mixed_oracle, peft_step, rel_err)
from lora_kernels import patch_peft_model
from lora_kernels.integrations.peft import LoRAKernelsFallbackWarning
from lora_kernels.integrations.peft_fp8 import fp8_lora_layer_class, register_fp8_lora
from lora_kernels.nn import FP8Linear, quantize_linears_fp8
from lora_kernels.ops.fp8 import dequantize

peft = pytest.importorskip("peft")

K, HID = 65, 37


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(K, HID), nn.Linear(HID, K)

    def forward(self, x):
        return self.o(torch.nn.functional.gelu(self.q(x)))


def dense_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def config(dropout=0.0, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o"], lora_dropout=dropout,
                           init_lora_weights=False, **kw)


def fp8_peft(seed=0, dtype=torch.float32, dropout=0.0, backend="auto"):
    model = quantize_linears_fp8(dense_model(seed, dtype), backend=backend)
    return peft.get_peft_model(model, register_fp8_lora(config(dropout)))


def _assert_patched_step_matches(model, x, backend, tol_y, tol_g):
    """A training step of the patched model (fused: no fallback warning) equals PEFT's own."""
    want_y, want_g = peft_step(model, x)
    with patch_peft_model(model, backend=backend), warnings.catch_warnings():
        warnings.simplefilter("error", LoRAKernelsFallbackWarning)
        y, g = peft_step(model, x)
    assert rel_err(y, want_y) <= tol_y
    for name in want_g:
        assert rel_err(g[name], want_g[name]) <= tol_g, name


def _reference64(model, x):
    """float64 of the same network: dequantized W, PEFT's LoRA factors, no dropout."""
    inner = model.base_model.model
    h = x.double()
    for name in ("q", "o"):
        layer = getattr(inner, name)
        base = layer.base_layer
        w = dequantize(base.fp8_weight, torch.float64)
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        h = h @ w.T + base.bias.double() + float(layer.scaling["default"]) * (h @ a.T) @ b.T
        if name == "q":
            h = torch.nn.functional.gelu(h)
    return h


def test_peft_builds_its_lora_linear_over_fp8():
    model = fp8_peft()
    layer = model.base_model.model.q
    assert type(layer) is fp8_lora_layer_class()
    assert isinstance(layer.base_layer, FP8Linear)
    assert (layer.in_features, layer.out_features) == (K, HID)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(x), _reference64(model, x)) <= 1e-5  # PEFT's own forward


backends = ["torch"] + (["triton"] if interpreting() else [])


@pytest.mark.parametrize("backend", backends)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_patched_fp8_matches_peft(backend, dtype, tol):
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("the torch FP8 path runs fp16 on a GPU only")
    model = fp8_peft(dtype=dtype)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_patched_step_matches_peft(model, x, backend, tol)


def test_patched_fp8_calls_the_fp8_op_once_per_layer(monkeypatch):
    import lora_kernels.integrations.peft as integ
    calls = []
    real = integ.lora_linear_fp8
    monkeypatch.setattr(integ, "lora_linear_fp8",
                        lambda *a, **k: calls.append(k["scaling"]) or real(*a, **k))
    model = fp8_peft()
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    with patch_peft_model(model, backend="torch"):
        model(x)
    assert calls == [2.0, 2.0]  # q then o, each with its adapter's alpha / r


def test_patched_fp8_dropout_trains():
    model = fp8_peft(dropout=0.25)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(2))
    y1, want = check_patched_dropout_trains(model, x)
    assert not torch.allclose(y1, want)  # the mask did something


def test_patched_fp8_mixed_batch_matches_peft():
    model = fp8_peft()
    model.add_adapter("other", config())
    names = ["default", "__base__", "other", "default"]
    x = torch.randn(4, 3, K, generator=torch.Generator().manual_seed(6))
    model.eval()
    with torch.no_grad():
        want = model(x, adapter_names=names)
        with patch_peft_model(model, backend="torch"), warnings.catch_warnings():
            warnings.simplefilter("error", LoRAKernelsFallbackWarning)
            got = model(x, adapter_names=names)
    assert rel_err(got, want) <= 1e-5


def test_fp8_merge_requantizes_and_unmerge_returns_close():
    model = fp8_peft()
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(7))
    layer = model.base_model.model.q
    w0 = dequantize(layer.base_layer.fp8_weight)
    with torch.no_grad():
        want = model(x)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        assert layer.merged and layer.base_layer.weight.dtype == torch.float8_e4m3fn
        merged = model(x)
        model.unmerge_adapter()
    # e4m3 keeps 3 mantissa bits: each re-quantization moves an element by ≤ 2⁻⁴ of itself
    assert rel_err(merged, want) <= 0.05
    w1 = dequantize(layer.base_layer.fp8_weight)
    assert not layer.merged and rel_err(w1, w0) <= 0.1


def test_fp8_dora_is_refused():
    model = quantize_linears_fp8(dense_model())
    with pytest.raises(ValueError, match="use_dora"):
        peft.get_peft_model(model, register_fp8_lora(config(use_dora=True)))


def test_register_fp8_lora_rejects_other_configs():
    with pytest.raises(TypeError, match="config"):
        register_fp8_lora({"r": 4})


def test_adapter_trained_over_fp8_loads_into_the_dense_model(tmp_path):
    """PEFT's key names: the adapter file from the FP8 model loads into the dense one and gives
    the same LoRA term there (up to the FP8 rounding of the base)."""
    model = fp8_peft(seed=3)
    model.save_pretrained(tmp_path)
    dense = peft.PeftModel.from_pretrained(dense_model(seed=3), tmp_path)
    for name in ("q", "o"):
        a = getattr(model.base_model.model, name)
        b = getattr(dense.base_model.model, name)
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(model(x), dense(x)) <= 0.05


@pytest.mark.parametrize("backend", backends)
def test_patched_fp8_joint_training_matches_peft(backend):
    """``adapter_names=`` in training mode (joint training) over the FP8 base: the oracle is
    PEFT's single-adapter step on each adapter's own samples (PEFT refuses adapter_names while
    training; the loss is a sum over samples, which the model treats independently)."""
    model = fp8_peft()
    model.add_adapter("other", config())
    names = ["other", "default", "default", "other", "__base__"]
    x = torch.randn(5, 2, K, generator=torch.Generator().manual_seed(9))
    want_y, want_g = peft_mixed_oracle(model, x, names)
    y, got = patched_joint_step(model, x, names, backend)
    assert rel_err(y, want_y) <= 1e-5
    assert sorted(got) == sorted(want_g) and {n.split(".")[-2] for n in got} == {"default", "other"}
    for n in want_g:
        assert rel_err(got[n], want_g[n]) <= 1e-5, n


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_patched_fp8_bf16_matches_peft(backend):
    """CUDA, bf16 activations, e4m3 codes on the device: the fused fp8 GEMM (Triton) against
    PEFT's forward over the same FP8Linear (rank-0 fp8 op + PEFT's torch LoRA branch)."""
    model = fp8_peft(dtype=torch.bfloat16).cuda()
    x = torch.randn(4, 33, K, generator=torch.Generator().manual_seed(1)).to("cuda",
                                                                            torch.bfloat16)
    _assert_patched_step_matches(model, x, backend, 2e-2, 3e-2)


@pytest.mark.parametrize("backend", backends)
def test_patched_fp8_act_quant_base_matches_peft(backend):
    """An FP8Linear base with act_quant='e4m3_per_token' (fp8×fp8 base GEMM, LoRA branch on the
    unquantized x): the fused op gets the base's act_quant, so it equals PEFT's forward over
    that base; mixed batches fall back to PEFT's forward (weight-only FP8 there), saying why."""
    model = quantize_linears_fp8(dense_model(), act_quant="e4m3_per_token", backend=backend)
    model = peft.get_peft_model(model, register_fp8_lora(config()))
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(10))
    _assert_patched_step_matches(model, x, backend, 1e-5, 1e-5)
    model.add_adapter("other", config())
    model.eval()
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        want = model(x, adapter_names=names)  # PEFT's own mixed forward
        with patch_peft_model(model, backend=backend):
            with pytest.warns(LoRAKernelsFallbackWarning, match="act_quant"):
                got = model(x, adapter_names=names)
    assert torch.equal(got, want)
