"""A token-level :class:`~lora_kernels.LoRABatch` in fixed device buffers, for engines that
capture CUDA graphs (SGLang's decode graphs, vLLM's cudagraphs).

A captured kernel keeps reading the tensors it was captured with, so the batch metadata must
live in buffers that are refreshed in place (device ops only, no host sync) rather than
rebuilt. Engines pad a batch of ``T`` real tokens to a captured size ``T_c ≥ T`` that the
refresh does not know, so the buffers are laid out to be valid for *every* ``T_c``:

* ``adapter_ids[:T_c]``: the real tokens' slots, ``-1`` for padding;
* ``sorted_token_ids`` (capacity ``C``): padding positions sort first in *descending* order,
  then the real ``-1`` tokens, then each slot's tokens. Its last ``T_c`` entries are therefore
  exactly a permutation of ``0 .. T_c-1`` (all real tokens plus padding ``T .. T_c-1``);
  :meth:`batch_for` hands out that suffix;
* ``seg_offsets``: one row per size ``T_c``, the full-buffer offsets shifted by ``C - T_c``.

Every slot counts as active (``num_active = S``; empty segments cost a program that exits)
and ``max_seg_len = T_c``, the only bounds known without reading the ids on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_kernels.ops import LoRABatch

__all__ = ["StaticLoRABatch"]


class StaticLoRABatch:
    def __init__(self, capacity: int, num_slots: int, device):
        if capacity < 0 or num_slots < 0:
            raise ValueError(f"capacity and num_slots must be >= 0, got {capacity}, {num_slots}")
        self.capacity, self.num_slots = capacity, num_slots
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.full((capacity,), -1, **i32)
        self.sorted = torch.arange(capacity, **i32)
        self.offsets_full = torch.zeros(num_slots + 2, **i32)
        self.offset_rows = torch.zeros(capacity + 1, num_slots + 2, **i32)
        self._shifts = (capacity - torch.arange(capacity + 1, **i32))[:, None]
        self._pad_key = -2 - torch.arange(capacity, dtype=torch.int64, device=device)
        self._pos = torch.arange(capacity, **i32)
        self._ones = torch.ones(capacity, **i32)
        self.active = torch.arange(num_slots, **i32)
        self.num_real = 0
        self._views: dict = {}
        self.refresh(self.ids[:0])

    def refresh(self, token_slots: Tensor) -> None:
        """Write a new batch: ``token_slots [T]`` (device ints, ``-1`` = no adapter, values in
        ``[-1, num_slots)``: not checked, a check would sync)."""
        T = token_slots.shape[0]
        if T > self.capacity:
            raise ValueError(f"batch has {T} tokens, more than the capacity {self.capacity}")
        C = self.capacity
        self.ids[:T].copy_(token_slots, non_blocking=True)
        self.ids[T:].fill_(-1)
        key = torch.where(self._pos < T, self.ids.to(torch.int64), self._pad_key)
        self.sorted.copy_(torch.argsort(key, stable=True))
        counts = torch.zeros(self.num_slots + 1, dtype=torch.int32, device=self.ids.device)
        counts.scatter_add_(0, (self.ids[:T] + 1).long(), self._ones[:T])
        counts[0] += C - T
        torch.cumsum(counts, 0, out=self.offsets_full[1:])
        torch.clamp(self.offsets_full[None, :] - self._shifts, min=0, out=self.offset_rows)
        self.num_real = T

    def batch_for(self, T: int) -> LoRABatch:
        """The batch seen by a forward over ``T`` rows (``num_real ≤ T ≤ capacity``)."""
        if not self.num_real <= T <= self.capacity:
            raise ValueError(f"T={T} rows, but the static batch holds {self.num_real} real "
                             f"tokens and at most {self.capacity}")
        hit = self._views.get(T)
        if hit is None:
            hit = self._views[T] = LoRABatch(
                adapter_ids=self.ids[:T], sorted_token_ids=self.sorted[self.capacity - T:],
                seg_offsets=self.offset_rows[T], active_slots=self.active,
                num_slots=self.num_slots, num_active=self.num_slots if T else 0,
                max_seg_len=T)
        return hit
