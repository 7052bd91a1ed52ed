"""Fake (meta) kernels of the ``cuda_*`` ops: shape checks only, so the ops trace under
``FakeTensorMode`` / ``torch.compile``. The ops write into preallocated outputs and return
nothing, so a fake only checks.

The schemas have one home, csrc/ (``m.def``); the C++ library names ``lora_kernels._ext`` as
the module holding these fakes. Each fake's parameters are the schema's argument names, in
order: tests/test_ext.py checks that for every registered ``cuda_*`` op, which is how a schema
change in C++ that is not mirrored here fails on CPU.
"""

from __future__ import annotations

import torch


def _expect(cond, msg):
    torch._check(cond, lambda: msg)


def cuda_dropout_keep_mask(out, seed, p, row_offset):
    _expect(out.dtype == torch.bool and out.dim() == 2, "out must be a 2-D bool tensor")


def cuda_lora_shrink(x, lora_a, scalings, ranks, adapter_ids, sorted_token_ids, seg_offsets,
                     active_slots, num_active, max_seg_len, n_slices, dropout_p, seed, path, out):
    _expect(x.dim() == 2 and lora_a.dim() == 3, "x must be [T, K], lora_a [S, n_slices*R, K]")
    _expect(lora_a.shape[2] == x.shape[1], "lora_a must be [S, n_slices*R, K]")
    _expect(out.dtype == torch.float32 and out.shape == (x.shape[0], lora_a.shape[1]),
            "out must be float32 [T, n_slices*R]")


def cuda_lora_expand(y, xa, lora_b, ranks, adapter_ids, sorted_token_ids, seg_offsets, active_slots,
                     num_active, max_seg_len, out_slices, path):
    _expect(y.dim() == 2 and lora_b.dim() == 3 and lora_b.shape[1] == y.shape[1],
            "y must be [T, N], lora_b [S, N, R]")
    n_slices = max(len(out_slices), 1)
    _expect(xa.shape == (y.shape[0], n_slices * lora_b.shape[2]), "xa must be [T, n_slices*R]")


def cuda_lora_shrink_expand(y, x, lora_a, lora_b, scalings, ranks, adapter_ids, out_slices, xa):
    _expect(x.shape[0] == y.shape[0] and lora_b.shape[1] == y.shape[1],
            "x must be [T, K], y [T, N], lora_b [S, N, R]")
    _expect(xa.shape == (y.shape[0], lora_a.shape[1]), "xa must be [T, n_slices*R]")


def _gemm_shapes(a, w, u, v, trans_b, out):
    n = w.shape[1] if trans_b else w.shape[0]
    _expect(out.shape == (a.shape[0], n), "out must be [M, N]")
    _expect(u.shape[0] == a.shape[0], "u must be [M, r]")
    _expect(v.shape == ((u.shape[1], n) if trans_b else (n, u.shape[1])),
            "v must be [r, N] (trans_b) or [N, r]")


def cuda_fused_lora_gemm(a, w, bias, u, v, scaling, dropout_p, seed, trans_b, out):
    _gemm_shapes(a, w, u, v, trans_b, out)


def cuda_cutlass_lora_gemm(a, w, bias, u, v, trans_b, out):
    _gemm_shapes(a, w, u, v, trans_b, out)


def cuda_cutlass_lora_dx_dropout(dy, w, u, v, dropout_p, seed, out):
    _gemm_shapes(dy, w, u, v, True, out)
    _expect(0.0 < dropout_p < 1.0, "dropout_p must be in (0, 1)")


FAKES = {fn.__name__: fn for fn in (cuda_dropout_keep_mask, cuda_lora_shrink, cuda_lora_expand,
                                    cuda_lora_shrink_expand, cuda_fused_lora_gemm,
                                    cuda_cutlass_lora_gemm, cuda_cutlass_lora_dx_dropout)}


def register() -> None:
    """Register the fakes of the ops the loaded extension defines (an older build may lack one;
    tests/test_ext.py requires the two sets to be equal)."""
    defined = set(torch._C._dispatch_get_all_op_names())
    for name, fn in FAKES.items():
        if f"lora_kernels::{name}" in defined:
            torch.library.register_fake(f"lora_kernels::{name}")(fn)
