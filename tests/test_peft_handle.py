"""patch_peft_model beyond the forward: patched models survive copy.deepcopy / torch.save as
independent patched copies, PEFT's own warnings stay PEFT's, and the handle's counts say
truthfully which adapters run on our ops."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from helpers import count_calls, rel_err, tiny_gpt2

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners import lora  # noqa: E402

import lora_kernels.integrations.peft as integ  # noqa: E402
from lora_kernels import patch_peft_model  # noqa: E402
from lora_kernels.integrations import LoRAKernelsFallbackWarning, PeftPatchHandle  # noqa: E402

TOL = 1e-5
VOCAB = 97


def gpt2_peft(lora_bias=False):
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(n_embd=32, n_head=4, vocab=VOCAB, n_positions=32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                      fan_in_fan_out=True, init_lora_weights=False),
                           adapter_name="a1")
    model.add_adapter("a2", LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True,
                                       init_lora_weights=False, lora_bias=lora_bias))
    return model.eval()


def ids(b=3, t=7):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(4))




def layer_of(model):
    return model.base_model.model.transformer.h[0].attn.c_attn


def roundtrip(model, how):
    if how == "deepcopy":
        return copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_is_patched_and_independent(monkeypatch, how):
    model = gpt2_peft()
    handle = patch_peft_model(model)
    x = ids()
    names = ["a1", "__base__", "a2"]
    with torch.no_grad():
        ref, ref_mixed = model(x).logits, model(x, adapter_names=names).logits
    twin = roundtrip(model, how)
    calls = count_calls(monkeypatch, integ)
    with torch.no_grad():
        assert rel_err(twin(x).logits, ref) <= TOL
        assert calls["lora_linear"] == 4  # 2 blocks x (c_attn, c_fc): the copy runs our ops
        # Mixed batches need the copy's own (fresh) batch cache and lock.
        assert rel_err(twin(x, adapter_names=names).logits, ref_mixed) <= TOL
        assert calls["multi_lora_linear"] == 4
        # Changing the copy's adapter changes the copy only.
        layer_of(twin).lora_B["a1"].weight.mul_(3.0)
        changed = twin(x).logits
        assert rel_err(model(x).logits, ref) <= TOL
    assert (changed - ref).abs().max() > 1e-3
    twin_handle = PeftPatchHandle.of(twin)
    assert set(twin_handle.patched) == set(handle.patched)
    assert all(m is not o for m, o in zip(twin_handle.patched.values(), handle.patched.values()))
    # Unpatching one leaves the other patched.
    handle.unpatch()
    assert "forward" in layer_of(twin).__dict__ and "forward" not in layer_of(model).__dict__
    assert PeftPatchHandle.of(model) is None
    twin_handle.unpatch()
    assert PeftPatchHandle.of(twin) is None
    with torch.no_grad():  # exactly PEFT again: the copy's own (changed) weights
        assert rel_err(twin(x).logits, changed) <= TOL


def test_copy_trains_its_own_parameters():
    model = gpt2_peft()
    model.base_model.set_adapter("a1")
    patch_peft_model(model)
    twin = copy.deepcopy(model).train()
    twin(ids()).logits.square().mean().backward()
    a = layer_of(twin).lora_A["a1"].weight
    assert a.grad is not None and a.grad.abs().max() > 0
    assert layer_of(model).lora_A["a1"].weight.grad is None


def test_copy_keeps_peft_forward_for_fallback_adapters():
    # The fallback calls PEFT's forward; after a reload it must still be PEFT's (a pickled bound
    # method would come back as our patched forward and recurse forever).
    model = gpt2_peft(lora_bias=True)  # a fallback adapter (lora_bias stays on PEFT)
    model.base_model.set_adapter("a2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAKernelsFallbackWarning)
        patch_peft_model(model)
        x = ids()
        with torch.no_grad():
            ref = model(x).logits
            twin = roundtrip(model, "torch.save")
            assert rel_err(twin(x).logits, ref) <= TOL


def test_copying_one_layer_leaves_the_rest_of_the_model_behind():
    model = gpt2_peft()
    patch_peft_model(model)
    layer = layer_of(model)
    memo: dict = {}
    twin = copy.deepcopy(layer, memo)
    others = [m for m in model.modules() if m is not layer and
              not any(m is s for s in layer.modules())]
    assert not any(id(m) in memo for m in others)
    assert len(pickle.dumps(layer)) < len(pickle.dumps(model)) / 3
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert rel_err(twin(x), layer(x)) <= TOL


# ------------------------------------------------------------------------------------------
class MyModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.weight


class MyLora(nn.Module, lora.LoraLayer):
    """A user's own LoRA layer, registered with PEFT's custom-module dispatch."""

    def __init__(self, base_layer, adapter_name, **kwargs):
        super().__init__()
        lora.LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name

    def forward(self, x):
        return self.base_layer(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.my_module = MyModule()

    def forward(self, x):
        return self.my_module(self.lin0(x))


def test_peft_warning_for_custom_layer_stays_the_last_one():
    # PEFT's TestDynamicDispatch::test_custom_lora_layer_issues_warning, with the patch applied
    # right after get_peft_model: PEFT's "Unsupported layer type" must still be the last warning.
    config = LoraConfig(target_modules=["lin0", "my_module"])
    config._register_custom_module({MyModule: MyLora})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = get_peft_model(Net(), config)
        handle = patch_peft_model(model)
    assert str(rec[-1].message).startswith("Unsupported layer type") and \
        "MyModule" in str(rec[-1].message)
    assert not [w for w in rec if issubclass(w.category, LoRAKernelsFallbackWarning)]
    # Recorded all the same: the handle says which layer keeps its own forward, and why.
    assert list(handle.skipped) == ["base_model.model.my_module"]
    assert "MyLora" in handle.skipped["base_model.model.my_module"]
    assert list(handle.patched) == ["base_model.model.lin0"]


def test_counts_say_which_adapters_fall_back():
    # lora_bias=True is a variant we leave on PEFT's forward (DoRA is fused since dora_linear)
    model = gpt2_peft(lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAKernelsFallbackWarning)
        handle = patch_peft_model(model)
    c_attn = [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)]
    c_fc = [f"base_model.model.transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert set(handle.patched) == set(c_attn + c_fc)
    status = handle.adapter_status()
    for name in c_attn:
        assert status[name]["a1"] is None and "lora_bias" in status[name]["a2"]
    assert all(status[name] == {"a1": None} for name in c_fc)
    assert set(handle.fallback_adapters) == set(c_attn)
    assert handle.counts() == {"layers_patched": 4, "layers_fully_fused": 2,
                               "layers_with_fallback_adapters": 2, "layers_skipped": 0,
                               "adapters_fused": 4, "adapters_fallback": 2}
    assert "2 with adapters on PEFT's forward" in repr(handle)
    # Live: deleting the DoRA adapter makes every layer fully fused.
    model.delete_adapter("a2")
    assert handle.counts()["adapters_fallback"] == 0 and not handle.fallback_adapters
    handle.unpatch()
