"""AdapterPool: mixed batches against PEFT's adapter_names, LRU eviction, pinned slots under
concurrent loads (ids never point at a reloaded slot), heterogeneous ranks, and bad adapters
that leave the pool unchanged."""

from __future__ import annotations

import random
import shutil
import threading

import pytest
import torch
from torch import nn

from helpers import rel_err
from lora_kernels import AdapterPool, MultiLoRALinear
from lora_kernels.adapters import AdapterFormatError, AdapterMismatchError, PoolBusyError

K, H, N = 16, 24, 8


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, N)).eval()


def adapter(seed, r=4, alpha=8.0, modules=("0", "2"), dims=None):
    """A PEFT-keyed state dict + config for the MLP."""
    g = torch.Generator().manual_seed(seed)
    dims = dims or {"0": (K, H), "2": (H, N)}
    sd = {}
    for m in modules:
        k, n = dims[m]
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, k, generator=g) * 0.3
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(n, r, generator=g) * 0.3
    return sd, {"r": r, "lora_alpha": alpha, "target_modules": list(modules)}


def merged(seed_model, sd, cfg):
    """The base MLP with the adapter merged in: the oracle for one sample."""
    m = mlp(seed_model)
    with torch.no_grad():
        for idx in ("0", "2"):
            a = sd.get(f"base_model.model.{idx}.lora_A.weight")
            if a is None:
                continue
            b = sd[f"base_model.model.{idx}.lora_B.weight"]
            m[int(idx)].weight += (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    return m


def expected(adapters, names, x):
    rows = []
    for i, n in enumerate(names):
        model = mlp() if n is None else merged(0, *adapters[n])
        with torch.no_grad():
            rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


def snapshot(pool):
    state = {}
    for name, layer in pool.layers.items():
        for key in ("lora_A", "lora_B", "scalings", "ranks"):
            state[f"{name}.{key}"] = getattr(layer, key).detach().clone()
    return state, pool.resident(), pool.registered()


def same(s1, s2):
    return s1[1:] == s2[1:] and all(torch.equal(s1[0][k], s2[0][k]) for k in s1[0])


def make_pool(num_slots=2, max_rank=8):
    model = mlp()
    pool = AdapterPool(model, ["0", "2"], num_slots=num_slots, max_rank=max_rank)
    assert isinstance(model[0], MultiLoRALinear) and isinstance(model[2], MultiLoRALinear)
    return model, pool


# ------------------------------------------------------------------------------------------
def test_mixed_batch_heterogeneous_ranks_matches_merged_models():
    model, pool = make_pool(num_slots=3, max_rank=8)
    ads = {"a": adapter(1, r=2), "b": adapter(2, r=8, alpha=4),
           "c": adapter(3, r=5, modules=("2",))}
    for n, (sd, cfg) in ads.items():
        pool.load(n, sd, cfg)
    names = ["a", None, "c", "b", "a", "__base__"]
    x = torch.randn(len(names), K)
    with torch.no_grad(), pool.batch(names) as batch:
        y = model(x)
        assert batch.ids.tolist() == [pool.resident()[n] if n in ads else -1 for n in names]
    ref = expected(ads, [None if n == "__base__" else n for n in names], x)
    assert rel_err(y, ref) <= 1e-5
    # per-token ids for [B, L] inputs, and ragged lengths
    x3 = torch.randn(len(names), 3, K)
    with torch.no_grad(), pool.batch(names, tokens_per_sample=3):
        y3 = model(x3)
    with torch.no_grad(), pool.batch(names, tokens_per_sample=[3] * len(names)):
        y3b = model(x3.reshape(-1, K)).reshape(len(names), 3, N)
    assert torch.equal(y3, y3b)
    assert rel_err(y3[:, 1], expected(ads, [None if n == "__base__" else n for n in names],
                                      x3[:, 1])) <= 1e-5


def test_registered_weights_are_a_private_copy():
    model, pool = make_pool(num_slots=1)
    ads = {"a": adapter(1), "b": adapter(2)}
    sd, cfg = ads["a"]
    pool.register("a", sd, cfg)
    pool.load("b", *ads["b"])
    keep = {k: v.clone() for k, v in sd.items()}
    for v in sd.values():
        v.mul_(-7.0)  # the caller reuses its tensors after registering
    x = torch.randn(1, K)
    with torch.no_grad(), pool.batch(["a"]):  # loaded on demand now, from the host copy
        assert rel_err(model(x), expected({"a": (keep, cfg)}, ["a"], x)) <= 1e-5


def test_lru_eviction_and_on_demand_reload():
    model, pool = make_pool(num_slots=2)
    ads = {n: adapter(i) for i, n in enumerate("abc")}
    pool.load("a", *ads["a"])
    pool.load("b", *ads["b"])
    with pool.batch(["a"]):
        pass
    pool.load("c", *ads["c"])  # b is the least recently used
    assert set(pool.resident()) == {"a", "c"}
    assert pool.registered() == ["a", "b", "c"]
    x = torch.randn(3, K)
    with torch.no_grad(), pool.batch(["b", "c", "b"]):  # b reloads on demand, evicting a
        y = model(x)
    assert set(pool.resident()) == {"b", "c"}
    assert rel_err(y, expected(ads, ["b", "c", "b"], x)) <= 1e-5
    with pytest.raises(ValueError, match="3 distinct adapters but the pool has 2 slots"):
        pool.batch(["a", "b", "c"])
    with pytest.raises(KeyError, match="not registered"):
        pool.batch(["zzz"])
    pool.unload("b")
    assert set(pool.resident()) == {"c"} and "b" not in pool.registered()


def test_pinned_slots_are_never_overwritten():
    model, pool = make_pool(num_slots=2)
    ads = {n: adapter(i + 10) for i, n in enumerate("abc")}
    pool.load("a", *ads["a"])
    pool.load("b", *ads["b"])
    ids = pool.batch_ids(["a", "b"])
    before = snapshot(pool)
    with pytest.raises(PoolBusyError, match="pinned by in-flight batches"):
        pool.load("c", *ads["c"])
    assert same(snapshot(pool), before)  # no slot touched
    # A loader thread waits for a slot; it may only get one after release.
    done = threading.Event()
    result = {}

    def loader():
        result["slot"] = pool.load("c", *ads["c"], timeout=10.0)
        done.set()
    t = threading.Thread(target=loader)
    t.start()
    x = torch.randn(2, K)
    for _ in range(5):
        with torch.no_grad(), pool.batch(["a", "b"]):
            assert rel_err(model(x), expected(ads, ["a", "b"], x)) <= 1e-5
    assert not done.is_set()
    pool.release(ids)
    t.join(10)
    assert done.is_set()
    assert "c" in pool.resident() and len(pool.resident()) == 2
    with pytest.raises(ValueError, match="not released yet"):
        pool.release(ids)


def test_reloading_a_name_in_flight_keeps_the_old_weights_for_that_batch():
    model, pool = make_pool(num_slots=2)
    old, new = adapter(1), adapter(2)
    pool.load("a", *old)
    x = torch.randn(1, K)
    with torch.no_grad(), pool.batch(["a"]) as inflight:
        pool.load("a", *new)  # goes to the other slot; the pinned one stays as it was
        assert pool.resident()["a"] != inflight.ids.item()
        assert rel_err(model(x), expected({"a": old}, ["a"], x)) <= 1e-5
    with torch.no_grad(), pool.batch(["a"]):
        assert rel_err(model(x), expected({"a": new}, ["a"], x)) <= 1e-5
    assert len(pool.resident()) == 1  # the retired slot is free again


def test_concurrent_loads_and_batches_stay_correct():
    """Stress: a loader thread keeps evicting and reloading while batches run; every batch's
    output must match its adapters (a reloaded slot under a batch would break this)."""
    model, pool = make_pool(num_slots=3)
    ads = {f"ad{i}": adapter(100 + i, r=1 + i % 8) for i in range(6)}
    for n, (sd, cfg) in ads.items():
        pool.register(n, sd, cfg)
    refs = {n: merged(0, *ads[n]) for n in ads}
    stop = threading.Event()
    errors = []
    uploads = []
    real_upload = pool._upload

    def counting_upload(index, host, events):
        uploads.append(index)
        real_upload(index, host, events)
    pool._upload = counting_upload

    def loader():
        rng = random.Random(0)
        while not stop.is_set():
            try:
                pool.load(rng.choice(list(ads)), timeout=1.0)
            except PoolBusyError:
                pass
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
    t = threading.Thread(target=loader)
    t.start()
    rng = random.Random(1)
    try:
        for _ in range(40):
            group = list(ads)[:3] if rng.random() < 0.5 else list(ads)[2:5]
            names = [rng.choice(group) for _ in range(4)]
            x = torch.randn(4, K)
            with torch.no_grad(), pool.batch(names, timeout=5.0):
                y = model(x)
            with torch.no_grad():
                ref = torch.cat([refs[n](x[i:i + 1]) for i, n in enumerate(names)])
            assert rel_err(y, ref) <= 1e-5
    finally:
        stop.set()
        t.join(10)
    assert not errors
    assert len(uploads) > 40  # slots really were overwritten while batches ran


def test_bad_adapters_leave_the_pool_unchanged(tmp_path):
    model, pool = make_pool(num_slots=2, max_rank=4)
    pool.load("good", *adapter(1, r=4))
    before = snapshot(pool)
    bad = [
        (adapter(2, r=6), AdapterMismatchError, "exceeds the pool's max_rank=4"),
        (adapter(3, dims={"0": (K + 1, H), "2": (H, N)}), AdapterMismatchError,
         r"is \[in=16, out=24\]"),
        (({**adapter(4)[0], "base_model.model.9.lora_A.weight": torch.zeros(4, K),
           "base_model.model.9.lora_B.weight": torch.zeros(H, 4)}, {"r": 4, "lora_alpha": 8}),
         AdapterMismatchError, "unknown target module '9'"),
        (({"base_model.model.0.lora_A.weight": torch.zeros(4, K)}, {"r": 4}), AdapterFormatError,
         "has no lora_B"),
        ((adapter(5, r=4)[0], {"r": 2, "lora_alpha": 8}), AdapterMismatchError, "config says r=2"),
        (({k: v * float("nan") for k, v in adapter(8)[0].items()}, {"r": 4, "lora_alpha": 8}),
         AdapterMismatchError, "NaN or infinite"),
    ]
    for (sd, cfg), err, msg in bad:
        for target in ("good", "new"):
            with pytest.raises(err, match=msg):
                pool.load(target, sd, cfg)
            assert same(snapshot(pool), before)
    # files: missing config, truncated safetensors
    from lora_kernels import save_peft_adapter
    d = save_peft_adapter(tmp_path / "ok", *adapter(6, r=3))
    shutil.copytree(d, tmp_path / "noconf")
    (tmp_path / "noconf" / "adapter_config.json").unlink()
    shutil.copytree(d, tmp_path / "trunc")
    f = tmp_path / "trunc" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    for path, msg in [(tmp_path / "noconf", "no adapter_config.json"),
                      (tmp_path / "trunc", "truncated or corrupt")]:
        with pytest.raises(AdapterFormatError, match=msg):
            pool.load("good", path)
        assert same(snapshot(pool), before)
    with pytest.raises(ValueError, match="__base__"):
        pool.load("__base__", *adapter(7))
    pool.load("file", d)  # the good file loads
    assert "file" in pool.resident()


def test_pool_over_existing_multilora_layers_and_bad_construction():
    base = mlp()
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        AdapterPool(base)
    with pytest.raises(ValueError, match="matched no"):
        AdapterPool(base, ["nothing"], num_slots=2, max_rank=2)
    with pytest.raises(ValueError, match="num_slots"):
        AdapterPool(base, ["0"], num_slots=0, max_rank=2)
    model = mlp()
    model[0] = MultiLoRALinear(model[0], num_slots=3, max_rank=4)
    pool = AdapterPool(model)
    assert pool.num_slots == 3 and pool.max_rank == 4 and list(pool.layers) == ["0"]
    pool.load("a", *adapter(1, r=4, modules=("0",)))
    x = torch.randn(2, K)
    with torch.no_grad(), pool.batch(["a", None]):
        y = model(x)
    assert rel_err(y, expected({"a": adapter(1, r=4, modules=("0",))}, ["a", None], x)) <= 1e-5


def test_with_blocks_nest_and_threads_cannot_share_the_layers():
    model, pool = make_pool(num_slots=2)
    ads = {"a": adapter(1), "b": adapter(2)}
    for n, (sd, cfg) in ads.items():
        pool.load(n, sd, cfg)
    x = torch.randn(2, K)
    with torch.no_grad(), pool.batch(["a", "a"]):
        with pool.batch(["b", None]):
            assert rel_err(model(x), expected(ads, ["b", None], x)) <= 1e-5
        assert rel_err(model(x), expected(ads, ["a", "a"], x)) <= 1e-5  # the outer batch is back
        errors = []

        def other_thread():
            try:
                with pool.batch(["b", "b"]):
                    pass
            except RuntimeError as exc:
                errors.append(exc)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
        assert errors and "pass batch.lora_batch" in str(errors[0])
    assert all(layer.lora_batch is None for layer in pool.layers.values())
    assert all(s.pins == 0 for s in pool._slots)  # the refused thread's pins were released


def test_bad_batch_arguments_pin_nothing():
    model, pool = make_pool(num_slots=2)
    pool.load("a", *adapter(1))
    for names, tps, err, msg in [("a", 1, TypeError, "one adapter name"),
                                 ([3], 1, TypeError, "strings or None"),
                                 (["a"], -1, ValueError, ">= 0"),
                                 (["a"], 1.5, TypeError, "tokens_per_sample"),
                                 (["a", None], [1], ValueError, "1 lengths for 2 samples")]:
        with pytest.raises(err, match=msg):
            pool.batch(names, tps)
        assert all(s.pins == 0 for s in pool._slots)
    with pytest.raises(TypeError, match="model"):
        AdapterPool("model", ["0"], num_slots=1, max_rank=1)
