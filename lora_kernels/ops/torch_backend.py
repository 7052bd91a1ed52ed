"""The ``torch`` backend: the kernel-level API (docs/BACKENDS.md) on top of the reference's
CPU kernels. Runs on any device; it is what ``auto`` uses for CPU tensors."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lora_kernels import reference
from lora_kernels.ops.cpu_dropout import dropout_keep_mask

# The reference's CPU kernels, with the compiled (bit-identical) Philox mask on big CPU tensors.
lora_linear_fwd = functools.partial(reference.lora_linear_forward, keep_mask=dropout_keep_mask)
lora_linear_bwd = functools.partial(reference.lora_linear_backward, keep_mask=dropout_keep_mask)


def dora_weight_a(weight, lora_a):
    """``W0·Aᵀ`` ``[N, r]``: the one weight-side GEMM of DoRA's norm (rank-sized output)."""
    return F.linear(weight, lora_a)


def dora_linear_fwd(x, weight, bias, lora_a, lora_b, col_scale, scaling):
    """``(y, xa)``: ``y = c⊙(x·Wᵀ + s·xa·Bᵀ) + b`` with ``c = col_scale`` (fp32/fp64 [N]),
    ``xa = x·Aᵀ``. The pre-scale output is the seeded LoRA forward, scaled in place; fp16/bf16
    scale in fp32 and round once."""
    z, xa = reference.lora_linear_forward(x, weight, None, lora_a, lora_b, scaling)
    y = z.mul_(col_scale) if z.dtype == col_scale.dtype else (z * col_scale).to(z.dtype)
    if bias is not None:
        y.add_(bias)
    return y, xa


def dora_scale_grad(dy, y_pre, bias, col_scale, need_g, need_dot):
    """``(g, dot)``: ``g = dy⊙c`` (scaled in c's precision, rounded once to dy's dtype) and
    ``dot_n = Σ_m dy_mn·(y_mn − b_n)`` in c's dtype; None where not needed."""
    g = (dy * col_scale).to(dy.dtype) if need_g else None
    dot = None
    if need_dot:
        pre = y_pre if bias is None else y_pre - bias
        dot = (dy * pre).sum(0, dtype=col_scale.dtype)
    return g, dot


def _host(t):
    # Free for CPU tensors. On CUDA each call is a device->host sync: the torch fallback pays
    # one for scalings and one for ranks (when given), in forward and again in backward.
    return None if t is None else t.tolist()


def _plans(batch) -> dict:
    """Per-batch grouping plans, built once and reused by every layer of a forward. The custom
    op rebuilds the LoRABatch object per call but passes the same ``sorted_token_ids`` tensor
    through, so the plans hang off that tensor (and die with it)."""
    key = batch.sorted_token_ids
    # A static batch is refreshed in place (same tensor, new contents): its version counter
    # moves, and the plans must be rebuilt. (Inference tensors have no counter; a static
    # batch's buffers are never inference tensors.)
    version = None if key.is_inference() else key._version
    cached = getattr(key, "_lora_kernels_plans", None)
    if cached is None or cached[0] != version:
        cached = (version, {})
        key._lora_kernels_plans = cached
    return cached[1]


def _groups(batch):
    # Contiguous runs (one per sample in PEFT-style batches) work on views; a batch interleaved
    # token by token is gathered once per active slot instead.
    plans = _plans(batch)
    if "groups" not in plans:
        runs = batch.contiguous_runs(max_runs=2 * batch.num_active + 8) \
            if batch.adapter_ids.device.type == "cpu" else None
        plans["groups"] = [(slot, slice(a, b)) for slot, a, b in runs] if runs is not None \
            else batch.groups()
    return plans["groups"]


def lora_shrink(x, lora_a, batch, scalings, ranks, n_slices):
    return reference.lora_shrink(x, lora_a, batch.adapter_ids, scalings, ranks, n_slices)


def lora_expand(y, xa, lora_b, batch, ranks, out_slices):
    return reference.lora_expand(y, xa, lora_b, batch.adapter_ids, ranks, out_slices)


# A token-interleaved batch whose segments are about equally long goes through two bmm calls
# over segments padded to the longest one, instead of ~5 small ops per slot: measured on 2 cores
# (T=2048, K=N=1024, r=16, 16 adapters) the per-slot loop costs ~1.18x the bare F.linear, mostly
# op overhead. Padding is wasted work, so only when it adds at most this fraction of tokens.
_MAX_PAD_FRACTION = 0.25


def _pad_plan(batch):
    """``(active slots, x rows [A·G], y rows [A·G])``: every slot's segment padded to the
    longest (G); padding reads row 0 of x and writes the scratch row T of y. None when padding
    would add too much work. Cached per batch."""
    plans = _plans(batch)
    if "pad" not in plans:
        plans["pad"] = _build_pad_plan(batch)
    return plans["pad"]


def _build_pad_plan(batch):
    off = batch.host_offsets()
    active = [i for i in range(batch.num_slots) if off[i + 2] > off[i + 1]]
    g, T, S = batch.max_seg_len, batch.num_tokens, batch.num_slots
    if len(active) < 2 or len(active) * g > (1 + _MAX_PAD_FRACTION) * (T - off[1]):
        return None
    act = torch.tensor(active)
    tok = batch.sorted_token_ids[off[1]:].to(torch.int64)  # tokens with a slot, sorted by slot
    slot = batch.adapter_ids.to(torch.int64)[tok]
    group = torch.full((S,), -1, dtype=torch.int64)
    group[act] = torch.arange(len(active))
    pos = torch.arange(off[1], T) - torch.tensor(off[1:-1])[slot]
    y_rows = torch.full((len(active) * g,), T, dtype=torch.int64)
    y_rows[group[slot] * g + pos] = tok
    return act, torch.where(y_rows == T, 0, y_rows), y_rows


def _padded_forward(x, weight, bias, lora_a, lora_b, scalings, ranks, plan, need_xa):
    """Base GEMM, then every token's ``s_i·(x·A_iᵀ)·B_iᵀ`` with one gather, two bmm and one
    ``index_add_``. Padding rows write a scratch row (T) of y/xa, so they never touch a real
    token, whatever they computed (even from inf/NaN adapters)."""
    act, x_rows, y_rows = plan
    T, N = x.shape[0], weight.shape[0]
    y_ext = torch.empty(T + 1, N, dtype=x.dtype)
    y = y_ext[:T]
    if bias is not None:
        torch.addmm(bias, x, weight.t(), out=y)
    else:
        torch.mm(x, weight.t(), out=y)
    xs = x.index_select(0, x_rows).view(len(act), -1, x.shape[1])
    a, b = lora_a.index_select(0, act), lora_b.index_select(0, act)
    if ranks is not None:  # rank rows/cols past each slot's rank are ignored, NaN-safe
        # The contract allows [S] or [S, n_slices]; this path only runs with one slice, so
        # [S, 1] is the same ranks (reshape raises on a wider [S, n] rather than guess).
        rk = ranks.reshape(ranks.shape[0])
        keep = torch.arange(a.shape[1]) < rk.index_select(0, act).to(torch.int64)[:, None]
        zero = torch.zeros((), dtype=a.dtype)
        a = torch.where(keep[:, :, None], a, zero)
        b = torch.where(keep[:, None, :], b, zero)
    u = torch.bmm(xs, a.transpose(1, 2)) * scalings.index_select(0, act).to(x.dtype)[:, None, None]
    y_ext.index_add_(0, y_rows, torch.bmm(u, b.transpose(1, 2)).view(-1, N))
    xa = None
    if need_xa:
        xa = x.new_zeros(T + 1, a.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        xa.index_copy_(0, y_rows, u.view(-1, u.shape[2]).to(xa.dtype))
        xa = xa[:T]
    return y, xa


# Tiny batches (decode steps, PEFT's mixed-batch tests): each active slot's low-rank term is
# computed over all T rows and kept on its own rows only. That wastes (active slots - 1) x the
# LoRA work, nothing at <= 16 tokens, and buys bit-equality with the single-adapter op: a BLAS
# call's rounding depends on its row count (measured: a 1-row or 3-row x·Aᵀ differs from the
# same rows of a 9-row one by ulps), and PEFT's tests compare a token through one adapter with
# the same token in a mixed batch at allclose's default tolerance.
FULL_ROWS_MAX_TOKENS = 16  # decode-sized: the padded and grouped paths keep larger batches


def _full_rows_forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, need_xa):
    # The single-adapter op's small-M order (reference.lora_linear_forward): base GEMM, then
    # y += (s·x·Aᵀ)·Bᵀ, here per slot over all rows, added on the slot's rows.
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    sc, rk, R = _host(scalings), _host(ranks), lora_b.shape[2]
    xa = x.new_zeros(x.shape[0], R, dtype=torch.promote_types(x.dtype, torch.float32)) \
        if need_xa else None
    for slot, rows in batch.groups():
        r = R if rk is None else rk[slot]
        r = int(r[0] if isinstance(r, list) else r)
        if r == 0:
            continue
        u = (x @ lora_a[slot, :r].t()) * float(sc[slot])
        y.index_add_(0, rows, (u @ lora_b[slot, :, :r].t()).index_select(0, rows))
        if xa is not None:
            xa[rows, :r] = u.index_select(0, rows).to(xa.dtype)
    return y, xa


def multi_lora_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                   need_xa=True):
    if out_slices is None and x.device.type == "cpu" and x.shape[0] <= FULL_ROWS_MAX_TOKENS:
        return _full_rows_forward(x, weight, bias, lora_a, lora_b, scalings, ranks, batch,
                                  need_xa)
    groups = _groups(batch)
    if out_slices is None and x.device.type == "cpu" and groups and not isinstance(groups[0][1], slice):
        plan = _pad_plan(batch)
        if plan is not None:
            return _padded_forward(x, weight, bias, lora_a, lora_b, scalings, ranks, plan, need_xa)
    return reference.multi_lora_forward(x, weight, bias, lora_a, lora_b, _host(scalings),
                                        groups, _host(ranks), out_slices, need_xa)


def multi_lora_bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices, needs):
    return reference.multi_lora_backward(dy, x, weight, lora_a, lora_b, _host(scalings),
                                         _groups(batch), needs, _host(ranks), out_slices, xa)


# Dropout in a heterogeneous batch (per-token mask, see ops/multi_lora_dropout.py): the grouped
# CPU kernels with the LoRA branch on drop(x[G]) and the dX low-rank part masked alike. The
# padded bmm path has no dropout variant; a mask is a [T, K] pass anyway.
def multi_lora_dropout_fwd(x, weight, bias, lora_a, lora_b, scalings, ranks, batch, out_slices,
                           need_xa, keep, dropout_p):
    return reference.multi_lora_forward(x, weight, bias, lora_a, lora_b, _host(scalings),
                                        _groups(batch), _host(ranks), out_slices, need_xa,
                                        keep=keep, dropout_p=dropout_p)


def multi_lora_dropout_bwd(dy, x, weight, lora_a, lora_b, xa, scalings, ranks, batch, out_slices,
                           needs, keep, dropout_p):
    return reference.multi_lora_backward(dy, x, weight, lora_a, lora_b, _host(scalings),
                                         _groups(batch), needs, _host(ranks), out_slices, xa,
                                         keep=keep, dropout_p=dropout_p)
