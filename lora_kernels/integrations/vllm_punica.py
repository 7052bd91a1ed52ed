"""vLLM ``PunicaWrapperBase`` on lora-kernels ops (enabled by ``LORA_KERNELS_VLLM=1``, see
:mod:`lora_kernels.integrations.vllm`). Importing this module imports vLLM.

vLLM keeps one weight tensor per slice (``lora_a_stacked[i] [L, 1, r, K]``,
``lora_b_stacked[i] [L, 1, N_i, r]``), runs the base GEMM itself and calls the wrapper for
the LoRA term, so this is the shrink/expand pair: :func:`lora_kernels.lora_shrink` and
:func:`lora_kernels.lora_expand` per slice on views of vLLM's tensors (no weight copies). A
slice that is not the whole output row is expanded into a scratch ``[T, N_i]`` and added into
its columns (our expand adds into contiguous rows only).

The token→slot mapping comes from vLLM's own ``convert_mapping`` (base class) and is written,
once per step and without a host sync, into a :class:`StaticLoRABatch`, so vLLM's CUDA graphs
keep reading valid metadata (rows past the step's tokens are ``-1``: base model only).

Not accelerated: the MoE LoRA methods (``moe_lora_align_block_size``, ``add_lora_fused_moe``,
``add_lora_w13``, ``add_lora_w2``) raise ``NotImplementedError`` naming the method.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_kernels.integrations.static_batch import StaticLoRABatch
from lora_kernels.ops import LoRABatch, lora_expand, lora_shrink
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

__all__ = ["LoRAKernelsPunicaWrapper"]


def _stack3(w: Tensor, name: str) -> Tensor:
    """``[L, 1, a, b]`` (vLLM's per-layer stacks) as the ``[L, a, b]`` view our ops take."""
    if w.dim() == 4:
        if w.shape[1] != 1:
            raise ValueError(f"{name} must have shape [max_loras, 1, ·, ·], got {list(w.shape)}")
        return w[:, 0]
    if w.dim() != 3:
        raise ValueError(f"{name} must be 3-D or 4-D, got shape {list(w.shape)}")
    return w


class LoRAKernelsPunicaWrapper(PunicaWrapperBase):
    """vLLM punica wrapper running lora-kernels' shrink / expand kernels."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        PunicaWrapperBase.__init__(self, max_num_batched_tokens, max_batches, device)
        self.lora_config = kwargs.get("lora_config")
        self._capacity = max_num_batched_tokens
        self._tokens: Optional[StaticLoRABatch] = None   # one slot per token
        self._samples: Optional[StaticLoRABatch] = None  # one slot per sampled row (logits)

    # ------------------------------------------------------------------ metadata ----------
    def update_metadata(self, mapping, lora_index_to_id, max_loras: int, vocab_size: int,
                        **kwargs):
        self.is_prefill = bool(mapping.is_prefill)
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        if self._tokens is None or self._tokens.num_slots != max_loras:
            self._tokens = StaticLoRABatch(self._capacity, max_loras, self.device)
            self._samples = StaticLoRABatch(self._capacity, max_loras, self.device)
        self._tokens.refresh(self.token_lora_indices.to(torch.int32))
        self._samples.refresh(self.sampler_indices.to(torch.int32))

    def _batch(self, static: Optional[StaticLoRABatch], rows: int) -> LoRABatch:
        if static is None:
            raise RuntimeError("no LoRA mapping: vLLM calls update_metadata() before the "
                               "forward")
        return static.batch_for(rows)

    # ------------------------------------------------------------------ building blocks ---
    @staticmethod
    def _shrink(x2: Tensor, lora_a: Tensor, batch: LoRABatch, scale: float) -> Tensor:
        xa = lora_shrink(x2, _stack3(lora_a, "lora_a_stacked"), batch)
        if scale != 1.0:
            xa.mul_(scale)
        return xa

    @staticmethod
    def _expand_into(y2: Tensor, offset: int, xa: Tensor, lora_b: Tensor, batch: LoRABatch,
                     add_inputs: bool, width: Optional[int] = None) -> None:
        """``y2[:, offset:offset+N] (+)= xa·B_iᵀ``; rows of ``-1`` tokens untouched."""
        b3 = _stack3(lora_b, "lora_b_stacked")
        N = b3.shape[1] if width is None else min(width, b3.shape[1])
        if N != b3.shape[1]:
            b3 = b3[:, :N]
        if offset < 0 or offset + N > y2.shape[1]:
            raise ValueError(f"slice [{offset}, {offset + N}) lies outside y's {y2.shape[1]} "
                             f"columns")
        xa = xa[:, :b3.shape[2]]
        if add_inputs and offset == 0 and N == y2.shape[1] and y2.is_contiguous():
            lora_expand(y2, xa, b3, batch)
            return
        out = y2[:, offset:offset + N]
        tmp = torch.zeros(y2.shape[0], N, dtype=y2.dtype, device=y2.device)
        lora_expand(tmp, xa, b3, batch)
        if add_inputs:
            out += tmp
        else:
            out.copy_(torch.where((batch.adapter_ids >= 0)[:, None], tmp, out))

    # ------------------------------------------------------------------ punica API --------
    def add_shrink(self, y, x: Tensor, lora_a_stacked, scale: float, **kwargs):
        """``y[i][:, :r] = scale · x·A_iᵀ`` per slice (zero rows for tokens without LoRA)."""
        x2 = x.reshape(-1, x.shape[-1])
        batch = self._batch(self._tokens, x2.shape[0])
        for i, a in enumerate(lora_a_stacked):
            xa = self._shrink(x2, a, batch, scale)
            y[i][:, :xa.shape[1]].copy_(xa)

    def add_expand(self, y: Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs=True, **kwargs):
        """``y[:, off_i : off_i + N_i] += x[i]·B_iᵀ``, slices side by side from
        ``offset_start``."""
        if len(lora_b_stacked) != len(output_slices):
            raise ValueError(f"{len(lora_b_stacked)} lora_b slices for {len(output_slices)} "
                             f"output_slices")
        y2 = y.view(-1, y.shape[-1])
        batch = self._batch(self._tokens, y2.shape[0])
        offset = offset_start
        for i, (b, width) in enumerate(zip(lora_b_stacked, output_slices)):
            self._expand_into(y2, offset, x[i], b, batch, add_inputs, width)
            offset += width

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor,
                           add_inputs: bool = True, **kwargs):
        """``y += x·B_iᵀ`` (the embedding layer looks A up itself)."""
        y2 = y.view(-1, y.shape[-1])
        self._expand_into(y2, 0, x.reshape(y2.shape[0], -1), lora_b_stacked,
                          self._batch(self._tokens, y2.shape[0]), add_inputs)

    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked,
                        scale: float, output_slices, *, buffer=None, **kwargs):
        """``y[:, slice i] += scale · (x·A_iᵀ)·B_iᵀ`` for each slice. ``buffer`` (vLLM's CPU
        wrapper accepts one, its GPU wrapper refuses one) receives the shrink outputs."""
        if not len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices):
            raise ValueError(f"lora_a_stacked, lora_b_stacked and output_slices must have one "
                             f"entry per slice, got {len(lora_a_stacked)}, "
                             f"{len(lora_b_stacked)}, {len(output_slices)}")
        add_inputs = kwargs.pop("add_inputs", True)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        batch = self._batch(self._tokens, x2.shape[0])
        offset = 0
        for i, (a, b, width) in enumerate(zip(lora_a_stacked, lora_b_stacked, output_slices)):
            xa = self._shrink(x2, a, batch, scale)
            if buffer is not None:
                buffer[i][:, :xa.shape[1]].copy_(xa)
            self._expand_into(y2, offset, xa, b, batch, add_inputs, width)
            offset += width

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor,
                        lora_b_stacked: Tensor, scale, *, buffer=None, **kwargs):
        """``y += scale · (x·A_iᵀ)·B_iᵀ`` per sampled row (vLLM's sampler indices); columns
        past the shorter of y and B (vocab padding) are left alone."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        batch = self._batch(self._samples, x2.shape[0])
        xa = self._shrink(x2, lora_a_stacked, batch, scale)
        if buffer is not None:
            buffer[:, :xa.shape[1]].copy_(xa)
        self._expand_into(y2, 0, xa, lora_b_stacked, batch, True, width=y2.shape[1])

    def apply_lora_full_linear(self, y: Tensor, x: Tensor, weight_stacked: Tensor,
                               bias_stacked: Tensor, module_enabled: Tensor):
        """Rows of requests whose adapter replaces this module: ``y = x·W_iᵀ + b_i``."""
        x2 = x.reshape(-1, x.shape[-1])
        batch = self._batch(self._samples, x2.shape[0])
        adapter_y = lora_shrink(x2, _stack3(weight_stacked, "weight_stacked"), batch)
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))

    # ------------------------------------------------------------------ not accelerated ---
    def _no_moe(self, method: str):
        raise NotImplementedError(
            f"LoRAKernelsPunicaWrapper.{method}: MoE LoRA is not implemented by lora_kernels' "
            f"vLLM wrapper; unset LORA_KERNELS_VLLM to use vLLM's own punica wrapper")

    def moe_lora_align_block_size(self, *args, **kwargs):
        self._no_moe("moe_lora_align_block_size")

    def add_lora_fused_moe(self, *args, **kwargs):
        self._no_moe("add_lora_fused_moe")

    def add_lora_w13(self, *args, **kwargs):
        self._no_moe("add_lora_w13")

    def add_lora_w2(self, *args, **kwargs):
        self._no_moe("add_lora_w2")
