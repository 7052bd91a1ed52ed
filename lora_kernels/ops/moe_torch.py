"""Torch backend of the MoE-LoRA op (any device; the oracle's twin in the compute dtype).

Pairs arrive sorted by expert (``sorted_pairs``, segment bounds ``offsets [E+1]``): each
non-empty expert is two dense GEMMs over its contiguous segment — an empty expert costs
nothing, and there is no per-token loop. Reading the bounds on the host is a device sync; the
Triton backend keeps them on the device.
"""

from __future__ import annotations

import torch


def _segments(offsets):
    bounds = offsets.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]


def moe_lora_fwd(x, weight, lora_a, lora_b, sorted_pairs, offsets, group, scaling):
    """``(y [P, N] in pair order, u = x·A_eᵀ [P, r] in sorted order)``; pair p reads x row
    ``p // group``."""
    P = sorted_pairs.shape[0]
    xs = x[sorted_pairs // group]
    ys = x.new_empty(P, weight.shape[1])
    u = x.new_empty(P, lora_a.shape[1])
    for e, lo, hi in _segments(offsets):
        seg = xs[lo:hi]
        u[lo:hi] = seg @ lora_a[e].t()
        ys[lo:hi] = torch.addmm(seg @ weight[e].t(), u[lo:hi] * scaling, lora_b[e].t())
    y = torch.empty_like(ys)
    y[sorted_pairs] = ys
    return y, u


def moe_lora_bwd(dy, x, weight, lora_a, lora_b, u, sorted_pairs, offsets, group, scaling,
                 needs):
    """``(dx, dA [E, r, K], dB [E, N, r])`` (each only where ``needs``; else None). dx sums
    the ``group`` pairs of an x row in pair order (deterministic, no scatter-add)."""
    need_x, need_a, need_b = needs
    P, K = sorted_pairs.shape[0], x.shape[1]
    dys = dy[sorted_pairs]
    xs = x[sorted_pairs // group] if need_a else None
    dxs = dy.new_zeros(P, K) if need_x else None
    da = torch.zeros_like(lora_a) if need_a else None
    db = torch.zeros_like(lora_b) if need_b else None
    for e, lo, hi in _segments(offsets):
        d = dys[lo:hi]
        g = (d @ lora_b[e]) * scaling  # s·dy·B_e: [n_e, r]
        if need_x:
            dxs[lo:hi] = torch.addmm(d @ weight[e], g, lora_a[e])
        if need_a:
            da[e] = g.t() @ xs[lo:hi]
        if need_b:
            db[e] = (d.t() @ u[lo:hi]) * scaling
    dx = None
    if need_x:
        dx_pair = torch.empty_like(dxs)
        dx_pair[sorted_pairs] = dxs
        dx = dx_pair.view(-1, group, K).sum(1)
    return dx, da, db


def moe_multi_lora_fwd(x, weight, lora_a, lora_b, scalings, sorted_pairs, offsets, group):
    """Multi-adapter forward: pairs sorted by (expert, slot), ``offsets [E·(S+1) + 1]``
    (per expert: slot -1 = base only, then slots 0..S-1); ``lora_a [S, E, r, K]``,
    ``lora_b [S, E, N, r]``, ``scalings [S]``. Returns ``y [P, N]`` in pair order."""
    S = lora_a.shape[0]
    xs = x[sorted_pairs // group]
    ys = x.new_empty(sorted_pairs.shape[0], weight.shape[1])
    scales = scalings.tolist()
    for g, lo, hi in _segments(offsets):
        e, slot = divmod(g, S + 1)
        seg = xs[lo:hi]
        ys[lo:hi] = seg @ weight[e].t()
        if slot > 0:
            a, b = lora_a[slot - 1, e], lora_b[slot - 1, e]
            ys[lo:hi].addmm_((seg @ a.t()) * scales[slot - 1], b.t())
    y = torch.empty_like(ys)
    y[sorted_pairs] = ys
    return y
