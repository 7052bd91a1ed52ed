"""Per-batch metadata for heterogeneous multi-adapter batches, built once, read by every layer."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LoRABatch:
    """Which adapter slot each token uses, sorted into segments.

    Built once per forward (one small device→host copy, here and nowhere else) and passed to
    every LoRA layer, so a layer's forward never syncs with the host and can be captured in a
    CUDA graph.

    Device tensors (int32, on ``adapter_ids.device``):
      * ``adapter_ids [T]`` — slot per token, ``-1`` = base model only;
      * ``sorted_token_ids [T]`` — token indices stably sorted by slot, ``-1`` tokens first;
      * ``seg_offsets [S+2]`` — tokens of slot ``i`` are ``sorted_token_ids[seg_offsets[i+1]:
        seg_offsets[i+2]]``; the ``-1`` tokens are ``sorted_token_ids[:seg_offsets[1]]``;
      * ``active_slots [A]`` — slots with at least one token, ascending.

    Host ints: ``num_tokens``, ``num_slots``, ``num_active``, ``max_seg_len`` (longest slot
    segment) and ``has_lora`` (False: the whole batch is base-model only, LoRA work is skipped).
    """

    adapter_ids: Tensor
    sorted_token_ids: Tensor
    seg_offsets: Tensor
    active_slots: Tensor
    num_slots: int
    num_active: int
    max_seg_len: int
    _host_offsets: Optional[tuple] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.shape[0]

    @property
    def has_lora(self) -> bool:
        return self.num_active > 0

    @property
    def device(self) -> torch.device:
        return self.adapter_ids.device

    @classmethod
    def from_adapter_ids(cls, adapter_ids, num_slots: int) -> "LoRABatch":
        """``adapter_ids [T]`` ints in ``[-1, num_slots)`` (tensor, list or tuple)."""
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise TypeError(f"num_slots must be a non-negative int, got {num_slots!r}")
        if not isinstance(adapter_ids, Tensor):
            try:
                # No dtype= here: as_tensor would truncate [0.5, 1] to [0, 1]; floats must fail
                # the dtype check below instead.
                items = list(adapter_ids)
                adapter_ids = torch.as_tensor(items) if items else torch.empty(0, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"adapter_ids must be a 1-D integer tensor or a list of ints: {exc}")
        if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or \
                adapter_ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor, got dtype {adapter_ids.dtype}")
        if adapter_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D [T], got shape {list(adapter_ids.shape)}")
        ids64 = adapter_ids.to(torch.int64)
        T = ids64.shape[0]
        # counts[0] counts the -1 tokens; out-of-range ids are caught from min/max below.
        clamped = ids64.clamp(-1, max(num_slots - 1, -1)) + 1
        counts = torch.bincount(clamped, minlength=num_slots + 1)
        lo_hi = torch.stack([ids64.min(), ids64.max()]) if T else ids64.new_tensor([-1, -1])
        host = torch.cat([lo_hi, counts]).tolist()  # the one host sync of a batch
        lo, hi, host_counts = host[0], host[1], host[2:]
        if lo < -1 or hi >= num_slots:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_ids must lie in [-1, num_slots={num_slots}), found {bad}")
        offsets = [0]
        for c in host_counts:
            offsets.append(offsets[-1] + c)
        active = [i for i, c in enumerate(host_counts[1:]) if c > 0]
        dev = adapter_ids.device
        return cls(
            adapter_ids=ids64.to(torch.int32),
            sorted_token_ids=torch.argsort(ids64, stable=True).to(torch.int32),
            seg_offsets=torch.tensor(offsets, dtype=torch.int32, device=dev),
            active_slots=torch.tensor(active, dtype=torch.int32, device=dev),
            num_slots=num_slots,
            num_active=len(active),
            max_seg_len=max(host_counts[1:], default=0),
            _host_offsets=tuple(offsets),
        )

    @classmethod
    def from_sample_ids(cls, sample_ids, tokens_per_sample: int, num_slots: int) -> "LoRABatch":
        """One slot per sample (PEFT ``adapter_names=`` style) for ``[B, L, ...]`` inputs."""
        ids = sample_ids if isinstance(sample_ids, Tensor) else torch.as_tensor(list(sample_ids))
        if ids.dim() != 1:
            raise ValueError(f"sample_ids must be 1-D [B], got shape {list(ids.shape)}")
        try:  # 2.5 or "3" is a mistake, not a count to truncate
            if isinstance(tokens_per_sample, bool):
                raise TypeError
            tokens_per_sample = operator.index(tokens_per_sample)
        except TypeError:
            raise TypeError(f"tokens_per_sample must be an int, got "
                            f"{type(tokens_per_sample).__name__}") from None
        if tokens_per_sample < 0:
            raise ValueError(f"tokens_per_sample must be >= 0, got {tokens_per_sample}")
        return cls.from_adapter_ids(ids.repeat_interleave(tokens_per_sample), num_slots)

    # ---- used by the ops layer to pass the batch through a custom op and back -------------
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.adapter_ids, self.sorted_token_ids, self.seg_offsets, self.active_slots

    def host_ints(self) -> list[int]:
        return [self.num_slots, self.num_active, self.max_seg_len]

    @classmethod
    def from_parts(cls, adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                   host_ints) -> "LoRABatch":
        num_slots, num_active, max_seg_len = (int(v) for v in host_ints)
        return cls(adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                   num_slots, num_active, max_seg_len)

    def host_offsets(self) -> tuple:
        """``seg_offsets`` as Python ints (free for CPU batches; a sync for CUDA ones — only the
        torch backend asks)."""
        if self._host_offsets is not None:
            return self._host_offsets
        return tuple(self.seg_offsets.tolist())

    def groups(self) -> list[tuple[int, Tensor]]:
        """``(slot, token_indices int64)`` for each active slot, for the grouped torch kernels."""
        off = self.host_offsets()
        order = self.sorted_token_ids.to(torch.int64)
        return [(slot, order[off[slot + 1]:off[slot + 2]])
                for slot in range(self.num_slots) if off[slot + 2] > off[slot + 1]]

    def contiguous_runs(self, max_runs: int) -> Optional[list[tuple[int, int, int]]]:
        """``(slot, start, end)`` for each maximal run of equal non-negative ids in token order,
        or None if there are more than ``max_runs`` runs. Per-sample adapters (PEFT's
        ``adapter_names=``) give one run per sample, so the torch backend can work on views of
        x and y instead of gathering. Host-side: free for CPU batches."""
        ids = self.adapter_ids
        if ids.numel() == 0:
            return []
        starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
        if starts.numel() + 1 > max_runs:
            return None
        bounds = [0] + starts.tolist() + [ids.numel()]
        slots = ids[torch.tensor(bounds[:-1], device=ids.device)].tolist()
        return [(s, a, b) for s, a, b in zip(slots, bounds[:-1], bounds[1:]) if s >= 0]

    def to(self, device) -> "LoRABatch":
        return LoRABatch(*(t.to(device) for t in self.tensors()), self.num_slots,
                         self.num_active, self.max_seg_len, self._host_offsets)
