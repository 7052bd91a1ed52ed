"""The ``torch`` backend: the kernel-level API (docs/BACKENDS.md) on top of the reference's
CPU kernels. Runs on any device; it is what ``auto`` uses for CPU tensors."""

from __future__ import annotations

import functools

from lora_kernels import reference
from lora_kernels.ops.cpu_dropout import dropout_keep_mask

# The reference's CPU kernels, with the compiled (bit-identical) Philox mask on big CPU tensors.
lora_linear_fwd = functools.partial(reference.lora_linear_forward, keep_mask=dropout_keep_mask)
lora_linear_bwd = functools.partial(reference.lora_linear_backward, keep_mask=dropout_keep_mask)


def _host(t):
    # Free for CPU tensors; for CUDA tensors this is the torch fallback's one sync per call.
    return None if t is None else t.tolist()


def _groups(batch):
    # Contiguous runs (one per sample in PEFT-style batches) work on views; a batch interleaved
    # token by token is gathered once per active slot instead.
    runs = batch.contiguous_runs(max_runs=2 * batch.num_active + 8) \
        if batch.adapter_ids.device.type == "cpu" else None
    if runs is not None:
        return [(slot, slice(a, b)) for slot, a, b in runs]
    return batch.groups()


def lora_shrink(x, lora_a, batch, scalings, ranks, n_slices):
    return reference.lora_shrink(x, lora_a, batch.adapter_ids, scalings, ranks, n_slices)


def lora_expand(y, xa, lora_b, batch, ranks, out_slices):
    return reference.lora_expand(y, xa, lora_b, batch.adapter_ids, ranks, out_slices)


def multi_lora_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   need_xa=True):
    return reference.multi_lora_forward(x, weight, bias, lora_a, lora_b, _host(scalings),
                                        _groups(batch), _host(ranks), out_slices, need_xa)


def multi_lora_bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices, needs):
    return reference.multi_lora_backward(dy, x, weight, lora_a, lora_b, _host(scalings),
                                         _groups(batch), needs, _host(ranks), out_slices, xa)
