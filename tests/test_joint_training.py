"""Joint multi-adapter training: ``model(..., adapter_names=[...])`` in training mode under
``patch_peft_model``. Oracles: PEFT itself, one adapter at a time on its own samples (exact
gradients, p = 0), and the float64 reference with the same dropout seeds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import MLP, rel_err, tiny_gpt2

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference as ref  # noqa: E402

VOCAB = 61
TRAINING_MODE_ERROR = "Cannot pass `adapter_names` when the model is in training mode"


def joint_gpt2(dropout=(0.0, 0.0, 0.0), seed=0):
    """GPT-2 (Conv1D) with three adapters that differ in rank, alpha, rsLoRA, dropout and
    targets (c_fc has only a2), random B so every adapter changes the output."""
    torch.manual_seed(seed)
    base = tiny_gpt2(n_embd=32, n_head=4, vocab=VOCAB, n_positions=32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                            fan_in_fan_out=True, lora_dropout=dropout[0],
                                            init_lora_weights=False), adapter_name="a1")
    model.add_adapter("a2", LoraConfig(r=7, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                                       fan_in_fan_out=True, use_rslora=True,
                                       lora_dropout=dropout[1], init_lora_weights=False))
    model.add_adapter("a3", LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn"],
                                       fan_in_fan_out=True, lora_dropout=dropout[2],
                                       init_lora_weights=False))
    model.set_requires_grad(["a1", "a2", "a3"], True)
    return model.train()


def tokens(b, t=7, seed=3):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


NAMES = ["a2", "a1", "__base__", "a3", "a2", "a1"]


def per_sample_loss(logits, ids):
    """Next-token cross entropy per sample ``[B]``."""
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none")
    return lp.view(ids.shape[0], -1).mean(1)


def joint_loss(model, ids, names):
    """Σ over adapters of the mean loss of that adapter's samples (base rows add their loss
    too, which must reach no adapter)."""
    losses = per_sample_loss(model(ids, adapter_names=names).logits, ids)
    total = 0.0
    for a in sorted(set(names)):
        rows = torch.tensor([i for i, n in enumerate(names) if n == a])
        total = total + losses[rows].mean()
    return total


def adapter_grads(model, adapters=("a1", "a2", "a3")):
    params = lk.integrations.peft_train.adapter_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for a in adapters for p in params[a]}


def separate_peft_grads(model, ids, names):
    """PEFT alone: each adapter trained on its own samples only, one adapter at a time."""
    oracle = copy.deepcopy(model)
    for a in sorted(set(names) - {"__base__"}):
        rows = torch.tensor([i for i, n in enumerate(names) if n == a])
        oracle.set_adapter(a)  # PEFT: the active adapter, trainable
        per_sample_loss(oracle(ids[rows]).logits, ids[rows]).mean().backward()
    return adapter_grads(oracle)


def test_peft_refuses_unpatched_and_again_after_unpatch():
    model = joint_gpt2()
    ids = tokens(len(NAMES))
    with pytest.raises(ValueError, match=TRAINING_MODE_ERROR):
        model(ids, adapter_names=NAMES)
    handle = lk.patch_peft_model(model)
    model(ids, adapter_names=NAMES).logits.sum().backward()
    assert model.base_model.training  # the flag PEFT checks is back
    with pytest.raises(ValueError, match="non-existing adapter"):  # PEFT's own name check runs
        model(ids, adapter_names=["a1", "typo", "a2", "a3", "a1", "a2"])
    assert model.base_model.training  # ... and a raise inside it restores the flag too
    handle.unpatch()
    with pytest.raises(ValueError, match=TRAINING_MODE_ERROR):
        model(ids, adapter_names=NAMES)
    assert "_enable_peft_forward_hooks" not in model.base_model.__dict__


def test_joint_step_grads_equal_separate_peft_steps():
    # ranks 4/7/2, alpha 8/5/16, a2 rsLoRA, a2 alone on c_fc, a1 alone on c_proj
    model = joint_gpt2()
    ids = tokens(len(NAMES))
    want = separate_peft_grads(model, ids, NAMES)
    with lk.patch_peft_model(model):
        joint_loss(model, ids, NAMES).backward()
    got = adapter_grads(model)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * (3 + 2 + 1)  # layers, A/B, modules
    for k in want:
        assert want[k].abs().sum() > 0, k
        assert rel_err(got[k], want[k]) <= 1e-5, k


def test_base_rows_train_nothing():
    model = joint_gpt2()
    ids = tokens(4)
    with lk.patch_peft_model(model):
        # a batch of base rows only: no adapter is even in the autograd graph
        assert not model(ids, adapter_names=["__base__"] * 4).logits.requires_grad
        # and the base rows of a mixed batch change no adapter's gradient
        model.zero_grad(set_to_none=True)
        names = ["a1", "__base__", "a2", "__base__"]
        lo = per_sample_loss(model(ids, adapter_names=names).logits, ids)
        (lo[0] + lo[2]).backward()
        first = adapter_grads(model)
        model.zero_grad(set_to_none=True)
        lo = per_sample_loss(model(ids, adapter_names=names).logits, ids)
        (lo[0] + lo[2] + 5.0 * (lo[1] + lo[3])).backward()
    for k, g in adapter_grads(model).items():
        assert torch.equal(g, first[k]), k


def test_eval_mode_mixed_batch_unchanged():
    model = joint_gpt2(dropout=(0.1, 0.2, 0.3)).eval()
    ids = tokens(len(NAMES))
    with torch.no_grad():
        want = model(ids, adapter_names=NAMES).logits
        with lk.patch_peft_model(model):
            got = model(ids, adapter_names=NAMES).logits
    assert rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------
# Dropout: the float64 reference with the seeds the layers drew
# ------------------------------------------------------------------------------------------
def test_dropout_grads_equal_float64_reference(monkeypatch):
    torch.manual_seed(1)
    model = get_peft_model(MLP().double(), LoraConfig(
        r=3, lora_alpha=6, target_modules=["up", "down"], lora_dropout=0.3,
        init_lora_weights=False), adapter_name="p3")
    model.add_adapter("p5", LoraConfig(r=5, lora_alpha=4, target_modules=["up", "down"],
                                       use_rslora=True, lora_dropout=0.5, init_lora_weights=False))
    model.add_adapter("p0", LoraConfig(r=2, lora_alpha=2, target_modules=["up"],
                                       lora_dropout=0.0, init_lora_weights=False))
    model.double()
    model.set_requires_grad(["p3", "p5", "p0"], True)
    model.train()
    names = ["p5", "p3", "__base__", "p0", "p5"]
    x = torch.randn(5, 3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seeds = []
    import lora_kernels.ops.multi_lora as ml
    real = ml.draw_seed
    monkeypatch.setattr(ml, "draw_seed", lambda: seeds.append(real()) or seeds[-1])
    with lk.patch_peft_model(model):
        out = model(x, adapter_names=names)
        out.pow(2).sum().backward()
    assert len(seeds) == 2  # one per layer, the mask regenerated (not redrawn) in the backward
    got = adapter_grads(model, ("p3", "p5", "p0"))

    # the reference: the same model, written out with reference.multi_lora_linear
    slots = sorted(set(names) - {"__base__"})  # the slot order the batch uses
    ids = torch.tensor([slots.index(n) if n != "__base__" else -1 for n in names])
    ids = ids.repeat_interleave(3)
    leaves = {}

    def layer(mod, h, seed):
        rk = [mod.lora_A[n].weight.shape[0] if n in mod.lora_A else 0 for n in slots]
        R = max(rk)
        A, B = [], []
        for n in slots:
            if n in mod.lora_A:
                a = leaves.setdefault(f"{n}A{id(mod)}", mod.lora_A[n].weight.detach().clone()
                                      .requires_grad_())
                b = leaves.setdefault(f"{n}B{id(mod)}", mod.lora_B[n].weight.detach().clone()
                                      .requires_grad_())
                A.append(F.pad(a, (0, 0, 0, R - a.shape[0])))
                B.append(F.pad(b, (0, R - b.shape[1])))
            else:
                A.append(torch.zeros(R, h.shape[1], dtype=h.dtype))
                B.append(torch.zeros(mod.out_features, R, dtype=h.dtype))
        # the op's contract: scalings travel as float32
        sc = torch.tensor([float(mod.scaling[n]) if n in mod.lora_A else 0.0 for n in slots],
                          dtype=torch.float32).double()
        p = [mod.lora_dropout[n].p if n in mod.lora_A and isinstance(
            mod.lora_dropout[n], nn.Dropout) else 0.0 for n in slots]
        base = mod.base_layer
        return ref.multi_lora_linear(h, base.weight, base.bias, torch.stack(A), torch.stack(B),
                                     ids, sc, torch.tensor(rk), None, p, int(seed))
    core = model.base_model.model
    h = torch.relu(layer(core.up, x.reshape(15, 13), seeds[0]))
    ref_out = layer(core.down, h, seeds[1])
    ref_out.pow(2).sum().backward()
    assert rel_err(out.reshape(15, 11), ref_out) <= 1e-12
    for n, mod in (("up", core.up), ("down", core.down)):
        for a in slots:
            if a in mod.lora_A:
                k = f"base_model.model.{n}.lora_A.{a}.weight"
                assert rel_err(got[k], leaves[f"{a}A{id(mod)}"].grad) <= 1e-10, k
                k = f"base_model.model.{n}.lora_B.{a}.weight"
                assert rel_err(got[k], leaves[f"{a}B{id(mod)}"].grad) <= 1e-10, k


# ------------------------------------------------------------------------------------------
# What training needs: checkpointing, accumulation, param groups, saving
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model = joint_gpt2()
    ids = tokens(len(NAMES))
    want = separate_peft_grads(model, ids, NAMES)
    model.base_model.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    with lk.patch_peft_model(model):
        joint_loss(model, ids, NAMES).backward()
    got = adapter_grads(model)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-5, k


def test_checkpointing_with_two_forwards_before_one_backward():
    # Each forward's recompute must see its own adapter names, however the backward is ordered.
    model = joint_gpt2()
    ids = tokens(len(NAMES))
    first, second = NAMES, list(reversed(NAMES))
    want = separate_peft_grads(model, ids, first)
    other = separate_peft_grads(model, ids, second)
    model.base_model.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False})
    with lk.patch_peft_model(model):
        (joint_loss(model, ids, first) + joint_loss(model, ids, second)).backward()
    got = adapter_grads(model)
    for k in want:
        assert rel_err(got[k], want[k] + other[k]) <= 1e-5, k


def test_accumulation_param_groups_and_save(tmp_path):
    model = joint_gpt2()
    ids = tokens(len(NAMES))
    with lk.patch_peft_model(model):
        joint_loss(model, ids, NAMES).backward()
        once = adapter_grads(model)
        model.zero_grad(set_to_none=True)
        for half in (slice(0, 3), slice(3, 6)):  # two micro-batches, one optimizer step
            joint_loss(model, ids[half], NAMES[half]).backward()
    acc = adapter_grads(model)
    # the oracle: PEFT, adapter by adapter, on each micro-batch, gradients summed
    halves = [separate_peft_grads(model, ids[h], NAMES[h]) for h in (slice(0, 3), slice(3, 6))]
    assert acc.keys() == once.keys()
    for k in acc:
        assert rel_err(acc[k], halves[0][k] + halves[1][k]) <= 1e-5, k

    lrs = {"a1": 0.1, "a2": 0.01, "a3": 1.0}
    groups = lk.adapter_param_groups(model, lr=0.5, a1={"lr": 0.1}, overrides={"a2": {"lr": 0.01}},
                                     a3={"lr": 1.0, "momentum": 0.0})
    assert [g["adapter"] for g in groups] == ["a1", "a2", "a3"]
    opt = torch.optim.SGD(groups, lr=123.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            a = n.split(".")[-2]
            assert torch.allclose(p, before[n] - lrs[a] * acc[n]), n

    with pytest.raises(ValueError, match="unknown adapter"):
        lk.adapter_param_groups(model, nope={"lr": 1.0})
    with pytest.raises(ValueError, match="params"):
        lk.adapter_param_groups(model, a1={"params": []})

    # each adapter as its own PEFT directory, reloaded by plain PEFT, same outputs
    paths = lk.save_peft_adapters(model, tmp_path)
    assert sorted(paths) == ["a1", "a2", "a3"]
    model.eval()
    with torch.no_grad(), lk.patch_peft_model(model):
        joint = model(ids, adapter_names=NAMES).logits
    for a, path in paths.items():
        torch.manual_seed(0)
        fresh = PeftModel.from_pretrained(tiny_gpt2(n_embd=32, n_head=4, vocab=VOCAB,
                                                    n_positions=32, seed=0), path).eval()
        rows = [i for i, n in enumerate(NAMES) if n == a]
        with torch.no_grad():
            assert rel_err(fresh(ids[rows]).logits, joint[rows]) <= 1e-5, a


def test_torch_compile_joint_step_matches_eager():
    torch.manual_seed(1)
    model = get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                             init_lora_weights=False), adapter_name="p3")
    model.add_adapter("p5", LoraConfig(r=5, lora_alpha=4, target_modules=["up", "down"],
                                       use_rslora=True, init_lora_weights=False))
    model.set_requires_grad(["p3", "p5"], True)
    model.train()
    names = ["p5", "p3", "__base__", "p5"]
    x = torch.randn(4, 3, 13, generator=torch.Generator().manual_seed(2))
    with lk.patch_peft_model(model):
        model(x, adapter_names=names).pow(2).sum().backward()
        eager = adapter_grads(model, ("p3", "p5"))
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for _ in range(2):  # the second step reuses the compiled graphs
            model.zero_grad(set_to_none=True)
            compiled(x, adapter_names=names).pow(2).sum().backward()
        got = adapter_grads(model, ("p3", "p5"))
        torch._dynamo.reset()
    for k in eager:
        assert eager[k].abs().sum() > 0 and rel_err(got[k], eager[k]) <= 1e-6, k
