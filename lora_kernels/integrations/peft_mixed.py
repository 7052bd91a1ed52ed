"""PEFT's mixed-adapter batches (``model(..., adapter_names=[...])``) on ``multi_lora_linear``.

Two caches make this cheap:

* the **batch** (slot per token, as a ``LoRABatch``) depends only on the names and the sequence
  length, so it is built once per forward: PEFT hands the same list to every LoRA layer through
  its pre-forward hooks, and every layer after the first finds it in the cache;
* each layer's **stack** of adapters (``lora_a [S, R, K]``, ``lora_b [S, N, R]``, scalings, ranks)
  is kept between forwards and rebuilt only when a factor changes (tracked by the tensors'
  identity, storage and ``_version`` counters, which every in-place update bumps). The same
  :class:`StackCache` keeps the side-by-side factors of several *active* adapters (no
  ``adapter_names``) for :mod:`lora_kernels.integrations.peft`.

When autograd could reach PEFT's parameters the stack is built differentiably on every call
instead (``torch.stack`` of the live parameters), so gradients land in PEFT's own ``lora_A`` /
``lora_B`` weights; a cached copy would silently cut them off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_kernels.ops import LoRABatch

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class BatchCache:
    """``LoRABatch`` per ``(names, tokens per sample, device)``; a few entries, newest last.

    Keyed on the names' *contents* (a tuple), not on the list's id: an id can be reused by a
    new list after the old one is freed, contents cannot lie.
    """

    def __init__(self, size: int = 4):
        self._size = size
        self._entries: "OrderedDict[tuple, tuple[tuple[str, ...], LoRABatch]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapter_names: Sequence[str], tokens_per_sample: int,
            device: torch.device) -> tuple[tuple[str, ...], LoRABatch]:
        """``(slot_names, batch)``: slot ``i`` holds ``slot_names[i]``; ``__base__`` → ``-1``.

        No host sync: the names are host data, so the batch is built on the host and uploaded
        without blocking (``LoRABatch.from_host_ids``). Under ``torch.compile`` the cache is
        bypassed and the batch is built by traceable device ops (a bounded batch), so a
        mixed-batch forward compiles with ``fullgraph=True``."""
        names = tuple(adapter_names)
        # Sorted, so a layer's stack cache is shared by every batch that uses the same adapters.
        slot_names = tuple(sorted({n for n in names if n != BASE}))
        if torch.compiler.is_compiling():
            index = {n: i for i, n in enumerate(slot_names)}
            sample_ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64,
                                      device=device)
            token_ids = sample_ids.repeat_interleave(int(tokens_per_sample))
            return slot_names, LoRABatch.from_device_ids(token_ids, len(slot_names))
        # Tensors made under inference_mode cannot be saved for a later backward: keep apart.
        key = (names, int(tokens_per_sample), str(device), torch.is_inference_mode_enabled())
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        index = {n: i for i, n in enumerate(slot_names)}
        sample_ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64)
        batch = LoRABatch.from_host_ids(sample_ids.repeat_interleave(int(tokens_per_sample)),
                                        len(slot_names), device)
        with self._lock:
            self._entries[key] = (slot_names, batch)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return slot_names, batch

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # A lock cannot be copied or pickled, and the entries are only a cache: a copy (deepcopy of
    # a patched model, torch.save) starts empty with a lock of its own.
    def __getstate__(self) -> dict:
        return {"size": self._size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])


def _fingerprint(layer, slot_names: Sequence[str]) -> tuple:
    out = []
    for name in slot_names:
        if name not in layer.lora_A:
            out.append(None)
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        out.append((id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version,
                    float(layer.scaling[name])))
    return tuple(out)


def stack_factors(layer, slot_names: Sequence[str], dtype: torch.dtype, device: torch.device
                  ) -> tuple[Tensor, Tensor]:
    """``(lora_a [S, R, K], lora_b [S, N, R])``: one PEFT layer's factors of ``slot_names`` in
    ``dtype``, zero-padded to the largest rank among them (all zeros for an adapter the layer
    does not have). Differentiable in ``lora_A``/``lora_B`` (``F.pad`` + ``torch.stack``)."""
    present = [n for n in slot_names if n in layer.lora_A]
    R = max((layer.lora_A[n].weight.shape[0] for n in present), default=1)
    K, N = layer.in_features, layer.out_features
    a_rows, b_rows = [], []
    for name in slot_names:
        if name not in layer.lora_A:
            a_rows.append(torch.zeros(R, K, dtype=dtype, device=device))
            b_rows.append(torch.zeros(N, R, dtype=dtype, device=device))
            continue
        a = layer.lora_A[name].weight.to(dtype)
        b = layer.lora_B[name].weight.to(dtype)
        r = a.shape[0]
        a_rows.append(F.pad(a, (0, 0, 0, R - r)))
        b_rows.append(F.pad(b, (0, R - r)))
    return torch.stack(a_rows), torch.stack(b_rows)


def build_stack(layer, slot_names: Sequence[str], dtype: torch.dtype, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lora_a [S, R, K], lora_b [S, N, R], scalings [S] f32, ranks [S] i32)`` for the adapters
    ``slot_names`` of one PEFT layer, zero-padded to the largest rank among them. An adapter this
    layer does not have gets rank 0 (PEFT: such samples see the base layer only).

    Differentiable in the layer's ``lora_A``/``lora_B`` weights (``F.pad`` + ``torch.stack``).
    """
    lora_a, lora_b = stack_factors(layer, slot_names, dtype, device)
    scalings = [float(layer.scaling[n]) if n in layer.lora_A else 0.0 for n in slot_names]
    ranks = [layer.lora_A[n].weight.shape[0] if n in layer.lora_A else 0 for n in slot_names]
    return (lora_a, lora_b, torch.tensor(scalings, dtype=torch.float32, device=device),
            torch.tensor(ranks, dtype=torch.int32, device=device))


class StackCache:
    """One layer's last ``build(layer, names, dtype, device)`` (by default :func:`build_stack`),
    reused while the fingerprint of its factors is unchanged. Only for forwards autograd does not
    reach the factors (:func:`needs_grad` False): the cached tensors are built under no_grad."""

    __slots__ = ("build", "key", "tensors")

    def __init__(self, build=build_stack):
        self.build = build
        self.key: Optional[tuple] = None
        self.tensors: Optional[tuple] = None

    def get(self, layer, slot_names: Sequence[str], dtype: torch.dtype, device: torch.device):
        if torch.compiler.is_compiling():
            # The fingerprint (data_ptr, _version) cannot be traced: the graph stacks the
            # factors itself (a copy of the used adapters per forward; AdapterPool keeps its
            # stacks resident instead).
            return self.build(layer, slot_names, dtype, device)
        key = (tuple(slot_names), dtype, str(device), torch.is_inference_mode_enabled(),
               _fingerprint(layer, slot_names))
        if self.key != key:
            with torch.no_grad():
                self.tensors = self.build(layer, slot_names, dtype, device)
            self.key = key
        return self.tensors

    def clear(self) -> None:
        self.key = self.tensors = None

    # Copies start empty: the cached tensors belong to the original's factors (the copy's would
    # never match the key anyway) and are not worth writing into a checkpoint.
    def __getstate__(self):
        return {"build": self.build}

    def __setstate__(self, state) -> None:
        self.__init__(state["build"])


def needs_grad(layer, slot_names: Sequence[str]) -> bool:
    """True when autograd would reach one of the factors used by this batch."""
    if not torch.is_grad_enabled():
        return False
    for name in slot_names:
        if name in layer.lora_A and (layer.lora_A[name].weight.requires_grad or
                                     layer.lora_B[name].weight.requires_grad):
            return True
    return False
