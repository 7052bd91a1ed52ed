"""PEFT adapter files: read what PEFT writes, write what PEFT reads (round trip through PEFT
itself), and clear errors for every kind of bad file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import rel_err, tiny_gpt2

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lora_kernels import inject_lora, load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_kernels.adapters import (AdapterConfig, AdapterFormatError,  # noqa: E402
                                   AdapterMismatchError, check_adapter)
from lora_kernels.adapters.peft_format import split_modules  # noqa: E402

VOCAB = 61


def gpt2(seed=0):
    return tiny_gpt2(n_embd=24, n_head=2, vocab=VOCAB, seed=seed).eval()


def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def peft_dir(tmp_path):
    """An adapter written by PEFT itself, with a rank_pattern and an alpha_pattern."""
    model = get_peft_model(gpt2(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        rank_pattern={"h.1.attn.c_attn": 6}, alpha_pattern={"h.0.mlp.c_proj": 3},
        use_rslora=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", model


def test_reads_peft_files(peft_dir):
    path, model = peft_dir
    cfg, sd = load_peft_adapter(path, model=gpt2())
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.use_rslora and cfg.fan_in_fan_out
    assert cfg.rank_for("transformer.h.1.attn.c_attn") == 6
    assert cfg.rank_for("transformer.h.0.attn.c_attn") == 4
    assert cfg.alpha_for("transformer.h.0.mlp.c_proj") == 3
    # PEFT's own scaling for every layer equals the config's
    for name, m in model.named_modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            path_ = name.split("base_model.model.", 1)[1]
            assert cfg.scaling_for(path_) == pytest.approx(m.scaling["default"])
    ref = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sorted(sd) == sorted(ref)
    for k in sd:
        assert torch.equal(sd[k], ref[k])
    # a model wrapped by PEFT (the prefix is part of its module paths) fits too
    check_adapter(cfg, split_modules(sd), model)


def _our_model():
    """Our own LoRA layers: GPT-2 c_attn packed (q and v only), MLP c_proj at another rank."""
    model = gpt2()
    inject_lora(model, ["c_attn"], r=3, lora_alpha=6, enable_lora={"c_attn": [True, False, True]})
    inject_lora(model, ["mlp.c_proj"], r=5, lora_alpha=2, use_rslora=False)
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("safe", [True, False])
def test_save_round_trips_through_peft(tmp_path, safe):
    ours = _our_model()
    x = ids()
    with torch.no_grad():
        ref = ours(x).logits
    out = save_peft_adapter(tmp_path / "ad", ours, base_model_name_or_path="tiny-gpt2",
                            safe_serialization=safe)
    assert (out / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    # PEFT loads what we save and computes the same function.
    loaded = PeftModel.from_pretrained(gpt2(), str(out)).eval()
    with torch.no_grad():
        assert rel_err(loaded(x).logits, ref) <= 1e-5
    # and we read it back unchanged
    cfg, sd = load_peft_adapter(out, model=gpt2())
    assert cfg.base_model_name_or_path == "tiny-gpt2"
    mods = split_modules(sd)
    assert set(mods) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                         "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    assert torch.equal(mods["transformer.h.0.mlp.c_proj"][0],
                       ours.transformer.h[0].mlp.c_proj.lora_A.weight)


def test_state_dict_round_trip_through_peft_save(tmp_path, peft_dir):
    path, model = peft_dir
    cfg, sd = load_peft_adapter(path)
    save_peft_adapter(tmp_path / "again", sd, cfg)
    cfg2, sd2 = load_peft_adapter(tmp_path / "again")
    assert cfg2.rank_pattern == cfg.rank_pattern and cfg2.alpha_pattern == cfg.alpha_pattern
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    again = PeftModel.from_pretrained(gpt2(), str(tmp_path / "again")).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(again(x).logits, model.eval()(x).logits)
    with pytest.raises(ValueError, match="config="):
        save_peft_adapter(tmp_path / "x", sd)


# ---- bad files ------------------------------------------------------------------------------
def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path, peft_dir):
    bad = _copy(peft_dir[0], tmp_path)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        load_peft_adapter(bad)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere")


def test_truncated_safetensors_and_missing_weights(tmp_path, peft_dir):
    bad = _copy(peft_dir[0], tmp_path)
    f = bad / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        load_peft_adapter(bad)
    f.write_bytes(data[:5])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        load_peft_adapter(bad)
    f.unlink()
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors"):
        load_peft_adapter(bad)


def test_bad_config_contents(tmp_path, peft_dir):
    bad = _copy(peft_dir[0], tmp_path)
    cfg_file = bad / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_peft_adapter(bad)
    for patch, msg in [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "peft_type"),
                       ({"r": 0}, "r must be a positive int"), ({"lora_alpha": -1}, "lora_alpha"),
                       ({"bias": "all"}, "bias")]:
        cfg_file.write_text(json.dumps({**raw, **patch}))
        with pytest.raises(AdapterFormatError, match=msg):
            load_peft_adapter(bad)
    # the tensors disagree with the config's rank
    cfg_file.write_text(json.dumps({**raw, "rank_pattern": {}}))
    with pytest.raises(AdapterMismatchError, match=r"rank 6 but the config says r=4"):
        load_peft_adapter(bad)
    # a module with weights that target_modules does not name
    cfg_file.write_text(json.dumps({**raw, "target_modules": ["c_attn"]}))
    with pytest.raises(AdapterMismatchError, match="not in target_modules"):
        load_peft_adapter(bad)


def test_adapter_against_the_wrong_model(peft_dir):
    path = peft_dir[0]
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16))
    with pytest.raises(AdapterMismatchError) as exc:
        load_peft_adapter(path, model=small)
    msg = str(exc.value)
    assert "unknown target module 'transformer.h.1.attn.c_attn'" in msg
    assert "module 'transformer.h.0.attn.c_attn' is [in=16, out=48]" in msg
    assert len(exc.value.problems) == 6  # 3 unknown modules in h.1, 3 wrong shapes in h.0


def test_bad_state_dicts():
    a, b = torch.zeros(2, 4), torch.zeros(3, 2)
    cases = [({"m.lora_A.weight": a}, "has no lora_B"),
             ({"m.lora_A.weight": a, "m.lora_B.weight": torch.zeros(3, 5)}, "has rank 2"),
             ({"m.lora_A.weight": a, "m.lora_B.weight": b, "m.lora_magnitude_vector": b}, "DoRA"),
             ({"m.weight": a}, "not a LoRA factor"),
             ({"m.lora_A.weight": torch.zeros(2, 4, dtype=torch.int64), "m.lora_B.weight": b},
              "2-D float tensor"),
             ({}, "no LoRA tensors")]
    for sd, msg in cases:
        with pytest.raises(AdapterFormatError, match=msg):
            split_modules(sd)
    assert set(split_modules({"base_model.model.m.lora_A.x.weight": a,
                              "base_model.model.m.lora_B.x.weight": b})) == {"m"}
    assert AdapterConfig.from_dict({"r": 2, "lora_alpha": 4, "foo": 1}).extra == {"foo": 1}
