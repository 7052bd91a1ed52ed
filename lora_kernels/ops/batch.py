"""Per-batch metadata for heterogeneous multi-adapter batches, built once, read by every layer.

Three ways to build one, all ending in the same tensors:

* :meth:`LoRABatch.from_adapter_ids` — ids already on the device: one small device→host copy
  (validates the ids and gives exact host ints), the way it always worked;
* :meth:`LoRABatch.from_host_ids` — ids the host already knows (a scheduler's list, PEFT's
  ``adapter_names``, ``AdapterPool.batch``): computed on the host, uploaded in one
  non-blocking copy, **no sync**; also traceable by ``torch.compile(fullgraph=True)``;
* :meth:`LoRABatch.static` + :meth:`LoRABatch.refresh_` — static-capacity device buffers
  refreshed **in place** from new ids by device ops only (no sync, capturable): one captured
  CUDA graph per token bucket then serves any adapter mix. Such a batch is *bounded*: its host
  ints are upper bounds (``num_active = min(S, T)``, ``max_seg_len = T``), so every launch is
  sized from them and the kernels exit early on the padding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

# Rows of one tile of ``tile_map``: the decode kernels' token tile (the tensor-core minimum M).
TILE_ROWS = 16


def tile_capacity(num_tokens: int, num_slots: int) -> int:
    """Most tiles any mix of ``num_tokens`` tokens over ``num_slots`` slots can need:
    ``Σ_i ceil(c_i / 16) ≤ ceil(T / 16) + min(S, T)``."""
    return -(-num_tokens // TILE_ROWS) + min(num_slots, num_tokens)


@dataclass(frozen=True, eq=False)
class LoRABatch:
    """Which adapter slot each token uses, sorted into segments.

    Device tensors (int32, on ``adapter_ids.device``):
      * ``adapter_ids [T]`` — slot per token, ``-1`` = base model only;
      * ``sorted_token_ids [T]`` — token indices stably sorted by slot, ``-1`` tokens first;
      * ``seg_offsets [S+2]`` — tokens of slot ``i`` are ``sorted_token_ids[seg_offsets[i+1]:
        seg_offsets[i+2]]``; the ``-1`` tokens are ``sorted_token_ids[:seg_offsets[1]]``;
      * ``active_slots [A]`` — slots with at least one token, ascending; a bounded batch pads
        it with ``-1`` to ``min(S, T)`` entries;
      * ``tile_map [P, 4]`` — one row per 16-token tile of one slot's segment: ``(slot,
        first sorted position, end position, 0)``; ``slot = -1`` rows are padding. A kernel
        program finds its work in one load instead of chasing active slot → offsets.

    Host ints: ``num_tokens``, ``num_slots``, ``num_active``, ``max_seg_len`` (longest slot
    segment), ``bounded`` (the two before are upper bounds, not exact) and ``has_lora`` (False:
    the whole batch is base-model only, LoRA work is skipped; always True when bounded).
    """

    adapter_ids: Tensor
    sorted_token_ids: Tensor
    seg_offsets: Tensor
    active_slots: Tensor
    num_slots: int
    num_active: int
    max_seg_len: int
    bounded: bool = False
    _host_offsets: Optional[tuple] = field(default=None, repr=False)
    # bounded batches: int32 [1], ids the last refresh found out of range (see check()).
    _invalid: Optional[Tensor] = field(default=None, repr=False)
    # Last, with a default, so the older positional constructor (four tensors and the host
    # ints) keeps working: without one the map is built from seg_offsets on the device.
    tile_map: Optional[Tensor] = None

    TILE_ROWS = TILE_ROWS

    def __post_init__(self):
        if self.tile_map is None:
            cap = tile_capacity(self.adapter_ids.shape[0], self.num_slots)
            tiles = _device_tile_map(self.seg_offsets.to(torch.int64), cap).to(torch.int32)
            object.__setattr__(self, "tile_map", tiles)

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.shape[0]

    @property
    def has_lora(self) -> bool:
        return self.bounded or self.num_active > 0

    @property
    def device(self) -> torch.device:
        return self.adapter_ids.device

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_adapter_ids(cls, adapter_ids, num_slots: int) -> "LoRABatch":
        """``adapter_ids [T]`` ints in ``[-1, num_slots)`` (tensor, list or tuple). A CUDA
        tensor costs one device→host copy (the range check and exact host ints need it); ids
        the host knows should go through :meth:`from_host_ids`, which needs none."""
        num_slots = _check_num_slots(num_slots)
        ids64 = _as_ids(adapter_ids)
        T = ids64.shape[0]
        # counts[0] counts the -1 tokens; out-of-range ids are caught from min/max below.
        clamped = ids64.clamp(-1, max(num_slots - 1, -1)) + 1
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=ids64.device)
        counts.scatter_add_(0, clamped, torch.ones_like(clamped))
        lo_hi = torch.stack([ids64.min(), ids64.max()]) if T else ids64.new_tensor([-1, -1])
        host = torch.cat([lo_hi, counts]).tolist()  # the one host sync of a batch
        _check_range(host[0], host[1], num_slots)
        sorted_ids = torch.argsort(ids64, stable=True).to(torch.int32)
        return cls._from_counts(ids64.to(torch.int32), sorted_ids, host[2:], ids64.device)

    @classmethod
    def from_host_ids(cls, adapter_ids, num_slots: int, device=None) -> "LoRABatch":
        """Ids known on the host (a list, or a CPU tensor): the metadata is computed there and
        uploaded in one non-blocking copy, so nothing waits for the GPU. Exact host ints."""
        num_slots = _check_num_slots(num_slots)
        if isinstance(adapter_ids, Tensor) and adapter_ids.device.type != "cpu":
            raise ValueError("from_host_ids takes host ids (a list or a CPU tensor); device ids "
                             "go through from_adapter_ids or a static batch's refresh_()")
        ids64 = _as_ids(adapter_ids)
        T = ids64.shape[0]
        if T:
            _check_range(int(ids64.min()), int(ids64.max()), num_slots)  # CPU: no sync
        counts = torch.bincount(ids64 + 1, minlength=num_slots + 1).tolist() if T else \
            [0] * (num_slots + 1)
        offsets, active, tiles = _host_layout(counts)
        meta = torch.tensor(offsets + active + [v for row in tiles for v in row],
                            dtype=torch.int32)
        host = torch.cat([ids64.to(torch.int32),
                          torch.argsort(ids64, stable=True).to(torch.int32), meta])
        dev = torch.device("cpu") if device is None else torch.device(device)
        flat = _upload(host, dev)
        S, A, o = num_slots, len(active), 2 * T
        return cls(flat[:T], flat[T:o], flat[o:o + S + 2], flat[o + S + 2:o + S + 2 + A],
                   S, A, max(counts[1:], default=0), _host_offsets=tuple(offsets),
                   tile_map=flat[o + S + 2 + A:].view(len(tiles), 4))

    @classmethod
    def from_device_ids(cls, adapter_ids: Tensor, num_slots: int) -> "LoRABatch":
        """A new *bounded* batch for device ids, built by device ops only (no sync; traceable
        by ``torch.compile(fullgraph=True)``): ``static(T, S).refresh_(ids)``. Ids out of range
        are served as base-only (see :meth:`check`)."""
        ids = _as_ids(adapter_ids)
        return cls.static(ids.shape[0], num_slots, ids.device).refresh_(ids)

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

    @classmethod
    def static(cls, max_tokens: int, num_slots: int, device=None) -> "LoRABatch":
        """Static-capacity buffers for ``max_tokens`` tokens (a CUDA-graph token bucket), all
        tokens base-only until :meth:`refresh_`. The buffers never move or change shape, so
        kernels captured reading them replay correctly after any refresh."""
        num_slots = _check_num_slots(num_slots)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise TypeError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        T, S = max_tokens, num_slots

        def i32(*shape):
            return torch.zeros(*shape, dtype=torch.int32, device=dev)
        b = cls(i32(T), i32(T), i32(S + 2), i32(min(S, T)), S, min(S, T), T, bounded=True,
                _invalid=i32(1), tile_map=i32(tile_capacity(T, S), 4))
        return b.refresh_(torch.empty(0, dtype=torch.int32, device=dev))

    # ---- in-place refresh (bounded batches) ------------------------------------------------
    def refresh_(self, adapter_ids, padding_first: bool = False) -> "LoRABatch":
        """Rewrite this bounded batch in place for new ids (``[t]`` with ``t ≤ num_tokens``;
        the tokens past ``t`` become base-only), with device ops only: no host sync, safe to
        capture in a CUDA graph. Host ids (a list or CPU tensor) are first copied up without
        blocking. An id outside ``[-1, num_slots)`` cannot raise here (that would need a sync):
        it is served as base-only and counted; :meth:`check` raises for it. Returns ``self``.

        ``padding_first``: the padding tokens ``t ..`` sort first, in descending order, before
        the real ``-1`` tokens, so every suffix of ``sorted_token_ids`` at least ``t`` long is
        a permutation of ``0 .. len-1`` (the engines' static batch hands such suffixes out for
        every padded size, :mod:`lora_kernels.integrations.static_batch`)."""
        if not self.bounded:
            raise ValueError("refresh_() needs a static batch (LoRABatch.static(max_tokens, "
                             "num_slots, device)); build other batches anew")
        ids = adapter_ids if isinstance(adapter_ids, Tensor) else _as_ids(adapter_ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] > self.num_tokens:
            raise ValueError(f"adapter_ids must be 1-D with at most max_tokens={self.num_tokens} "
                             f"ids, got shape {list(ids.shape)}")
        if ids.device != self.device:
            if ids.device.type != "cpu":
                raise ValueError(f"adapter_ids is on {ids.device}, the batch on {self.device}")
            ids = _upload(ids.to(torch.int32), self.device)
        n, S, T = ids.shape[0], self.num_slots, self.num_tokens
        buf = self.adapter_ids
        buf[:n].copy_(ids)
        buf[n:].fill_(-1)
        ids64 = buf.to(torch.int64)
        bad = (ids64 < -1) | (ids64 >= S)
        self._invalid.copy_(bad.sum().reshape(1))
        ids64 = torch.where(bad, -1, ids64)
        buf.copy_(ids64)
        key = ids64
        if padding_first:  # padding keyed below -1, descending: -2 - position
            pos = torch.arange(T, device=buf.device)
            key = torch.where(pos < n, ids64, -2 - pos)
        self.sorted_token_ids.copy_(torch.argsort(key, stable=True))
        counts = torch.zeros(S + 1, dtype=torch.int64, device=buf.device)
        counts.scatter_add_(0, ids64 + 1, torch.ones_like(ids64))
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.seg_offsets.copy_(offsets)
        seg = counts[1:]
        slots = torch.arange(S, device=buf.device)
        # Active slots ascending, then the inactive ones (keyed past S), cut to min(S, T).
        key = torch.where(seg > 0, slots, slots + S)
        first = torch.sort(key).values[: self.active_slots.shape[0]]
        self.active_slots.copy_(torch.where(first < S, first, -1))
        _device_tile_map(offsets, self.tile_map.shape[0], out=self.tile_map)
        return self

    def check(self) -> "LoRABatch":
        """Raise ``ValueError`` if the last :meth:`refresh_` met ids outside ``[-1, S)``
        (served as base-only). A host sync: call it where one is affordable (tests, debug)."""
        if self._invalid is not None:
            bad = int(self._invalid.item())
            if bad:
                raise ValueError(f"{bad} adapter id(s) of the last refresh_() lay outside "
                                 f"[-1, num_slots={self.num_slots}); they were served as base-only")
        return self

    # ---- used by the ops layer to pass the batch through a custom op and back -------------
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.adapter_ids, self.sorted_token_ids, self.seg_offsets, self.active_slots,
                self.tile_map)

    def host_ints(self) -> list[int]:
        return [self.num_slots, self.num_active, self.max_seg_len, int(self.bounded)]

    @classmethod
    def from_parts(cls, *parts) -> "LoRABatch":
        """``from_parts(*batch.tensors(), batch.host_ints())``. Also takes the older four
        tensors (no ``tile_map``) and three host ints: the tile map is then rebuilt on the
        device (no sync)."""
        *tensors, host_ints = parts
        ints = [int(v) for v in host_ints]
        num_slots, num_active, max_seg_len = ints[:3]
        bounded = bool(ints[3]) if len(ints) > 3 else False
        tiles = tensors[4] if len(tensors) > 4 else None  # None: rebuilt in __post_init__
        return cls(*tensors[:4], num_slots, num_active, max_seg_len, bounded, tile_map=tiles)

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
        inv = None if self._invalid is None else self._invalid.to(device)
        ids, order, offsets, active, tiles = (t.to(device) for t in self.tensors())
        return LoRABatch(ids, order, offsets, active, self.num_slots, self.num_active,
                         self.max_seg_len, self.bounded, self._host_offsets, inv, tile_map=tiles)

    # ---- internals -------------------------------------------------------------------------
    @classmethod
    def _from_counts(cls, ids32, sorted_ids, counts, device) -> "LoRABatch":
        """Exact batch from host counts (``counts[0]``: the -1 tokens): offsets, active slots
        and tile map computed on the host and uploaded in one copy."""
        offsets, active, tiles = _host_layout(counts)
        packed = offsets + active + [v for row in tiles for v in row]
        flat = _upload(torch.tensor(packed, dtype=torch.int32), device)
        S, A = len(counts) - 1, len(active)
        return cls(ids32, sorted_ids, flat[:S + 2], flat[S + 2:S + 2 + A], S, A,
                   max(counts[1:], default=0), _host_offsets=tuple(offsets),
                   tile_map=flat[S + 2 + A:].view(len(tiles), 4))


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _check_num_slots(num_slots) -> int:
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
        raise TypeError(f"num_slots must be a non-negative int, got {num_slots!r}")
    return num_slots


def _as_ids(adapter_ids) -> Tensor:
    """``adapter_ids`` as a 1-D int64 tensor (same device), or a TypeError/ValueError."""
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
    return adapter_ids.to(torch.int64)


def _check_range(lo: int, hi: int, num_slots: int) -> None:
    if lo < -1 or hi >= num_slots:
        bad = lo if lo < -1 else hi
        raise ValueError(f"adapter_ids must lie in [-1, num_slots={num_slots}), found {bad}")


def _host_layout(counts: list) -> tuple[list, list, list]:
    """``(seg_offsets, active_slots, tile rows)`` from host counts."""
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    active = [i for i, c in enumerate(counts[1:]) if c > 0]
    tiles = []
    for s in active:
        lo, hi = offsets[s + 1], offsets[s + 2]
        for r in range(lo, hi, TILE_ROWS):
            tiles.append([s, r, min(hi, r + TILE_ROWS), 0])
    return offsets, active, tiles


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """Host int32 → ``device`` without waiting for the GPU: a pinned staging copy and a
    non-blocking transfer (the caching host allocator keeps the pinned block alive until the
    copy has run). Under torch.compile the tensor is a traced constant instead."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _device_tile_map(offsets: Tensor, capacity: int, out: Optional[Tensor] = None) -> Tensor:
    """``tile_map [capacity, 4]`` (int64, or written into ``out``) from device ``seg_offsets
    [S+2]`` by device ops only (no sync): tile p belongs to the segment whose running tile
    count first exceeds p."""
    if out is not None:
        return out.copy_(_device_tile_map(offsets.to(torch.int64), capacity))
    dev = offsets.device
    S = offsets.shape[0] - 2
    p = torch.arange(capacity, device=dev)
    if S <= 0:
        return torch.stack([p * 0 - 1, p * 0, p * 0, p * 0], 1)
    lo, hi = offsets[1:-1], offsets[2:]
    ntiles = (hi - lo + TILE_ROWS - 1) // TILE_ROWS
    cum = ntiles.cumsum(0)
    seg = torch.searchsorted(cum, p, right=True)
    valid = seg < S
    seg = seg.clamp(max=S - 1)
    row_lo = lo[seg] + (p - (cum[seg] - ntiles[seg])) * TILE_ROWS
    row_hi = torch.minimum(hi[seg], row_lo + TILE_ROWS)
    zero = torch.zeros_like(p)
    return torch.stack([torch.where(valid, seg, -1), torch.where(valid, row_lo, 0),
                        torch.where(valid, row_hi, 0), zero], 1)
