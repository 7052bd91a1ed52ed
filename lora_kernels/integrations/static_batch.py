"""A token-level :class:`~lora_kernels.LoRABatch` in fixed device buffers, for engines that
capture CUDA graphs (SGLang's decode graphs, vLLM's cudagraphs).

A captured kernel keeps reading the tensors it was captured with, so the batch metadata must
live in buffers that are refreshed in place (device ops only, no host sync) rather than
rebuilt. Engines pad a batch of ``T`` real tokens to a captured size ``T_c ≥ T`` that the
refresh does not know, so the buffers are laid out to be valid for *every* ``T_c``.

*Why one buffer for every size, not one* ``LoRABatch.static`` *per captured size*: SGLang
refreshes the batch in ``prepare_lora_batch`` with the *real* batch size, outside the graph,
and then replays the graph of the padded size its runner picked (``bisect`` over its capture
sizes, not visible to the backend). One static batch per size would have to refresh every
captured size's buffers each step (~20 launches × dozens of sizes); here one refresh serves all.

The storage is one :meth:`LoRABatch.static` batch of capacity ``C`` (so there is one in-place
refresh, :meth:`LoRABatch.refresh_`), refreshed with ``padding_first=True``:

* ``adapter_ids[:T_c]``: the real tokens' slots, ``-1`` for padding;
* ``sorted_token_ids``: padding positions sort first in *descending* order, then the real
  ``-1`` tokens, then each slot's tokens. Its last ``T_c`` entries are therefore exactly a
  permutation of ``0 .. T_c-1`` (all real tokens plus padding ``T .. T_c-1``);
  :meth:`batch_for` hands out that suffix;
* ``seg_offsets``: one row per size ``T_c``, the full-buffer offsets shifted by ``C - T_c``;
* ``tile_map``: one buffer per view handed out, the full batch's tile rows shifted by
  ``C - T_c``, rewritten for every cached view on each refresh (the slot segments lie wholly
  in the suffix, so a view's tiles are the full batch's tiles, and the first
  ``tile_capacity(T_c, S)`` rows hold them all);
* ``active_slots``: the full batch's (ascending, ``-1`` padded), its first ``min(S, T_c)``.

The views are *bounded* batches: ``num_active = min(S, T_c)`` and ``max_seg_len = T_c`` are
upper bounds (the only ones known without reading the ids on the host), so kernels size their
grids from them and exit early on the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_kernels.ops import LoRABatch
from lora_kernels.ops.batch import tile_capacity

__all__ = ["StaticLoRABatch"]


class StaticLoRABatch:
    def __init__(self, capacity: int, num_slots: int, device):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be an int >= 0, got {num_slots!r}")
        self.capacity, self.num_slots = capacity, num_slots
        self.full = LoRABatch.static(capacity, num_slots, device)
        i32 = dict(dtype=torch.int32, device=self.full.device)
        self.offset_rows = torch.zeros(capacity + 1, num_slots + 2, **i32)
        self._shifts = (capacity - torch.arange(capacity + 1, **i32))[:, None]
        # [P, 4] int32: 1 in the position columns of the full tile map's real rows, else 0.
        self._tile_shift = torch.zeros_like(self.full.tile_map)
        self._pos_cols = torch.tensor([0, 1, 1, 0], **i32)
        self.num_real = 0
        self._views: dict = {}
        # Per cached view: its tile map, the full batch's rows and shift mask it is computed
        # from, and -(C - T_c).
        self._tiles: list = []
        self._full_rows: list = []
        self._shift_rows: list = []
        self._alphas: list = []
        self.refresh(self.full.adapter_ids[:0])

    @property
    def ids(self) -> Tensor:
        return self.full.adapter_ids

    def refresh(self, token_slots: Tensor) -> None:
        """Write a new batch: ``token_slots [T]`` (device ints, ``-1`` = no adapter). Device ops
        only, no host sync; ids outside ``[-1, num_slots)`` are served as base-only
        (``self.full.check()`` raises for them, at the cost of a sync)."""
        if not isinstance(token_slots, Tensor) or token_slots.dim() != 1:
            raise ValueError("token_slots must be a 1-D tensor of slot ids")
        T = token_slots.shape[0]
        if T > self.capacity:
            raise ValueError(f"batch has {T} tokens, more than the capacity {self.capacity}")
        self.full.refresh_(token_slots, padding_first=True)
        torch.clamp(self.full.seg_offsets[None, :] - self._shifts, min=0, out=self.offset_rows)
        torch.mul((self.full.tile_map[:, :1] >= 0).to(torch.int32), self._pos_cols,
                  out=self._tile_shift)
        if self._tiles:
            # Every cached view at once: SGLang caches one view per batch size it has seen
            # (up to its max graph batch), and a launch per view and decode step would cost
            # ~1 ms of host time; the foreach ops take the lists in a few launches.
            torch._foreach_copy_(self._tiles, self._full_rows)
            torch._foreach_add_(self._tiles, torch._foreach_mul(self._shift_rows, self._alphas))
        self.num_real = T

    def _shift_tiles(self, Tc: int, out: Tensor) -> None:
        """``out = full tile rows - (C - T_c)`` on the position columns of real rows."""
        rows = out.shape[0]
        torch.add(self.full.tile_map[:rows], self._tile_shift[:rows],
                  alpha=Tc - self.capacity, out=out)
        # Refreshed with the others from now on (refresh()).
        self._tiles.append(out)
        self._full_rows.append(self.full.tile_map[:rows])
        self._shift_rows.append(self._tile_shift[:rows])
        self._alphas.append(Tc - self.capacity)

    def batch_for(self, T: int) -> LoRABatch:
        """The batch seen by a forward over ``T`` rows (``num_real ≤ T ≤ capacity``): a cached
        view, so a graph captured reading it keeps reading valid metadata after refreshes."""
        if not self.num_real <= T <= self.capacity:
            raise ValueError(f"T={T} rows, but the static batch holds {self.num_real} real "
                             f"tokens and at most {self.capacity}")
        hit = self._views.get(T)
        if hit is None:
            S, f = self.num_slots, self.full
            tiles = torch.empty(tile_capacity(T, S), 4, dtype=torch.int32, device=f.device)
            self._shift_tiles(T, tiles)
            hit = self._views[T] = LoRABatch(
                adapter_ids=f.adapter_ids[:T],
                sorted_token_ids=f.sorted_token_ids[self.capacity - T:],
                seg_offsets=self.offset_rows[T], active_slots=f.active_slots[:min(S, T)],
                num_slots=S, num_active=min(S, T), max_seg_len=T, bounded=True,
                tile_map=tiles)
        return hit
