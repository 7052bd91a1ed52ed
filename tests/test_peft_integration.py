"""patch_peft_model against PEFT itself as the oracle: same outputs and gradients (within the
contract's fp32 tolerance), mixed batches, merge/unmerge, fallbacks, and an exact unpatch."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import MLP, count_calls, rel_err, tiny_gpt2

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lora_kernels.integrations.peft as integ  # noqa: E402
from lora_kernels import patch_peft_model  # noqa: E402
from lora_kernels.integrations import LoRAKernelsFallbackWarning  # noqa: E402
from lora_kernels.reference import dropout_keep_mask  # noqa: E402

TOL = 1e-5  # fp32 against fp32 PEFT (DESIGN.md numerics)
VOCAB = 97


def gpt2(seed=0):
    return tiny_gpt2(n_embd=32, n_head=4, vocab=VOCAB, n_positions=32, seed=seed)


def gpt2_peft(dropout=0.0):
    """GPT-2 (Conv1D, fan_in_fan_out) with two adapters of different rank, one rsLoRA; random B so
    the adapters actually change the output."""
    model = get_peft_model(gpt2(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        lora_dropout=dropout, init_lora_weights=False), adapter_name="a1")
    model.add_adapter("a2", LoraConfig(r=7, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                       fan_in_fan_out=True, use_rslora=True,
                                       lora_dropout=dropout, init_lora_weights=False))
    return model


def mlp_peft(dropout=0.0):
    torch.manual_seed(1)
    return get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                            lora_dropout=dropout, init_lora_weights=False))


def ids(b=3, t=9, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}




# ------------------------------------------------------------------------------------------
def test_forward_matches_peft_single_and_switched_adapters(monkeypatch):
    model = gpt2_peft().eval()
    x = ids()
    refs = {}
    for active in ("a1", "a2", ["a1", "a2"]):
        model.base_model.set_adapter(active)
        refs[str(active)] = model(x).logits
    calls = count_calls(monkeypatch, integ)
    with patch_peft_model(model) as handle:
        assert len(handle.patched) == 8 and not handle.skipped
        for active in ("a1", "a2", ["a1", "a2"]):
            model.base_model.set_adapter(active)
            assert rel_err(model(x).logits, refs[str(active)]) <= TOL, active
    assert calls["lora_linear"] > 0


def test_several_active_adapters_reuse_their_concatenated_factors(monkeypatch):
    """Inference with several active adapters concatenates each layer's factors once and reuses
    them until one changes in place (no .to/scale/cat per forward)."""
    model = gpt2_peft().eval()
    model.base_model.set_adapter(["a1", "a2"])
    x = ids()
    builds = []
    orig = integ.concat_adapters

    def counting(layer, adapters, dtype, device):
        builds.append(tuple(adapters))
        return orig(layer, adapters, dtype, device)
    monkeypatch.setattr(integ, "concat_adapters", counting)
    with torch.no_grad():
        ref = model(x).logits
        handle = patch_peft_model(model)
        out = model(x).logits
        assert rel_err(out, ref) <= TOL
        n = len(builds)
        assert n == 2 and set(builds) == {("a1", "a2")}  # the two c_attn layers have both
        assert torch.equal(model(x).logits, out) and len(builds) == n  # cache hits
        model.base_model.model.transformer.h[0].attn.c_attn.lora_B["a2"].weight.mul_(3.0)
        out2 = model(x).logits
        assert len(builds) == n + 1  # that layer alone rebuilt
        handle.unpatch()
        assert rel_err(out2, model(x).logits) <= TOL


def test_plain_linear_layers_and_unpatch_bit_for_bit():
    model = mlp_peft().eval()
    x = torch.randn(2, 5, 13)
    before = model(x)
    handle = patch_peft_model(model)
    assert rel_err(model(x), before) <= TOL
    handle.unpatch()
    assert torch.equal(model(x), before)
    for _, m in model.named_modules():
        assert "forward" not in m.__dict__ and "_lora_kernels_patch" not in m.__dict__
    handle.unpatch()  # idempotent


@pytest.mark.parametrize("active", ["a1", ["a1", "a2"]])
def test_training_gradients_match_peft(active):
    model = gpt2_peft().train()
    model.base_model.set_adapter(active)
    x = ids()
    model(x, labels=x).loss.backward()
    ref = lora_grads(model)
    model.zero_grad(set_to_none=True)
    with patch_peft_model(model):
        loss = model(x, labels=x).loss
        loss.backward()
    got = lora_grads(model)
    assert ref.keys() == got.keys() and len(got) > 0
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-4, name


def test_dropout_uses_peft_probability_and_one_mask():
    model = mlp_peft(dropout=0.25).train()
    handle = patch_peft_model(model)
    layer = model.base_model.model.up
    x = torch.randn(6, 13, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    # lora_linear draws its dropout seed from torch's CPU generator: replay it.
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = dropout_keep_mask(seed, 6, 13, 0.25)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dropped = torch.where(keep, x / 0.75, 0.0)
    expect = layer.base_layer(x) + ((dropped @ a.t()) @ b.t()) * layer.scaling["default"]
    assert rel_err(y, expect) <= TOL
    y.sum().backward()
    assert a.grad is not None and b.grad is not None and x.grad is not None
    model.eval()  # eval: no dropout, equal to PEFT
    with torch.no_grad():
        out = model(x)
        handle.unpatch()
        assert rel_err(out, model(x)) <= TOL


def test_mixed_batch_matches_peft_adapter_names(monkeypatch):
    model = gpt2_peft().eval()
    x = ids(b=5)
    names = ["a1", "__base__", "a2", "a1", "__base__"]
    with torch.no_grad():
        ref = model(x, adapter_names=names).logits
    calls = count_calls(monkeypatch, integ)
    handle = patch_peft_model(model)
    with torch.no_grad():
        out = model(x, adapter_names=names).logits
        assert rel_err(out, ref) <= TOL
        assert calls["multi_lora_linear"] == 8 and calls["lora_linear"] == 0
        # One batch for the whole forward (every layer hit the cache).
        assert len(handle.batches._entries) == 1
        # Cached stacks follow in-place updates of PEFT's weights.
        model.base_model.model.transformer.h[0].attn.c_attn.lora_B["a2"].weight.mul_(3.0)
        out2 = model(x, adapter_names=names).logits
    handle.unpatch()
    with torch.no_grad():
        assert rel_err(out2, model(x, adapter_names=names).logits) <= TOL
        assert torch.equal(model(x, adapter_names=names).logits,
                           model(x, adapter_names=list(names)).logits)


def test_mixed_batch_gradients_match_peft():
    # PEFT forbids adapter_names in training mode, but in eval mode with grad enabled its mixed
    # forward is differentiable - ours too, into PEFT's own parameters.
    model = gpt2_peft().eval()
    x = ids(b=4)
    names = ["a2", "a1", "__base__", "a2"]
    model(x, adapter_names=names, labels=x).loss.backward()
    ref = lora_grads(model)
    model.zero_grad(set_to_none=True)
    with patch_peft_model(model):
        with torch.inference_mode():  # caches made here must not leak into autograd below
            model(x, adapter_names=names)
        model(x, adapter_names=names, labels=x).loss.backward()
    got = lora_grads(model)
    assert ref.keys() == got.keys() and len(got) > 0
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-4, name


def test_merge_unmerge_and_disable():
    model = gpt2_peft().eval()
    x = ids()
    with torch.no_grad():
        unmerged_ref = model(x).logits
        with model.disable_adapter():
            base_ref = model(x).logits
        handle = patch_peft_model(model)
        model.merge_adapter()
        merged = model(x).logits
        assert rel_err(merged, unmerged_ref) <= TOL
        with model.disable_adapter():  # PEFT unmerges a disabled layer; so do we
            assert rel_err(model(x).logits, base_ref) <= TOL
        assert rel_err(model(x).logits, unmerged_ref) <= TOL
        model.merge_adapter()
        model.unmerge_adapter()
        assert rel_err(model(x).logits, unmerged_ref) <= TOL
        handle.unpatch()
        assert rel_err(model(x).logits, unmerged_ref) <= TOL


def test_embedding_falls_back_with_one_warning_and_dora_runs_fused(monkeypatch):
    # DoRA used to fall back here too; it runs on dora_linear now (tests/test_dora.py)
    torch.manual_seed(0)
    model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn", "wte"],
                                              fan_in_fan_out=True, init_lora_weights=False))
    model.add_adapter("dora", LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                         use_dora=True))
    model.eval()
    x = ids()
    with torch.no_grad():
        ref_default = model(x).logits
        model.base_model.set_adapter("dora")
        ref_dora = model(x).logits
        model.base_model.set_adapter("default")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        handle = patch_peft_model(model)
    msgs = [str(w.message) for w in rec if issubclass(w.category, LoRAKernelsFallbackWarning)]
    assert any("wte" in m and "Embedding" in m for m in msgs), msgs
    assert not [m for m in msgs if "DoRA" in m]
    assert "base_model.model.transformer.wte" in handle.skipped
    calls = count_calls(monkeypatch, integ)
    from lora_kernels.integrations import peft_dora
    dora_calls = []
    monkeypatch.setattr(peft_dora, "dora_linear",
                        lambda *a, _f=peft_dora.dora_linear, **k: dora_calls.append(1) or _f(*a, **k))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with torch.no_grad():
            assert rel_err(model(x).logits, ref_default) <= TOL
            assert calls["lora_linear"] == 2
            model.base_model.set_adapter("dora")
            assert rel_err(model(x).logits, ref_dora) <= TOL
            assert len(dora_calls) == 2  # both c_attn layers
            model(x)
    assert not [w for w in rec if issubclass(w.category, LoRAKernelsFallbackWarning)]  # once only
    handle.unpatch()


def test_autocast_bf16_close_to_peft():
    model = mlp_peft().eval()
    x = torch.randn(4, 13)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        with patch_peft_model(model):
            out = model(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2e-2


def test_bad_calls():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        patch_peft_model(MLP())
    with pytest.raises(TypeError):
        patch_peft_model("model")
    model = mlp_peft()
    handle = patch_peft_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_peft_model(model)
    handle.unpatch()
    patch_peft_model(model).unpatch()
    # PEFT's own argument errors come through unchanged. (Last: after an error inside forward
    # PEFT leaves its adapter_names hooks registered on the model.)
    model = gpt2_peft().eval()
    with patch_peft_model(model):
        model.merge_adapter()
        with pytest.raises(ValueError, match="merged adapters"):
            model(ids(), adapter_names=["a1"] * 3)


def test_rejected_patch_changes_nothing():
    model = mlp_peft()
    with pytest.raises(ValueError, match="backend"):
        patch_peft_model(model, backend="fast")
    handle = patch_peft_model(model.base_model.model.down)  # one layer patched on its own
    with pytest.raises(ValueError, match="already patched"):
        patch_peft_model(model)
    assert "forward" not in model.base_model.model.up.__dict__  # not half-patched
    handle.unpatch()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_peft(dtype):
    """The contract's rule for low precision: within 2x the error of PEFT's own same-dtype
    forward, both measured against PEFT in float64 (and within the dtype's tolerance)."""
    model = mlp_peft().eval()
    x = torch.randn(16, 13)
    with torch.no_grad():
        ref = model.double()(x.double())
        model.to(dtype)
        peft_out = model(x.to(dtype))
        with patch_peft_model(model):
            ours = model(x.to(dtype))
    assert ours.dtype == dtype
    assert rel_err(ours, ref) <= max(2 * rel_err(peft_out, ref), {torch.float16: 2e-3,
                                                                   torch.bfloat16: 1e-2}[dtype])
