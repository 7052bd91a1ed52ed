"""Mixed-adapter serving without host syncs: ``torch.compile(fullgraph=True)`` traces a patched
PEFT model called with ``adapter_names=`` (the batch is built by traceable device ops, so no
graph break), and ``AdapterPool.batch`` builds its batch without waiting for the device.
CPU, torch backend (inductor)."""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, rel_err, tiny_gpt2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    old = torch._inductor.config.compile_threads
    torch._inductor.config.compile_threads = 1  # the CI box has two cores
    yield
    torch._inductor.config.compile_threads = old
    torch._dynamo.reset()


def _peft_gpt2():
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    base = tiny_gpt2(n_layer=1, n_embd=32, n_head=4, vocab=97, n_positions=32, seed=0)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        init_lora_weights=False), adapter_name="a1")
    model.add_adapter("a2", peft.LoraConfig(r=6, lora_alpha=5, target_modules=["c_attn"],
                                            fan_in_fan_out=True, init_lora_weights=False))
    return model.eval()


def test_fullgraph_compile_of_patched_peft_with_adapter_names():
    from lora_kernels import patch_peft_model
    model = _peft_gpt2()
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(3))
    names = ["a1", "__base__", "a2", "a1"]
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits  # PEFT's own mixed forward
    handle = patch_peft_model(model)
    # PeftModel.forward registers its adapter_names pre-forward hooks on every call (dynamo
    # cannot trace hook registration: a PEFT limitation, not ours), so the hooks are entered
    # here, through PEFT's own context manager, and the model under them is compiled whole:
    # every LoRA layer's mixed forward, batch building included, is inside the graph.
    inner = model.base_model.model
    compiled = torch.compile(lambda x: inner(x).logits, fullgraph=True)  # a break is an error
    with torch.no_grad():
        with model.base_model._enable_peft_forward_hooks(adapter_names=names):
            got = compiled(ids)
        eager = model(ids, adapter_names=names).logits
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(eager, want) <= TOL[torch.float32]
    handle.unpatch()


def test_peft_batch_cache_builds_without_reading_the_device():
    # A meta device has no values: any read of device data (a sync on CUDA) would fail, so
    # building there proves the batch is made from host data and uploaded.
    from lora_kernels.integrations.peft_mixed import BatchCache
    slots, batch = BatchCache().get(["a2", "__base__", "a1", "a2"], 5, torch.device("meta"))
    assert slots == ("a1", "a2") and batch.device.type == "meta"
    assert batch.num_active == 2 and batch.max_seg_len == 10 and not batch.bounded
    assert batch.host_offsets() == (0, 5, 10, 20)
    _, cpu = BatchCache().get(["a2", "__base__", "a1", "a2"], 5, torch.device("cpu"))
    assert cpu.adapter_ids.tolist() == [1] * 5 + [-1] * 5 + [0] * 5 + [1] * 5


def test_adapter_pool_batch_builds_without_sync_and_compiles(monkeypatch):
    from lora_kernels import AdapterPool, LoRABatch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.ReLU(),
                                torch.nn.Linear(11, 7)).eval()
    pool = AdapterPool(model, ["0", "2"], num_slots=3, max_rank=4)
    g = torch.Generator().manual_seed(0)
    for name, r in (("x", 2), ("y", 4)):
        sd = {f"base_model.model.{m}.lora_{ab}.weight": torch.randn(*shape, generator=g)
              for m, (k, n) in (("0", (13, 11)), ("2", (11, 7)))
              for ab, shape in (("A", (r, k)), ("B", (n, r)))}
        pool.register(name, sd, {"r": r, "lora_alpha": 2.0 * r, "target_modules": ["0", "2"]})
    x = torch.randn(5, 13, generator=g)
    names = ["y", None, "x", "y", "x"]
    with pool.batch(names) as b:  # warm: loads both adapters into slots
        want = model(x)
    # The pool builds from host ids (no device read: see the meta test above), never from
    # device ids (which costs a sync).
    def no_device_build(*a, **k):
        raise AssertionError("AdapterPool.batch built its LoRABatch from device ids")
    monkeypatch.setattr(LoRABatch, "from_adapter_ids", no_device_build)
    b = pool.batch(names)
    b.release()
    lb = b.lora_batch
    assert lb.adapter_ids.tolist() == b.token_ids.tolist() and not lb.bounded
    assert lb.num_active == 2 and lb.max_seg_len == 2
    with torch.no_grad(), pool.batch(names):
        compiled = torch.compile(model, fullgraph=True)
        assert rel_err(compiled(x), want) <= TOL[torch.float32]


def test_torch_backend_follows_an_in_place_refresh():
    # The torch backend caches grouping plans on the batch's sorted_token_ids tensor; a static
    # batch keeps that tensor and changes its contents, so the cache must notice.
    import lora_kernels as lk
    from lora_kernels import reference as ref
    g = torch.Generator().manual_seed(0)
    S, T, K, N, R = 4, 9, 7, 5, 3
    x, W = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    A, B = torch.randn(S, R, K, generator=g), torch.randn(S, N, R, generator=g)
    sc = torch.tensor([0.5, 1.0, 1.5, 2.0])
    batch = lk.LoRABatch.static(T, S)
    for ids in ([0] * 9, [3, 1, -1, 1, 0, 2, 2, -1, 3], [2] * 4 + [1] * 5):
        batch.refresh_(ids)
        y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, backend="torch")
        want = ref.multi_lora_linear(x.double(), W.double(), None, A.double(), B.double(),
                                     torch.tensor(ids), sc.double())
        assert rel_err(y, want) <= TOL[torch.float32], ids
