"""``AdapterPool``: many LoRA adapters served from a fixed number of device slots of one model.

Life of an adapter: ``register`` (read, validate against the pool's layers, keep a host copy -
pinned when the pool is on a GPU) → ``load`` (copy into a free or least-recently-used slot) →
used by batches (``batch_ids`` / ``with pool.batch(...)`` pin their slots) → evicted when its slot
is needed and nobody pins it (the host copy stays, so a later batch reloads it on demand).

Invariants:
* validation happens before any slot is touched: a bad adapter raises and the pool is unchanged;
* a slot pinned by an in-flight batch is never overwritten - not by eviction, not by reloading
  the same name with new weights (the new version goes to another slot and the old one is
  retired once released). On a GPU "released" also means the batch's kernels have finished:
  releasing records an event on the current stream and the upload waits for it;
* uploads run on a side CUDA stream from pinned memory (``non_blocking``) and are synchronised
  before the slot is marked ready, so a forward never sees a half-written adapter;
* one lock guards the bookkeeping; it is not held during the copy itself.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lora_kernels.adapters.peft_format import (AdapterConfig, AdapterMismatchError, PathLike,
                                               config_problems, load_peft_adapter, split_modules)
from lora_kernels.nn.inject import is_linear, set_child, matches_targets
from lora_kernels.nn.fp8_linear import FP8Linear
from lora_kernels.nn.multi_lora import MultiLoRALinear, is_linear4bit
from lora_kernels.ops import LoRABatch

BASE_NAMES = (None, "__base__")


class PoolBusyError(RuntimeError):
    """Every slot the pool could use is pinned by an in-flight batch."""


class _WouldWait(Exception):
    """Internal: acquiring would block while the caller already holds pins."""


@dataclass
class _HostAdapter:
    """A validated adapter on the host: per pool layer ``(lora_a, lora_b, scaling)``."""

    name: str
    version: int
    layers: dict
    config: AdapterConfig
    max_rank: int


@dataclass
class _Slot:
    index: int
    name: Optional[str] = None       # adapter resident (or being loaded) here
    version: int = -1
    state: str = "free"              # free | loading | ready | retired
    pins: int = 0
    last_used: int = 0
    events: list = field(default_factory=list)  # CUDA events of released batches


class PoolBatch:
    """A batch's view of the pool: ``ids`` (slot per sample, ``-1`` = base), ``token_ids`` and
    ``lora_batch`` (per token), with its slots pinned until :meth:`release`.

    As a context manager it also installs ``lora_batch`` on the pool's layers (and puts back
    whatever was there on exit, so ``with`` blocks nest). The layers are shared module state:
    two threads cannot each have a ``with`` batch on one model at the same time (the second
    raises) - threads that run forwards concurrently pass ``batch.lora_batch`` to the layers
    themselves.
    """

    def __init__(self, pool: "AdapterPool", names, ids: Tensor, token_ids: Tensor, slots: list,
                 tokens_per_sample=None, lora_batch: Optional[LoRABatch] = None):
        self.pool, self.names, self.ids, self.token_ids = pool, tuple(names), ids, token_ids
        self.tokens_per_sample = tokens_per_sample  # int, or a tensor of per-sample lengths
        self._slots = slots
        self.lora_batch = lora_batch if lora_batch is not None else \
            LoRABatch.from_adapter_ids(token_ids, pool.num_slots)
        self.released = False
        self._previous: Optional[dict] = None

    def input_mismatch(self, x: Tensor) -> Optional[str]:
        """None if a layer input ``x [batch, ..., features]`` has the tokens this batch
        describes, else an error naming the argument of ``pool.batch`` that disagrees. Checked
        at every pool layer before its op, so the first layer reports it, in these words, not
        as a token count deep in the model."""
        T = self.lora_batch.num_tokens
        if x.dim() < 1 or math.prod(x.shape[:-1]) == T:
            return None
        n, tps = len(self.names), self.tokens_per_sample
        if isinstance(tps, int):
            said = f"{n} names x tokens_per_sample={tps} = {T} tokens"
        else:
            said = f"{n} names with tokens_per_sample summing to {T} tokens"
        why = []
        if x.dim() >= 3:  # [batch, seq, ..., features]: compare each count with its argument
            rows, per = x.shape[0], math.prod(x.shape[1:-1])
            if rows != n:
                why.append(f"the names list has {n} entries (one per sample) but the input has "
                           f"{rows} samples")
            if isinstance(tps, int) and per != tps:
                why.append(f"tokens_per_sample={tps} but each sample has {per} tokens")
        if not why:
            why.append("check the names list (one per sample) and tokens_per_sample")
        return (f"pool.batch(...) describes {said}, but a pool layer got input of shape "
                f"{list(x.shape)} ({math.prod(x.shape[:-1])} tokens): " + "; ".join(why))

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release_slots(self._slots)

    def __enter__(self) -> "PoolBatch":
        try:
            self._previous = self.pool._install(self)
        except BaseException:
            self.release()  # __exit__ will not run: do not leak the pins
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.pool._uninstall(self, self._previous)
        finally:
            self.release()


class AdapterPool:
    """``num_slots`` device slots of rank up to ``max_rank`` in every adapted layer of ``model``.

    ``target_modules`` (names or regex, PEFT's rule) picks the ``nn.Linear``/``Conv1D`` layers
    (and bitsandbytes NF4 ``Linear4bit`` ones: served from their 4-bit storage) to swap for
    :class:`MultiLoRALinear` (in place, sharing the frozen weights); with
    ``target_modules=None`` the model's existing ``MultiLoRALinear`` layers are used (built
    over any base it takes, an FP8 ``FP8Weight`` included).
    Thread-safe. Typical use::

        pool = AdapterPool(model, ["c_attn", "c_proj"], num_slots=8, max_rank=16)
        pool.load("sql", "adapters/sql")                 # a PEFT adapter directory
        with pool.batch(["sql", None, "chat"], tokens_per_sample=L):
            logits = model(input_ids).logits              # each sample through its adapter
    """

    def __init__(self, model: nn.Module, target_modules=None, *, num_slots: Optional[int] = None,
                 max_rank: Optional[int] = None, backend: str = "auto",
                 dtype: Optional[torch.dtype] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if target_modules is None:
            self.layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
            if not self.layers:
                raise ValueError("the model has no MultiLoRALinear layers; pass target_modules= to "
                                 "create them")
            shapes = {(m.num_slots, m.max_rank) for m in self.layers.values()}
            if len(shapes) != 1:
                raise ValueError(f"the model's MultiLoRALinear layers disagree on (num_slots, "
                                 f"max_rank): {sorted(shapes)}")
            ns, mr = shapes.pop()
            if (num_slots not in (None, ns)) or (max_rank not in (None, mr)):
                raise ValueError(f"the model's layers have num_slots={ns}, max_rank={mr}; got "
                                 f"num_slots={num_slots}, max_rank={max_rank}")
            num_slots, max_rank = ns, mr
        else:
            for nm, v in (("num_slots", num_slots), ("max_rank", max_rank)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{nm} must be a positive int, got {v!r}")
            matched = [(n, m) for n, m in model.named_modules()
                       if n and matches_targets(n, target_modules)
                       and (is_linear(m) or is_linear4bit(m) or isinstance(m, FP8Linear))]
            if not matched:
                raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear/Conv1D "
                                 f"(or bitsandbytes Linear4bit, or FP8Linear) in the model")
            # Build every layer before swapping any in: a rejected argument leaves the model as
            # it was.
            self.layers = {n: MultiLoRALinear(m, num_slots, max_rank, backend=backend, dtype=dtype)
                           for n, m in matched}
            for n, layer in self.layers.items():
                set_child(model, n, layer)
        self.num_slots, self.max_rank = num_slots, max_rank
        first = next(iter(self.layers.values()))
        self.device = first.lora_A.device
        # A plain Lock (not RLock): _acquire drops it around the upload, which must really
        # release it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots = [_Slot(i) for i in range(num_slots)]
        self._host: dict[str, _HostAdapter] = {}
        self._clock = itertools.count(1)
        self._versions = itertools.count(1)
        self._outstanding: dict[int, tuple[Tensor, list]] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # ``with pool.batch(...)`` installs batches on the shared layers: one thread at a time
        self._installed: list = []  # stack of (thread id, PoolBatch)
        # Batches waiting for slots go before new loads, or a busy loader could starve them.
        self._batch_waiters = 0

    # ---- registration (host side, validation) ------------------------------------------
    def _parse(self, name, source, config) -> _HostAdapter:
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"adapter name must be a non-empty string other than '__base__', "
                             f"got {name!r}")
        cfg: Optional[AdapterConfig] = None
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            cfg, sd = load_peft_adapter(source)
            what = f"adapter {name!r} ({source})"
        elif isinstance(source, Mapping):
            if config is not None:
                cfg = config if isinstance(config, AdapterConfig) else \
                    AdapterConfig.from_dict(config)
            sd, what = source, f"adapter {name!r}"
        else:
            raise TypeError(f"source must be a PEFT adapter directory or a state dict, got "
                            f"{type(source).__name__}")
        modules = split_modules(sd, source=what)
        # Without a config there is nothing to check ranks against; scaling is 1 (alpha = r).
        problems = [] if cfg is None else config_problems(cfg, modules)
        layers = {}
        for module, (a, b) in modules.items():
            layer = self._layer_for(module)
            if layer is None:
                problems.append(f"unknown target module {module!r}: the pool adapts "
                                f"{self._layer_summary()}")
                continue
            r = a.shape[0]
            if r > self.max_rank:
                problems.append(f"module {module!r}: rank {r} exceeds the pool's max_rank="
                                f"{self.max_rank}")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                problems.append(f"module {module!r} is [in={layer.in_features}, "
                                f"out={layer.out_features}] but the adapter has lora_A "
                                f"{list(a.shape)} and lora_B {list(b.shape)}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                problems.append(f"module {module!r}: the adapter holds NaN or infinite values")
            scaling = 1.0 if cfg is None else cfg.scaling_for(module, r)
            layers[module] = (a, b, scaling)
        if problems:
            raise AdapterMismatchError(problems, what=what)
        host = {}
        for module, (a, b, s) in layers.items():
            layer = self._layer_for(module)
            host[module] = (self._stage(a, layer), self._stage(b, layer), s)
        return _HostAdapter(name, 0, host, cfg or AdapterConfig(),
                            max(a.shape[0] for a, _, _ in layers.values()))

    def _layer_for(self, module: str) -> Optional[MultiLoRALinear]:
        for p in (module, module.split("base_model.model.", 1)[-1]):
            if p in self.layers:
                return self.layers[p]
        return None

    def _layer_summary(self) -> str:
        names = sorted(self.layers)
        more = f" ... ({len(names)} layers)" if len(names) > 4 else ""
        return str(names[:4])[:-1] + more + "]"

    def _stage(self, t: Tensor, layer: MultiLoRALinear) -> Tensor:
        # A private copy: the caller may change its state dict after registering it.
        t = t.detach().to(device="cpu", dtype=layer.lora_A.dtype, copy=True).contiguous()
        if self._stream is not None:  # pinned: the upload is a true async copy
            t = t.pin_memory()
        return t

    def register(self, name: str, source: Union[PathLike, Mapping[str, Tensor]],
                 config: Optional[Union[AdapterConfig, Mapping[str, Any]]] = None) -> None:
        """Validate ``source`` (a PEFT adapter directory, or a PEFT-keyed state dict with an
        optional ``config``; without one, scaling is 1) and keep its host copy under ``name``.
        Does not touch the device. Re-registering a name replaces its weights: the next batch
        that uses it loads the new version (batches in flight keep the old one)."""
        host = self._parse(name, source, config)
        with self._lock:
            host.version = next(self._versions)
            self._host[name] = host

    # ---- slots ---------------------------------------------------------------------------
    def _current_slot(self, name: str) -> Optional[_Slot]:
        host = self._host.get(name)
        for s in self._slots:
            if s.name == name and host is not None and s.version == host.version and \
                    s.state in ("ready", "loading"):
                return s
        return None

    def _victim(self) -> Optional[_Slot]:
        free = [s for s in self._slots if s.state == "free"]
        if free:
            return free[0]
        idle = [s for s in self._slots if s.state in ("ready", "retired") and s.pins == 0]
        return min(idle, key=lambda s: (s.state != "retired", s.last_used)) if idle else None

    def _acquire(self, name: str, deadline: Optional[float], may_wait: bool = True) -> _Slot:
        """Make ``name`` resident and pin its slot (lock held by the caller). With
        ``may_wait=False`` raise ``_WouldWait`` instead of blocking."""
        if name not in self._host:
            raise KeyError(f"adapter {name!r} is not registered; known: {sorted(self._host)}")
        while True:
            slot = self._current_slot(name)
            if slot is not None and slot.state == "ready":
                slot.pins += 1
                slot.last_used = next(self._clock)
                return slot
            if slot is not None:  # another thread is loading it: wait for that upload
                self._wait(deadline, f"adapter {name!r} is being loaded by another thread",
                           may_wait)
                continue
            victim = self._victim()
            if victim is None:
                self._wait(deadline, f"all {self.num_slots} slots are pinned by in-flight batches "
                                     f"(release a batch, or pass timeout= to wait)", may_wait)
                continue
            host = self._host[name]
            for s in self._slots:  # an older version of this name is now stale
                if s.name == name and s is not victim and s.state == "ready":
                    s.state = "retired"
            victim.name, victim.version, victim.state = name, host.version, "loading"
            events, victim.events = victim.events, []
            self._lock.release()
            try:
                self._upload(victim.index, host, events)
            except BaseException:
                self._lock.acquire()
                victim.name, victim.version, victim.state = None, -1, "free"
                self._clear_slot(victim.index)
                self._cond.notify_all()
                raise
            self._lock.acquire()
            victim.state = "ready"
            self._cond.notify_all()

    def _wait(self, deadline: Optional[float], why: str, may_wait: bool = True) -> None:
        if not may_wait:
            raise _WouldWait(why)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise PoolBusyError(why)
        self._cond.wait(remaining)

    def _clear_slot(self, index: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(index)

    def _upload(self, index: int, host: _HostAdapter, events: list) -> None:
        """Copy one adapter into slot ``index`` of every layer (lock not held; the slot is
        ``loading`` so no batch can reference it)."""
        stream = self._stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for ev in events:  # kernels of released batches that read this slot are done first
                stream.wait_event(ev)
            for module, layer in self.layers.items():
                entry = host.layers.get(module)
                if entry is None:
                    layer.clear_slot(index)  # rank 0: this adapter leaves the layer alone
                    continue
                a, b, scaling = entry
                a = a.to(layer.lora_A.device, non_blocking=True)
                b = b.to(layer.lora_B.device, non_blocking=True)
                if layer.n_slices > 1:  # one PEFT A serves every output slice of a packed layer
                    a = a.repeat(layer.n_slices, 1)
                layer.set_adapter(index, a, b, scaling)
        if stream is not None:
            stream.synchronize()

    def _release_slots(self, slots: list) -> None:
        event = None
        if self._stream is not None:
            # The batch's kernels may still be running: whoever overwrites these slots next
            # waits for this event on the upload stream.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._unpin_locked(slots, event)

    def _unpin_locked(self, slots: list, event=None) -> None:
        for s in slots:
            s.pins -= 1
            if event is not None:
                s.events.append(event)
                del s.events[:-4]  # bounded: a slot's releases mostly come from one stream
            if s.state == "retired" and s.pins == 0:
                s.name, s.version, s.state = None, -1, "free"
        self._cond.notify_all()

    # ---- public API -----------------------------------------------------------------------
    def load(self, name: str, source=None, config=None, *, timeout: Optional[float] = 0.0) -> int:
        """Register ``source`` under ``name`` (if given) and place it in a slot now; returns the
        slot. Evicts the least-recently-used unpinned adapter when full. If every slot is pinned:
        raise ``PoolBusyError`` (``timeout=0``), or wait up to ``timeout`` seconds (None:
        forever)."""
        host = self._parse(name, source, config) if source is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            previous = self._host.get(name)
            if host is not None:
                host.version = next(self._versions)
                self._host[name] = host
            try:
                while self._batch_waiters:
                    self._wait(deadline, "batches are waiting for slots (they go first)")
                slot = self._acquire(name, deadline)
            except BaseException:
                # A load that could not happen leaves the registry as it was, too.
                if host is not None and self._host.get(name) is host:
                    if previous is None:
                        del self._host[name]
                    else:
                        self._host[name] = previous
                raise
            self._unpin_locked([slot])
            return slot.index

    def batch(self, names: Sequence[Optional[str]],
              tokens_per_sample: Union[int, Sequence[int]] = 1, *,
              timeout: Optional[float] = 0.0) -> PoolBatch:
        """Pin the slots of ``names`` (one per sample; ``None``/``"__base__"`` = base model),
        loading registered adapters that are not resident. ``tokens_per_sample``: one length for
        every sample, or one per sample (ragged, packed rows). Use as ``with pool.batch(...)``."""
        names = _check_names(names)
        lengths = _check_lengths(tokens_per_sample, len(names))
        distinct = sorted({n for n in names if n not in BASE_NAMES})
        if len(distinct) > self.num_slots:
            raise ValueError(f"a batch uses {len(distinct)} distinct adapters but the pool has "
                             f"{self.num_slots} slots")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # All or nothing: never wait while holding some pins, or two batches that each
            # hold part of what they need would wait for each other forever.
            while True:
                pinned, index = [], {}
                try:
                    for n in distinct:
                        slot = self._acquire(n, deadline, may_wait=not pinned)
                        pinned.append(slot)
                        index[n] = slot.index
                    break
                except _WouldWait as busy:
                    self._unpin_locked(pinned)
                    self._batch_waiters += 1
                    try:
                        self._wait(deadline, str(busy))
                    finally:
                        self._batch_waiters -= 1
                except BaseException:
                    self._unpin_locked(pinned)
                    raise
        try:
            ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64)
            token_ids = ids.repeat_interleave(lengths)
            # The slots are host data: build the batch on the host and upload it without
            # waiting for the device (no sync between scheduling and the forward).
            lora_batch = LoRABatch.from_host_ids(token_ids, self.num_slots, self.device)
            return PoolBatch(self, names, ids.to(self.device, non_blocking=True),
                             token_ids.to(self.device, non_blocking=True), pinned, lengths,
                             lora_batch)
        except BaseException:
            self._release_slots(pinned)
            raise

    def _install(self, batch: PoolBatch) -> dict:
        me = threading.get_ident()
        with self._lock:
            other = [t for t, _ in self._installed if t != me]
            if other:
                raise RuntimeError("another thread has a `with pool.batch(...)` block open on this "
                                   "model; threads running forwards concurrently must pass "
                                   "batch.lora_batch to the layers explicitly")
            self._installed.append((me, batch))
        previous = {n: (layer.lora_batch, getattr(layer, "_explain_batch", None))
                    for n, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.set_lora_batch(batch.lora_batch, explain=batch.input_mismatch)
        return previous

    def _uninstall(self, batch: PoolBatch, previous: Optional[dict]) -> None:
        for n, layer in self.layers.items():
            if layer.lora_batch is batch.lora_batch:
                layer.set_lora_batch(*(previous.get(n, (None,)) if previous else (None,)))
        with self._lock:
            self._installed = [(t, b) for t, b in self._installed if b is not batch]

    def batch_ids(self, names: Sequence[Optional[str]],
                  tokens_per_sample: Union[int, Sequence[int]] = 1, *,
                  timeout: Optional[float] = 0.0) -> Tensor:
        """Per-token slot ids (``-1`` = base) for ``names``; the slots stay pinned until
        ``pool.release(ids)``. ``pool.batch(...)`` is the context-manager form."""
        b = self.batch(names, tokens_per_sample, timeout=timeout)
        with self._lock:
            self._outstanding[id(b.token_ids)] = (b.token_ids, b)
        return b.token_ids

    def release(self, ids: Tensor) -> None:
        with self._lock:
            entry = self._outstanding.pop(id(ids), None)
        if entry is None or entry[0] is not ids:
            raise ValueError("release() takes a tensor returned by batch_ids() that was not "
                             "released yet")
        entry[1].release()

    def unload(self, name: str) -> None:
        """Forget ``name`` (host copy and slot). Raises ``PoolBusyError`` if a batch pins it."""
        with self._lock:
            for s in self._slots:
                if s.name == name and (s.pins > 0 or s.state == "loading"):
                    raise PoolBusyError(f"adapter {name!r} is pinned by an in-flight batch or "
                                        f"being loaded")
            if self._host.pop(name, None) is None:
                raise KeyError(f"adapter {name!r} is not registered")
            for s in self._slots:
                if s.name == name:
                    s.name, s.version, s.state = None, -1, "free"
                    self._clear_slot(s.index)

    def resident(self) -> dict[str, int]:
        """``{name: slot}`` of the adapters currently usable without a load."""
        with self._lock:
            out = {}
            for s in self._slots:
                if s.state == "ready" and self._current_slot(s.name) is s:
                    out[s.name] = s.index
            return out

    def registered(self) -> list[str]:
        with self._lock:
            return sorted(self._host)

    def __contains__(self, name: str) -> bool:
        return name in self.resident()

    def __repr__(self) -> str:
        return (f"AdapterPool(layers={len(self.layers)}, num_slots={self.num_slots}, "
                f"max_rank={self.max_rank}, resident={self.resident()}, "
                f"registered={len(self._host)})")


def _check_names(names) -> list:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list with one adapter name (or None) per sample, got "
                        f"{type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must be strings or None, got {bad[0]!r}")
    return list(names)


def _check_lengths(tokens_per_sample, samples: int):
    """An int >= 0 or a tensor of ``samples`` ints >= 0, checked before any slot is pinned."""
    if isinstance(tokens_per_sample, bool):
        raise TypeError("tokens_per_sample must be an int or a sequence of ints, got a bool")
    if isinstance(tokens_per_sample, int):
        if tokens_per_sample < 0:
            raise ValueError(f"tokens_per_sample must be >= 0, got {tokens_per_sample}")
        return tokens_per_sample
    if isinstance(tokens_per_sample, (str, bytes)) or not isinstance(tokens_per_sample, Sequence):
        raise TypeError(f"tokens_per_sample must be an int or a sequence of ints, got "
                        f"{type(tokens_per_sample).__name__}")
    vals = list(tokens_per_sample)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
        raise TypeError(f"tokens_per_sample must hold ints, got {vals}")
    if len(vals) != samples:
        raise ValueError(f"tokens_per_sample has {len(vals)} lengths for {samples} samples")
    if any(v < 0 for v in vals):
        raise ValueError(f"tokens_per_sample must be >= 0, got {vals}")
    return torch.tensor(vals, dtype=torch.int64)
