"""patch_peft_model on PEFT ``target_parameters`` LoRA over transformers MoE experts
(integrations/peft_moe.py): PEFT is the oracle for the loss and every LoRA gradient (experts
and attention), on both backends; no expert-weight-sized temporary in a patched step;
merge / disable / several adapters / unpatch; unrecognised blocks keep PEFT with a warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import rel_err, triton_device
from lora_kernels import patch_peft_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

E, H, I, TOPK = 5, 32, 24, 2
BACKENDS = ["torch"] + (["triton"] if triton_device() == "cpu" else [])
EXPERT_SHAPES = {(E, 2 * I, H), (E, H, I)}


def _model(kind="qwen3", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    if kind == "qwen3":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=40,
                                          moe_intermediate_size=I, num_experts=E,
                                          num_experts_per_tok=TOPK, decoder_sparse_step=1,
                                          norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=I, num_local_experts=E,
                                         num_experts_per_tok=TOPK)
        model = transformers.MixtralForCausalLM(cfg)
    return model.float().eval()


def _peft(model, adapters=("default",), params=("gate_up_proj", "down_proj")):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
               target_parameters=[f"mlp.experts.{p}" for p in params],
               init_lora_weights=False)  # random B: every gradient is non-trivial
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name=adapters[0])
    for a in adapters[1:]:
        pm.add_adapter(a, peft.LoraConfig(**{**cfg, "r": 3}))
    return pm


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _ids(T=11):
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["qwen3", "mixtral"])
def test_patched_loss_and_grads_match_peft(kind, backend):
    ref = _peft(_model(kind))
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer of these models is accelerated
        handle = patch_peft_model(ours, backend=backend)
    assert sum("experts" in n for n in handle.patched) == 2 and not handle.skipped
    ids = _ids()
    loss_ref, g_ref = _loss_and_grads(ref, ids)
    loss, g = _loss_and_grads(ours, ids)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert g.keys() == g_ref.keys()
    assert any("experts" in n and "lora_A" in n for n in g)
    assert any("q_proj" in n for n in g)
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) <= 1e-4, n
    handle.unpatch()
    assert rel_err(_loss_and_grads(ours, ids)[0], loss_ref) == 0.0


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_no_expert_sized_temporary_in_a_patched_step():
    model = _peft(_model())
    ids = _ids()
    with _Shapes() as peft_step:  # the test sees PEFT's fold: it would catch ours
        _loss_and_grads(model, ids)
    assert EXPERT_SHAPES <= peft_step.shapes
    patch_peft_model(model, backend="torch")
    _loss_and_grads(model, ids)  # first step (caches, lazy init) outside the check
    with _Shapes() as step:
        _loss_and_grads(model, ids)
    assert not EXPERT_SHAPES & step.shapes


def test_several_adapters_disable_merge_and_single_target():
    ref = _peft(_model(), adapters=("one", "two"))
    ref.base_model.set_adapter(["one", "two"])
    ours = copy.deepcopy(ref)
    patch_peft_model(ours, backend="torch")
    ids = _ids(7)
    (loss_ref, g_ref), (loss, g) = _loss_and_grads(ref, ids), _loss_and_grads(ours, ids)
    assert rel_err(loss, loss_ref) <= 1e-5 and g.keys() == g_ref.keys()
    assert any(".one." in n for n in g) and any(".two." in n for n in g)
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) <= 1e-4, n
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
        with ours.disable_adapter(), ref.disable_adapter():
            assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
        ours.set_adapter("two")
        ref.set_adapter("two")
        ours.merge_adapter()
        ref.merge_adapter()
        assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
        ours.unmerge_adapter()
        ref.unmerge_adapter()
        assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
    # Only gate_up_proj targeted: down_proj runs as the base experts (a rank-0 term).
    ref1 = _peft(_model(seed=1), params=("gate_up_proj",))
    ours1 = copy.deepcopy(ref1)
    patch_peft_model(ours1, backend="torch")
    loss_ref, g_ref = _loss_and_grads(ref1, ids)
    loss, g = _loss_and_grads(ours1, ids)
    assert rel_err(loss, loss_ref) <= 1e-5
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) <= 1e-4, n


def test_unrecognised_experts_block_keeps_peft_with_one_warning(monkeypatch):
    from lora_kernels.integrations import peft_moe
    monkeypatch.setattr(peft_moe, "KNOWN_EXPERTS", ())
    ref = _peft(_model())
    ours = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="not a recognised transformers MoE block") as rec:
        handle = patch_peft_model(ours, backend="torch")
    assert len([w for w in rec if "recognised" in str(w.message)]) == 2  # one per block
    assert sum("experts" in n for n in handle.skipped) == 2
    ids = _ids(7)
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, ref(input_ids=ids).logits) == 0.0


def test_adapter_files_round_trip_through_a_patched_model(tmp_path):
    ours = _peft(_model(seed=2))
    handle = patch_peft_model(ours, backend="torch")
    ids = _ids(7)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(_model(seed=2), tmp_path)
    patch_peft_model(fresh, backend="torch")
    with torch.no_grad():
        assert rel_err(fresh(input_ids=ids).logits, want) <= 1e-6
    handle.unpatch()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, want) <= 1e-5


def test_patched_moe_model_compiles_fullgraph():
    ref = _peft(_model(seed=3))
    ours = copy.deepcopy(ref)
    patch_peft_model(ours, backend="torch")
    ids = _ids(7)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled.zero_grad(set_to_none=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    loss_ref, g_ref = _loss_and_grads(ref, ids)
    assert rel_err(loss, loss_ref) <= 1e-5
    assert got.keys() == g_ref.keys()
    for n in g_ref:
        assert rel_err(got[n], g_ref[n]) <= 1e-4, n
