"""SGLang ``BaseLoRABackend`` on lora-kernels ops (registered as ``lora_kernels``, see
:mod:`lora_kernels.integrations.sglang`). Importing this module imports SGLang.

What runs where:

* ``run_lora_a_sgemm`` / ``run_lora_b_sgemm`` / ``run_qkv_lora`` / ``run_gate_up_lora``:
  :func:`lora_kernels.lora_shrink` + :func:`lora_kernels.lora_expand` over a token-level
  :class:`~lora_kernels.LoRABatch` built once per forward in :meth:`prepare_lora_batch`,
  with SGLang's per-slot ranks and scalings.
* ``forward_with_base`` on a plain (unquantized, bias-free) linear:
  :func:`lora_kernels.multi_lora_linear`, our base GEMM + LoRA in one op (fused on GPU where
  the planner picks it) — single-slice layers always, packed qkv / gate_up when every slot in
  an eager batch has rank 0 or r_max (then SGLang's tight layout is ours). Everything else
  keeps SGLang's own base path + our LoRA term.
* ``run_lora_a_embedding``: a torch gather (there is no embedding op in lora-kernels).

**Packed slices.** SGLang stores a slot's qkv / gate_up ``lora_A`` slices tight at the slot's
own rank r (slice j = rows ``j·r .. (j+1)·r``) and its shrink output the same way; our ops
space slices at ``r_max``. The A weights are read as they are: the shrink treats the n slices
as one slice of rank ``n·r``, which *is* the tight layout. Only the small ``[T, n·r_max]``
shrink output is re-spaced (one gather, its index built once per batch) before the expand.

**-1 rows.** SGLang sends base-model requests to a slot of rank 0; those tokens become ``-1``
in our batch, so no kernel touches them.

**Decode CUDA graphs.** The batch lives in static buffers sized for the largest captured batch
and is refreshed in place by device ops (no host sync); a graph captured for ``T_c`` tokens
reads views that stay valid for any later batch of ``T ≤ T_c`` real tokens padded to ``T_c``
(:mod:`lora_kernels.integrations.static_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lora_kernels.integrations.static_batch import StaticLoRABatch
from lora_kernels.ops import LoRABatch, lora_expand, lora_shrink, multi_lora_linear
from sglang.srt.lora.backend.base_backend import BaseLoRABackend
from sglang.srt.lora.utils import (LoRABatchInfo, generate_sequence_lengths,
                                   get_lm_head_pruned_lens)

__all__ = ["LoRAKernelsBatchInfo", "LoRAKernelsSGLangBackend"]


@dataclass
class LoRAKernelsBatchInfo(LoRABatchInfo):
    # Token-level batch for our ops (slot per token, -1 = base / rank-0 slot).
    lk_batch: Optional[LoRABatch] = None
    # Host copy of the per-slot ranks (None in graph mode, where they live on the device only).
    lk_ranks_host: Optional[tuple] = None
    # Per-batch derived tensors (n·rank tensors, re-spacing indices), keyed by layout.
    lk_cache: dict = field(default_factory=dict)


class _DecodeGraphBuffers:
    """Static metadata for decode CUDA graphs: the token-level batch
    (:class:`~lora_kernels.integrations.static_batch.StaticLoRABatch`) plus SGLang's own
    per-request fields, all refreshed in place."""

    def __init__(self, max_bs: int, tokens_per_req: int, num_slots: int, device):
        self.max_bs, self.tpr = max_bs, tokens_per_req
        self.tokens = StaticLoRABatch(max_bs * tokens_per_req, num_slots, device)
        i32 = dict(dtype=torch.int32, device=device)
        self.weight_indices = torch.zeros(max_bs, **i32)
        self.ranks = torch.zeros(num_slots, **i32)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.seg_lens = torch.full((max_bs,), tokens_per_req, **i32)
        self.seg_indptr = torch.zeros(max_bs + 1, **i32)
        torch.cumsum(self.seg_lens, 0, out=self.seg_indptr[1:])
        self._ranks_times: dict = {}

    def ranks_times(self, n: int) -> Tensor:
        """``n · ranks`` in a static buffer, refreshed with the batch. A tensor made inside a
        capture would be new to the ops' once-per-tensor range check, whose host sync a
        capture refuses; this one was checked by the warm-up forward."""
        hit = self._ranks_times.get(n)
        if hit is None:
            hit = self._ranks_times[n] = self.ranks * n
        return hit

    def batch_for(self, bs: int) -> LoRABatch:
        return self.tokens.batch_for(bs * self.tpr)

    def refresh(self, bs: int, weight_indices: Tensor, ranks: Tensor, scalings: Tensor):
        """Device-side, sync-free update for a batch of ``bs`` real requests."""
        self.weight_indices[:bs].copy_(weight_indices, non_blocking=True)
        self.ranks.copy_(ranks, non_blocking=True)
        self.scalings.copy_(scalings, non_blocking=True)
        wi = self.weight_indices[:bs]
        req_slot = torch.where(self.ranks[wi.long()] > 0, wi, -1)  # rank-0 slot = base model
        self.tokens.refresh(req_slot.repeat_interleave(self.tpr))
        for n, buf in self._ranks_times.items():
            torch.mul(self.ranks, n, out=buf)


def _pinned(values, dtype, device) -> Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if torch.device(device).type == "cuda" else t


class LoRAKernelsSGLangBackend(BaseLoRABackend):
    """SGLang LoRA backend running lora-kernels' shrink / expand / fused multi-LoRA GEMM."""

    name = "lora_kernels"

    def __init__(self, max_loras_per_batch: int, device: torch.device, **kwargs):
        super().__init__(max_loras_per_batch, device)
        self._graph: Optional[_DecodeGraphBuffers] = None
        self.cuda_graph_batch_info: Optional[LoRAKernelsBatchInfo] = None

    # ---------------------------------------------------------------- batch metadata -------
    def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int,
                                          num_tokens_per_req: int):
        g = self._graph = _DecodeGraphBuffers(max_bs_in_cuda_graph, num_tokens_per_req,
                                              self.max_loras_per_batch, self.device)
        self.cuda_graph_batch_info = LoRAKernelsBatchInfo(
            use_cuda_graph=True, bs=max_bs_in_cuda_graph, num_segments=max_bs_in_cuda_graph,
            seg_indptr=g.seg_indptr, weight_indices=g.weight_indices, lora_ranks=g.ranks,
            scalings=g.scalings, max_len=num_tokens_per_req, seg_lens=g.seg_lens)

    def prepare_lora_batch(self, forward_batch, weight_indices: list[int], lora_ranks: list[int],
                           scalings: list[float], use_cuda_graph: bool,
                           use_prefill_cuda_graph: bool = False):
        if use_prefill_cuda_graph:
            raise NotImplementedError("the lora_kernels SGLang backend does not support the "
                                      "prefill CUDA graph (supports_prefill_cuda_graph=False)")
        S = self.max_loras_per_batch
        ranks = (list(lora_ranks) + [0] * S)[:S]
        scal = (list(scalings) + [0.0] * S)[:S]
        lens = generate_sequence_lengths(forward_batch, device="cpu").tolist()
        bs = forward_batch.batch_size
        if len(weight_indices) != len(lens):
            raise ValueError(f"weight_indices has {len(weight_indices)} entries for {len(lens)} "
                             f"requests")
        if any(not 0 <= w < S for w in weight_indices):
            raise ValueError(f"weight_indices must lie in [0, max_loras_per_batch={S}), got "
                             f"{list(weight_indices)}")
        if use_cuda_graph:
            info = self._prepare_graph(bs, lens, weight_indices, ranks, scal)
        else:
            info = self._prepare_eager(bs, lens, weight_indices, ranks, scal)
        self.batch_info = self._add_moe_lora_info(forward_batch, info)
        self.lm_head_batch_info, self.lm_head_pass_batch_infos = \
            self._prepare_lm_head(forward_batch, weight_indices, ranks, scal)

    def _prepare_lm_head(self, forward_batch, weight_indices, ranks, scal):
        """Batches for the rows the logits processor keeps (last token per request, or the
        logprob rows), and one per logprob chunk; None where lm_head sees every token."""
        pruned = get_lm_head_pruned_lens(forward_batch)
        if pruned is None:
            return None, None

        def info_for(wi, lens):
            info = self._prepare_eager(len(lens), lens, wi, ranks, scal)
            info.expected_tokens = sum(lens)
            return info
        passes = self._get_lm_head_pass_segments(list(weight_indices), pruned)
        return (info_for(weight_indices, pruned),
                None if passes is None else [info_for(wi, lens) for wi, lens in passes])

    def _prepare_eager(self, bs, lens, weight_indices, ranks, scal) -> LoRAKernelsBatchInfo:
        dev = self.device
        slot = [w if ranks[w] > 0 else -1 for w in weight_indices]  # rank 0: base model
        tok = torch.repeat_interleave(torch.tensor(slot, dtype=torch.int32),
                                      torch.tensor(lens, dtype=torch.int64))
        batch = LoRABatch.from_adapter_ids(tok, len(ranks))  # on the host: no device sync
        if torch.device(dev).type != "cpu":
            batch = batch.to(dev)
        indptr = [0]
        for n in lens:
            indptr.append(indptr[-1] + n)
        to_dev = dict(device=dev, non_blocking=True)
        return LoRAKernelsBatchInfo(
            use_cuda_graph=False, bs=bs, num_segments=bs,
            seg_indptr=_pinned(indptr, torch.int32, dev).to(**to_dev),
            weight_indices=_pinned(list(weight_indices), torch.int32, dev).to(**to_dev),
            lora_ranks=_pinned(ranks, torch.int32, dev).to(**to_dev),
            scalings=_pinned(scal, torch.float32, dev).to(**to_dev),
            max_len=max(lens, default=0),
            seg_lens=_pinned(lens, torch.int32, dev).to(**to_dev),
            lk_batch=batch, lk_ranks_host=tuple(ranks))

    def _prepare_graph(self, bs, lens, weight_indices, ranks, scal) -> LoRAKernelsBatchInfo:
        g, info = self._graph, self.cuda_graph_batch_info
        if g is None or info is None:
            raise RuntimeError("CUDA graph batch info is not initialized: SGLang calls "
                               "init_decode_cuda_graph_batch_info() before capture")
        if bs > g.max_bs or any(n != g.tpr for n in lens):
            raise ValueError(f"a CUDA-graph batch must have at most {g.max_bs} requests of "
                             f"{g.tpr} tokens each, got lengths {lens}")
        dev = self.device
        g.refresh(bs, _pinned(list(weight_indices), torch.int32, dev),
                  _pinned(ranks, torch.int32, dev), _pinned(scal, torch.float32, dev))
        info.bs = info.num_segments = bs
        info.lk_batch = g.batch_for(bs)
        info.lk_ranks_host = None
        info.lk_cache.clear()
        return info

    def reset_routing_cache(self) -> None:
        # SGLang calls this before every warm-up and capture forward: derived tensors must be
        # recomputed inside the captured graph, not reused from the warm-up.
        super().reset_routing_cache()
        if self.batch_info is not None and hasattr(self.batch_info, "lk_cache"):
            self.batch_info.lk_cache.clear()

    # ---------------------------------------------------------------- helpers -------------
    def _info(self, pruned_batch_info=None) -> LoRAKernelsBatchInfo:
        if pruned_batch_info is not None:  # lm_head rows (see _prepare_lm_head)
            if getattr(pruned_batch_info, "lk_batch", None) is None:
                raise TypeError("pruned_batch_info must come from this backend's "
                                "prepare_lora_batch (lm_head_batch_info)")
            return pruned_batch_info
        info = self.batch_info
        if info is None or getattr(info, "lk_batch", None) is None:
            raise RuntimeError("no LoRA batch prepared: prepare_lora_batch() runs before the "
                               "forward")
        return info

    def _ranks_times(self, info: LoRAKernelsBatchInfo, n: int) -> Tensor:
        if n == 1:
            return info.lora_ranks
        if info.use_cuda_graph and self._graph is not None:
            return self._graph.ranks_times(n)
        key = ("ranks", n)
        hit = info.lk_cache.get(key)
        if hit is None:
            hit = info.lk_cache[key] = info.lora_ranks * n
        return hit

    def _tight_is_spaced(self, info: LoRAKernelsBatchInfo, R: int) -> bool:
        """True when every slot in the batch has rank 0 or r_max (tight == r_max spacing)."""
        host = info.lk_ranks_host
        return host is not None and all(r in (0, R) for r in host)

    def _respace_index(self, info: LoRAKernelsBatchInfo, T: int, n: int, R: int) -> Tensor:
        """Column index mapping our ``[T, n·R]`` layout (slice j at j·R) to SGLang's tight one
        (slice j at j·r_t). Columns past a token's rank point at a valid column of its own row:
        the expand reads only ranks' columns."""
        key = ("respace", T, n, R)
        hit = info.lk_cache.get(key)
        if hit is None:
            ids = info.lk_batch.adapter_ids.long()
            r_tok = torch.where(ids >= 0, info.lora_ranks[ids.clamp(min=0)].long(), 0)
            k = torch.arange(R, device=ids.device)
            j = torch.arange(n, device=ids.device)
            last = (r_tok - 1).clamp(min=0)[:, None, None]
            idx = j[None, :, None] * r_tok[:, None, None] + torch.minimum(k[None, None, :], last)
            hit = info.lk_cache[key] = idx.reshape(T, n * R)
        return hit

    @staticmethod
    def _slices(offsets) -> list[int]:
        off = [int(v) for v in (offsets.tolist() if isinstance(offsets, Tensor) else offsets)]
        return [b - a for a, b in zip(off[:-1], off[1:])]

    def _shrink_tight(self, info, x: Tensor, lora_a: Tensor, n: int) -> Tensor:
        """``[T, n·R]`` float32 in SGLang's tight layout: the n slices as one of rank n·r."""
        return lora_shrink(x, lora_a, info.lk_batch, info.scalings,
                           ranks=self._ranks_times(info, n))

    def _expand_tight(self, info, xa: Tensor, lora_b: Tensor, slices: list[int],
                      base_output: Optional[Tensor]) -> Tensor:
        T, (_, N, R), n = xa.shape[0], lora_b.shape, len(slices)
        if n > 1 and not self._tight_is_spaced(info, R):
            xa = torch.gather(xa, 1, self._respace_index(info, T, n, R))
        if base_output is None:
            out = torch.zeros(T, N, dtype=xa.dtype if xa.dtype != torch.float32 else lora_b.dtype,
                              device=xa.device)
            target = out
        else:
            out = base_output
            target = base_output if base_output.shape[-1] == N and \
                base_output.is_contiguous() else None
            if target is None:
                target = torch.zeros(T, N, dtype=base_output.dtype, device=base_output.device)
        lora_expand(target, xa, lora_b, info.lk_batch, ranks=info.lora_ranks,
                    out_slices=slices if n > 1 else None)
        if target is not out:
            out[:, :N] += target
        return out

    # ---------------------------------------------------------------- SGLang interface ----
    def run_lora_a_sgemm(self, x: Tensor, weights: Tensor, stack_num: int = 1, *args,
                         pruned_batch_info=None, **kwargs) -> Tensor:
        info = self._info(pruned_batch_info)
        return self._shrink_tight(info, x, weights, stack_num).to(x.dtype)

    def run_lora_b_sgemm(self, x: Tensor, weights: Tensor, output_offset: Tensor = None,
                         output_offset_cpu: Tensor = None, base_output: Tensor = None, *args,
                         pruned_batch_info=None, **kwargs) -> Tensor:
        info = self._info(pruned_batch_info)
        offsets = output_offset_cpu if output_offset_cpu is not None else output_offset
        if offsets is None:
            offsets = [0, weights.shape[1]]
        return self._expand_tight(info, x, weights, self._slices(offsets), base_output)

    def run_qkv_lora(self, x: Tensor, qkv_lora_a: Tensor, qkv_lora_b, output_offset=None,
                     output_offset_cpu=None, max_qkv_out_dim: int = None,
                     base_output: Tensor = None, n_slices: int = 3, *args, **kwargs) -> Tensor:
        if not isinstance(qkv_lora_b, Tensor):
            raise TypeError("qkv_lora_b must be one stacked tensor [S, N_q + 2·N_kv, r]; the "
                            "split (q, kv) form is not supported by the lora_kernels backend")
        return self._packed(x, qkv_lora_a, qkv_lora_b, output_offset_cpu, output_offset,
                            base_output)

    def run_gate_up_lora(self, x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b,
                         output_offset=None, output_offset_cpu=None,
                         base_output: Tensor = None, *args, **kwargs) -> Tensor:
        if not isinstance(gate_up_lora_b, Tensor):
            raise TypeError("gate_up_lora_b must be one stacked tensor [S, 2·N, r]")
        return self._packed(x, gate_up_lora_a, gate_up_lora_b, output_offset_cpu,
                            output_offset, base_output)

    def _packed(self, x, lora_a, lora_b, offsets_cpu, offsets, base_output):
        info = self._info()
        src = offsets_cpu if offsets_cpu is not None else offsets
        slices = self._slices(src) if src is not None else [lora_b.shape[1]]
        xa = self._shrink_tight(info, x, lora_a, len(slices))
        return self._expand_tight(info, xa, lora_b, slices, base_output)

    def run_lora_a_embedding(self, input_ids: Tensor, weights: Tensor, vocab_size: int,
                             extra_embeddings: Tensor = None, *args, **kwargs) -> Tensor:
        """``out[t, :r] = s_i · A_i[:r, input_ids[t]]`` (torch gather; ids ≥ vocab give 0)."""
        if extra_embeddings is not None:
            raise NotImplementedError("LoRA extra (added) token embeddings are not supported by "
                                      "the lora_kernels backend (nor by SGLang's torch_native)")
        info = self._info()
        S, R, V = weights.shape
        ids = info.lk_batch.adapter_ids.long()
        slot = ids.clamp(min=0)
        tok = input_ids.long()
        in_vocab = (tok >= 0) & (tok < V)
        rows = weights[slot, :, tok.clamp(0, max(V - 1, 0))]                     # [T, R]
        r_tok = info.lora_ranks[slot]
        keep = (torch.arange(R, device=ids.device)[None, :] < r_tok[:, None]) & \
            ((ids >= 0) & in_vocab)[:, None]
        scale = info.scalings[slot].to(weights.dtype)[:, None]
        return torch.where(keep, rows * scale, torch.zeros((), dtype=weights.dtype,
                                                           device=weights.device))

    def forward_with_base(self, layer, x: Tensor, base_fn, lora_a, lora_b, output_offset,
                          offsets, *, all_reduce=None, kind="linear", pruned_batch_info=None):
        plain = self._plain_linear(layer, x, lora_a, lora_b, offsets, all_reduce, kind,
                                   pruned_batch_info)
        if plain is None:
            return super().forward_with_base(layer, x, base_fn, lora_a, lora_b, output_offset,
                                             offsets, all_reduce=all_reduce, kind=kind,
                                             pruned_batch_info=pruned_batch_info)
        info = self._info()
        slices = self._slices(offsets)
        return multi_lora_linear(x, plain, None, lora_a, lora_b, info.lk_batch,
                                 scalings=info.scalings, ranks=info.lora_ranks,
                                 out_slices=slices if len(slices) > 1 else None)

    def _plain_linear(self, layer, x, lora_a, lora_b, offsets, all_reduce, kind,
                      pruned_batch_info) -> Optional[Tensor]:
        """The base weight when ``base_fn`` is exactly ``F.linear(x, weight)`` and one
        ``multi_lora_linear`` can run the layer: an unquantized, bias-free (or bias-skipped)
        linear with no reduction in between, and either one slice or packed slices whose
        tight layout equals ours (every slot in the batch at rank 0 or r_max; an eager batch,
        where the ranks are known on the host)."""
        if all_reduce is not None or pruned_batch_info is not None:
            return None
        if getattr(kind, "value", kind) != "linear" or len(offsets) < 2:
            return None
        if len(offsets) > 2 and not (self.batch_info is not None and
                                     self._tight_is_spaced(self.batch_info, lora_b.shape[2])):
            return None
        base = getattr(layer, "base_layer", None)
        qm = getattr(base, "quant_method", None)
        if qm is None or type(qm).__name__ != "UnquantizedLinearMethod":
            return None
        if getattr(base, "use_intel_amx_backend", False):
            return None  # weights repacked for AMX: not a plain [N, K] matrix
        if getattr(base, "bias", None) is not None and not getattr(base, "skip_bias_add", False):
            return None  # tensor-parallel rows add the bias on rank 0 only: keep SGLang's path
        w = getattr(base, "weight", None)
        if not isinstance(w, Tensor) or w.dim() != 2 or x.dim() != 2:
            return None
        if w.dtype != x.dtype or lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
            return None
        n = len(offsets) - 1
        if w.shape != (lora_b.shape[1], x.shape[1]) or offsets[-1] != w.shape[0] or \
                lora_a.shape[1] != n * lora_b.shape[2]:
            return None
        return w
