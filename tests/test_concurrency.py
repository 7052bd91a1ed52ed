"""AdapterPool under concurrency: batch threads, a loader thread and a churn thread (re-register
new versions, unload) hammer one pool for a bounded time.

Checksum: every adapter version's weights are distinct, and each sample of each batch must equal
the float64 oracle of exactly one version of its adapter (or the base model) - a slot read while
being reloaded, zeroed or half-written, or another layer's version, matches none. At the end
nothing leaks: every pin released, no slot stuck loading, no outstanding id tensors, all threads
joined, and on a GPU ``torch.cuda.memory_allocated()`` is back where it started.

The forward passes each batch's ``LoRABatch`` to the layers explicitly: the ``with pool.batch()``
form installs the batch on the shared layers: one thread's affair (it nests, see
``test_with_form_batches_nest``; another thread's ``with`` raises).
"""

from __future__ import annotations

import gc
import random
import threading
import time

import pytest
import torch
from torch import nn

from helpers import rel_err, tol

adapters = pytest.importorskip("lora_kernels.adapters")
if not hasattr(adapters, "AdapterPool"):
    pytest.skip("lora_kernels.adapters.AdapterPool is not importable yet", allow_module_level=True)
AdapterPool, PoolBusyError = adapters.AdapterPool, adapters.PoolBusyError

K, H, N = 16, 24, 8
NAMES = [f"ad{i}" for i in range(5)]
SECONDS = {"cpu": 2.0, "cuda": 8.0}


def base_mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, N)).to(device).eval()


def version_weights(name: str, version: int):
    """A distinct adapter per (name, version): rank, alpha and values all change."""
    g = torch.Generator().manual_seed(1000 * int(name[2:]) + version)
    r = 1 + (version * 3 + int(name[2:])) % 8
    sd = {}
    for m, (k, n) in {"0": (K, H), "2": (H, N)}.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, k, generator=g) * 0.3
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(n, r, generator=g) * 0.3
    return sd, {"r": r, "lora_alpha": float(1 + version % 5), "target_modules": ["0", "2"]}


def oracle(x64: torch.Tensor, sd, cfg) -> torch.Tensor:
    """The base MLP with this adapter merged in, in float64 on the CPU."""
    m = base_mlp("cpu").double()
    if sd is not None:
        with torch.no_grad():
            for idx in ("0", "2"):
                a = sd[f"base_model.model.{idx}.lora_A.weight"].double()
                b = sd[f"base_model.model.{idx}.lora_B.weight"].double()
                m[int(idx)].weight += (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    with torch.no_grad():
        return m(x64)


class History:
    """Every version ever registered under each name (append-only; appended *before* the pool
    sees it, so a batch can only ever use a version listed here) and its oracle on X."""

    def __init__(self, x64):
        self.x64 = x64
        self.lock = threading.Lock()
        self.versions = {n: [] for n in NAMES}
        self.expected = {}
        self.base = oracle(x64, None, None)

    def add(self, name: str):
        with self.lock:
            v = len(self.versions[name])
            sd, cfg = version_weights(name, v)
            self.versions[name].append(v)
            self.expected[(name, v)] = oracle(self.x64, sd, cfg)
        return sd, cfg

    def candidates(self, name):
        with self.lock:
            return [self.expected[(name, v)] for v in self.versions[name]]


def forward(model, x, lora_batch):
    """The MLP with the batch passed explicitly to each MultiLoRALinear (thread-safe)."""
    h = torch.relu(model[0](x, lora_batch))
    return model[2](h, lora_batch)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_threads_never_see_a_slot_mid_reload_and_nothing_leaks(device):
    model = base_mlp(device)
    pool = AdapterPool(model, ["0", "2"], num_slots=3, max_rank=8)
    x_all = torch.randn(8, K, generator=torch.Generator().manual_seed(1))
    hist = History(x_all.double())
    for n in NAMES:
        pool.register(n, *hist.add(n))
    def run_batch(names, rows):
        # A function, so its tensors are freed on return (the memory check below counts them).
        with torch.no_grad(), pool.batch(names) as b:
            return forward(model, x_all[rows].to(device), b.lora_batch).cpu()

    # Warm-up with every batch shape used below: slots written once, kernels compiled, and any
    # per-shape caches (plans, workspaces) filled before device memory is measured.
    for n in NAMES[:3]:
        run_batch([n, None, n], [0, 1, 2])
    run_batch([NAMES[0]] * len(x_all), list(range(len(x_all))))
    if device == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    mem0 = torch.cuda.memory_allocated() if device == "cuda" else None

    deadline = time.monotonic() + SECONDS[device]
    errors, stats = [], {"batches": 0, "loads": 0, "versions": 0, "unloads": 0, "busy": 0}
    stats_lock = threading.Lock()

    def bump(key):
        with stats_lock:
            stats[key] += 1

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
        return run

    def batcher(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            rows = rng.sample(range(len(x_all)), 3)
            names = [rng.choice(NAMES + [None]) for _ in rows]
            try:
                b = pool.batch(names, timeout=1.0)
            except (PoolBusyError, KeyError):  # all slots pinned / name unloaded right now
                bump("busy")
                continue
            try:
                with torch.no_grad():
                    y = forward(model, x_all[rows].to(device), b.lora_batch).cpu()
            finally:
                b.release()
            for i, (row, name) in enumerate(zip(rows, names)):
                wants = [hist.base] if name is None else hist.candidates(name)
                errs = [rel_err(y[i], w[row]) for w in wants]
                assert min(errs) <= tol(torch.float32, device), (
                    f"sample {i} ({name}) matches no version: rel errs {errs}")
            bump("batches")

    def loader():
        rng = random.Random(7)
        while time.monotonic() < deadline:
            try:
                pool.load(rng.choice(NAMES), timeout=0.5)
                bump("loads")
            except (PoolBusyError, KeyError):
                bump("busy")

    def churn():
        rng = random.Random(11)
        while time.monotonic() < deadline:
            name = rng.choice(NAMES)
            if rng.random() < 0.2:
                try:
                    pool.unload(name)
                    bump("unloads")
                except (PoolBusyError, KeyError):
                    bump("busy")
            pool.register(name, *hist.add(name))  # a new version (or back after an unload)
            bump("versions")
            time.sleep(0.002)

    threads = [threading.Thread(target=guarded(f), daemon=True)
               for f in (lambda: batcher(1), lambda: batcher(2), loader, churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS[device] + 60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]
    print("stress stats:", stats)
    assert stats["batches"] >= 5 and stats["versions"] >= 5, stats

    # Nothing leaked: pins, loading slots, outstanding id tensors, events, device memory.
    slots = pool._slots
    assert all(s.pins == 0 for s in slots), [(s.index, s.name, s.pins) for s in slots]
    assert not any(s.state == "loading" for s in slots)
    assert not pool._outstanding
    assert all(len(s.events) <= 4 for s in slots)
    assert set(pool.resident()) <= set(pool.registered())
    # Every resident adapter still computes its newest version (no slot left half-written).
    for name in pool.resident():
        y = run_batch([name] * len(x_all), list(range(len(x_all))))
        assert rel_err(y, hist.candidates(name)[-1]) <= tol(torch.float32, device)
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        assert torch.cuda.memory_allocated() == mem0, "device memory grew"


def test_with_form_batches_nest():
    """An inner ``with pool.batch()`` must hand the layers back to the outer batch on exit
    (it used to clear them: the outer forward silently ran base-only)."""
    model = base_mlp("cpu")
    pool = AdapterPool(model, ["0", "2"], num_slots=2, max_rank=8)
    hist = History(torch.randn(2, K).double())
    for n in NAMES[:2]:
        pool.load(n, *hist.add(n))
    x = hist.x64.float()
    with torch.no_grad(), pool.batch([NAMES[0]] * 2):
        with pool.batch([NAMES[1]] * 2):
            pass
        y = model(x)
    assert rel_err(y, hist.candidates(NAMES[0])[-1]) <= 1e-5
