"""The floor: the cuBLAS composition of single-adapter LoRA, as a dispatch-table candidate.

Unsloth's layout (and the reference's CPU kernel): the rank-r term seeds the output,
``y = bias + (s·xa)·Bᵀ`` with ``xa = drop(x)·Aᵀ``, then the base GEMM accumulates into it
(``addmm`` with ``beta = 1``); the backward seeds ``dx`` with ``drop'((s·dy·B)·A)`` and adds
``dy·W`` the same way, and ``dA``/``dB`` are two skinny GEMMs. Every GEMM is cuBLAS through
``torch.mm``/``addmm`` on CUDA tensors. Extra HBM traffic against the fused kernel: one more
read of x (the shrink), one read + write of y (the seed), the same again for dX — at M=8192,
K=N=4096 bf16 predicted 1.10-1.16× the bare GEMM forward and 1.15-1.24× forward+backward
(bench/roofline.py, H200/H100), which is what the fused kernels must beat.

Why it exists: ``auto`` on CUDA tensors must never be slower than this plain composition. The
dispatch table (``lora_kernels/ops/dispatch_table.json``, written by bench/dispatch_table.py
from GPU benchmarks) may name ``"cublas"`` for ``lora_linear`` per shape class, once
``tests/test_cublas_backend.py`` passed on the GPU and the benchmark timed it faster than
Triton there.

Why it is not a public backend name: the contract fixes ``auto | triton | cuda | torch``, and
``backend="torch"`` already runs this exact composition on CUDA tensors. What differs is the
dropout mask only: the torch backend draws it with the reference's eager int64 Philox on CUDA
(~200 tensor passes), this one with the fastest bit-identical generator there is (Triton's
kernel on CUDA tensors; the compiled CPU loop on CPU tensors, where the tests run it). A fifth
public name would add surface without a new capability; ``backend.resolve`` keeps refusing it.

Only ``lora_linear_fwd``/``lora_linear_bwd`` live here; every other kernel-level function
falls back to the torch backend (``backend.FALLBACK``), and the table never names this backend
for other ops.
"""

from __future__ import annotations

import functools

from lora_kernels import reference
from lora_kernels.ops import cpu_dropout


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None, row_offset: int = 0):
    """The v2 mask from the fastest bit-identical generator for ``device``."""
    if device is not None and str(device).startswith("cuda") and row_offset == 0:
        from lora_kernels.ops import backend
        if backend.available("triton", "cuda"):
            return backend.kernel("triton", "dropout_keep_mask")(seed, rows, cols, p, device)
    return cpu_dropout.dropout_keep_mask(seed, rows, cols, p, device, row_offset)


# The composition itself is the reference's explicit forward/backward (seeded output, beta=1
# accumulate, rank-sized scaling): one definition, so the floor and the CPU path cannot drift.
lora_linear_fwd = functools.partial(reference.lora_linear_forward, keep_mask=dropout_keep_mask)
lora_linear_bwd = functools.partial(reference.lora_linear_backward, keep_mask=dropout_keep_mask)
