"""Module semantics: LoRALinear, PackedLoRALinear, MultiLoRALinear, injection, merge, state dicts."""

import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import TOL, randn, rel_err, tiny_gpt2


def _trained(layer):
    """A freshly built layer has B = 0; give it a non-trivial adapter."""
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_lora_linear_init_and_scaling():
    layer = lk.LoRALinear(20, 12, r=4, lora_alpha=8)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.lora_A.weight.abs().sum() > 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in=20
    assert layer.lora_A.weight.abs().max() <= bound
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert lk.LoRALinear(20, 12, r=4, lora_alpha=8, use_rslora=True).scaling == 8 / 2
    x = randn(3, 20)
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_lora_linear_forward_matches_reference_and_trains():
    layer = _trained(lk.LoRALinear(33, 17, r=5, lora_alpha=10, lora_dropout=0.0))
    x = randn(2, 7, 33)
    y = layer(x)
    expect = ref.lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                             layer.lora_A.weight.double(), layer.lora_B.weight.double(), 2.0)
    assert rel_err(y, expect) <= TOL[torch.float32]
    y.square().mean().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert layer.weight.grad is None


def test_from_linear_shares_storage():
    lin = nn.Linear(16, 8)
    layer = lk.LoRALinear.from_linear(lin, r=2)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    x = randn(4, 16)
    assert torch.allclose(layer(x), lin(x))


def test_merge_is_plain_linear_bit_for_bit_and_unmerge_restores():
    layer = _trained(lk.LoRALinear(24, 10, r=3, lora_alpha=6))
    x = randn(5, 24)
    y_unmerged = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    assert torch.equal(y_merged, nn.functional.linear(x, layer.weight, layer.bias))
    assert rel_err(y_merged, y_unmerged) <= 1e-5
    layer.merge()  # idempotent
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    assert rel_err(layer(x), y_unmerged) <= 1e-5


def test_dropout_only_in_training():
    layer = _trained(lk.LoRALinear(16, 8, r=4, lora_dropout=0.5))
    x = randn(6, 16)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_eval, y_train)
    layer.eval()
    assert torch.equal(layer(x), y_eval)


def test_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(12, 20)  # nf=12 out, nx=20 in; weight [20, 12]
    layer = _trained(lk.LoRALinear.from_linear(conv, r=3))
    assert layer.fan_in_fan_out and layer.weight is conv.weight
    x = randn(4, 20)
    expect = conv(x) + layer.scaling * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert rel_err(layer(x), expect) <= TOL[torch.float32]
    layer.merge()
    assert rel_err(layer(x), expect) <= 1e-5


def test_packed_projection_adapts_only_enabled_slices():
    lin = nn.Linear(16, 30)
    layer = lk.PackedLoRALinear.from_linear(lin, r=2, enable_lora=[True, False, True])
    assert layer.out_slices == (10, 10, 10)
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (20, 2)
    _trained(layer)
    x = randn(5, 16, requires_grad=True)
    y = layer(x)
    expect = ref.packed_lora_linear(x.double(), lin.weight.double(), lin.bias.double(),
                                    layer.lora_A.weight.double(), layer.lora_B.weight.double(),
                                    (10, 10, 10), (True, False, True), layer.scaling)
    assert rel_err(y, expect) <= TOL[torch.float32]
    assert torch.allclose(y[:, 10:20], lin(x)[:, 10:20])  # the k slice is untouched
    y.sum().backward()
    assert layer.lora_B.weight.grad.shape == (20, 2)
    layer.merge()
    assert rel_err(layer(x), expect) <= 1e-5


def test_packed_uneven_slices_gqa():
    layer = _trained(lk.PackedLoRALinear(16, [16, 4, 4], r=3, enable_lora=[True, True, False]))
    x = randn(3, 16)
    expect = ref.packed_lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                    layer.lora_A.weight.double(), layer.lora_B.weight.double(),
                                    (16, 4, 4), (True, True, False), layer.scaling)
    assert rel_err(layer(x), expect) <= TOL[torch.float32]


def _gpt2():
    return tiny_gpt2().eval()


def test_inject_mark_state_dict_merge_on_gpt2():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 8))
    base_logits = model(ids).logits
    lk.inject_lora(model, ["c_attn", "c_fc"], r=4, lora_alpha=8,
                   enable_lora={"c_attn": [True, False, True]})
    lk.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(model(ids).logits, base_logits, atol=1e-5)  # B = 0 at start
    sd = lk.lora_state_dict(model)
    assert set(sd) == trainable
    assert "transformer.h.0.mlp.c_fc.lora_A.weight" in sd
    for m in model.modules():
        if isinstance(m, lk.nn.lora_linear.LoRABase):
            _trained(m)
    out = model(ids, labels=ids)
    out.loss.backward()
    lk.merge_lora(model)
    assert rel_err(model(ids).logits, out.logits) <= 1e-4
    lk.unmerge_lora(model)
    assert rel_err(model(ids).logits, out.logits) <= 1e-4


def test_inject_errors():
    model = _gpt2()
    with pytest.raises(ValueError, match="target_modules"):
        lk.inject_lora(model, ["nope"], r=2)
    with pytest.raises(TypeError, match="target_modules"):
        lk.inject_lora(model, [], r=2)
    with pytest.raises(ValueError, match="r must"):
        lk.inject_lora(model, ["c_fc"], r=0)
    with pytest.raises(ValueError, match="bias"):
        lk.mark_only_lora_as_trainable(model, bias="some")


def test_multi_lora_linear_module_routes_tokens():
    lin = nn.Linear(20, 14)
    layer = lk.MultiLoRALinear(lin, num_slots=3, max_rank=8)
    adapters = [(randn(r, 20), randn(14, r), s) for r, s in ((8, 0.5), (3, 2.0))]
    for slot, (a, b, s) in enumerate(adapters):
        layer.set_adapter(slot, a, b, s)
    ids = torch.tensor([1, -1, 0, 1, 2])  # slot 2 is empty: rank 0 = base
    x = randn(5, 20)
    batch = lk.LoRABatch.from_adapter_ids(ids, 3)
    y = layer(x, batch)
    for t, i in enumerate(ids.tolist()):
        want = lin(x[t])
        if 0 <= i < 2:
            a, b, s = adapters[i]
            want = want + s * b @ (a @ x[t])
        assert torch.allclose(y[t], want, atol=1e-5)
    with lk.use_lora_batch(layer, batch):
        assert torch.equal(layer(x), y)
    assert torch.equal(layer(x), lin(x))  # no batch installed: base only
    layer.clear_slot(1)
    assert torch.allclose(layer(x, batch)[0], lin(x[0]))


def test_multi_lora_trains_several_adapters_in_one_batch():
    lin = nn.Linear(12, 9)
    layer = lk.MultiLoRALinear(lin, num_slots=2, max_rank=4)
    for slot in range(2):
        layer.set_adapter(slot, randn(4, 12), randn(9, 4), 1.0)
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, 1, 1, -1]), 2)
    layer(randn(4, 12), batch).sum().backward()
    assert layer.lora_A.grad[0].abs().sum() > 0 and layer.lora_A.grad[1].abs().sum() > 0
    assert lin.weight.grad is None


def test_multi_lora_set_adapter_validation():
    layer = lk.MultiLoRALinear(nn.Linear(8, 6), num_slots=2, max_rank=4)
    with pytest.raises(ValueError, match="slot"):
        layer.set_adapter(2, randn(2, 8), randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="lora_b"):
        layer.set_adapter(0, randn(5, 8), randn(6, 5), 1.0)  # rank above max_rank
    with pytest.raises(ValueError, match="lora_a"):
        layer.set_adapter(0, randn(2, 7), randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="num_slots"):
        lk.MultiLoRALinear(nn.Linear(8, 6), num_slots=0, max_rank=4)
