"""Pure-PyTorch reference for every op: the test oracle and the CPU kernel.

Everything here is plain tensor algebra, correct in float64 on CPU and differentiable by
autograd. It imports nothing from ``lora_kernels`` on purpose: the oracle must not depend on
the code it checks.

Layouts follow ``nn.Linear`` and PEFT: ``weight [N, K]``, ``lora_a [r, K]``, ``lora_b [N, r]``;
stacked adapters ``lora_a [S, R, K]``, ``lora_b [S, N, R]`` (``R`` = r_max).

Two groups of functions:

* the *oracle* (``lora_linear``, ``multi_lora_linear``, ``lora_shrink``, ``lora_expand``,
  ``packed_lora_linear``): the shortest correct composition, autograd gives the gradients;
* the *CPU kernels* (``lora_linear_forward/backward``, ``multi_lora_forward/backward``): the
  same math written for speed on CPU (in-place ``addmm_``, one GEMM per active adapter,
  rank-sized intermediates), with explicit backward formulas. ``lora_kernels.ops`` calls these
  for ``backend="torch"``.

Dropout (LoRA branch only, PEFT semantics) is counter-based so forward and backward, and every
backend, draw the same mask from a seed: see :func:`dropout_keep_mask`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Counter-based dropout mask (Philox4x32-10), identical in torch, Triton and CUDA.
# --------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi32, lo32) of a*b for a 32-bit constant a and uint32 values b held in int64.

    a*b can reach 2^64, which overflows int64, so b is split into 16-bit halves: every partial
    product stays below 2^49.
    """
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2^48
    p_lo = a * b_lo  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi & _MASK32, lo


def philox4x32(seed, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four output words of Philox4x32-10 for 64-bit counters ``counter`` (int64 tensor).

    Key = (seed & 0xffffffff, seed >> 32 & 0xffffffff); counter words = (lo32, hi32, 0, 0).
    Same constants and round function as Triton's ``tl.randint4x`` and curand's Philox.
    ``seed`` is an int or a 0-d int64 tensor (two's complement for seeds ≥ 2⁶³). Each word is a
    uint32 held in int64.
    """
    if not isinstance(seed, Tensor):
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    counter = counter.to(torch.int64)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uint32(seed, counter: Tensor) -> Tensor:
    """First output word of Philox4x32-10 (``tl.randint``'s value); see :func:`philox4x32`."""
    return philox4x32(seed, counter)[0]


def seed_int64(seed) -> int:
    """A seed as the signed int64 carrying the same 64 bits :func:`philox_uint32` keys on
    (``seed & (2⁶⁴ − 1)`` in two's complement): what int64 op schemas, Triton (which types ints
    past int64 as uint64) and int64 tensors take."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# Mask definition v2: one Philox call draws 8 elements (16 bits each), so a kernel spends ~1/8
# of a Philox4x32-10 evaluation (~60-70 integer instructions on sm_90) per element instead of
# a whole one; v1 (one call and 24 bits per element) made the dropout shrink 8x longer in SASS.
# 16-bit thresholds keep the keep-rate within 2⁻¹⁶ of 1 − p (8-bit ones would move p = 0.05 to
# 0.0508).
KEEP_BITS = 16
KEEP_GROUP = 8  # elements per Philox call: 4 words × 2 halves


def keep_threshold(p: float) -> int:
    """``ceil(p·2¹⁶)``: an element is kept iff its 16 random bits are ≥ this, i.e. iff
    ``bits·2⁻¹⁶ ≥ p`` (exact: p·2¹⁶ is exact in float64)."""
    return int(math.ceil(float(p) * 65536.0))


def keep_groups(cols: int) -> int:
    """Philox counters per mask row: ``ceil(cols / 8)``."""
    return (int(cols) + KEEP_GROUP - 1) // KEEP_GROUP


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None,
                      row_offset: int = 0) -> Tensor:
    """Boolean keep-mask ``[rows, cols]`` for dropout probability ``p`` (definition v2).

    Element (m, k), with ``G = ceil(cols/8)``, ``g = (m + row_offset)·G + k // 8`` and
    ``j = k % 8``: ``v = (philox4x32_10(seed, g)[j // 2] >> (16·(j % 2))) & 0xFFFF`` and the
    element is kept iff ``v >= ceil(p·2¹⁶)``. Every backend evaluates this expression, so a mask
    never has to be stored between forward and backward; a kernel holding a tile whose first
    column is a multiple of 8 draws one Philox call per 8 elements.
    """
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return dropout_keep_bits(seed, rows, cols, device, row_offset) >= keep_threshold(p)


def dropout_keep_bits(seed: int, rows: int, cols: int, device=None, row_offset: int = 0) -> Tensor:
    """The 16-bit values ``v`` of :func:`dropout_keep_mask` (int64 ``[rows, cols]``): the mask for
    any ``p`` is ``v >= keep_threshold(p)``, so rows may use different ``p`` over one draw."""
    groups = keep_groups(cols)
    m = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    g = m[:, None] * groups + torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    words = torch.stack(philox4x32(seed, g), dim=-1)                  # [rows, G, 4]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)       # [rows, G, 4, 2]: j = 2w+h
    return halves.reshape(rows, groups * KEEP_GROUP)[:, :cols]


# Packed keep-mask (issue #13 item 4): the forward, which draws the mask anyway, writes one bit
# per element of x, and the backward reads the bits instead of redrawing Philox (~7.5 integer
# instructions per element on sm_90 for the draw alone). Layout: uint8 ``[rows, ceil(cols/8)]``,
# byte ``(m, g)`` bit ``j`` (LSB first) = keep of element ``(m, 8g + j)``, bits past ``cols`` 0.
# One byte is exactly one Philox call's 8 elements (word ``j // 2``, half ``j % 2``), so a
# kernel packs a call's 8 compares into its byte with no data movement; M·K/8 bytes = 1/16 of
# a bf16 x.
def pack_keep_bits(keep: Tensor) -> Tensor:
    """uint8 ``[rows, ceil(cols/8)]`` of a bool keep-mask ``[rows, cols]`` (bit j of byte g =
    column 8g + j, LSB first; padding bits 0)."""
    rows, cols = keep.shape
    groups = keep_groups(cols)
    padded = torch.zeros(rows, groups * KEEP_GROUP, dtype=torch.uint8, device=keep.device)
    padded[:, :cols] = keep
    lanes = padded.view(rows, groups, KEEP_GROUP)
    # uint8 shifts and ors, 8 passes over M·K/8 bytes: 29 -> 2 ms against int64 weights·sum
    # at 2048x1024 (1 thread, this box); the compiled CPU redraw is ~20 ms.
    out = lanes[..., 0].clone()
    for j in range(1, KEEP_GROUP):
        out |= lanes[..., j] << j
    return out


def unpack_keep_bits(bits: Tensor, cols: int) -> Tensor:
    """The bool keep-mask ``[rows, cols]`` of packed ``bits`` (:func:`pack_keep_bits`)."""
    rows = bits.shape[0]
    shifts = torch.arange(KEEP_GROUP, dtype=torch.uint8, device=bits.device)
    lanes = (bits[:, :, None] >> shifts) & 1                                # [rows, G, 8]
    return lanes.reshape(rows, -1)[:, :cols].bool()


def dropout_keep_packed(seed: int, rows: int, cols: int, p: float, device=None,
                        row_offset: int = 0) -> Tensor:
    """:func:`dropout_keep_mask` packed by :func:`pack_keep_bits` (uint8 ``[rows, ceil(cols/8)]``)."""
    return pack_keep_bits(dropout_keep_mask(seed, rows, cols, p, device, row_offset))


def check_keep_bits(keep_bits: Tensor, rows: int, cols: int, device) -> None:
    """A packed mask handed to a kernel: uint8, contiguous ``[rows, ceil(cols/8)]`` on ``device``."""
    if not isinstance(keep_bits, Tensor):
        raise TypeError(f"keep_bits must be a Tensor, got {type(keep_bits).__name__}")
    want = (rows, keep_groups(cols))
    if keep_bits.dtype != torch.uint8 or tuple(keep_bits.shape) != want:
        raise ValueError(f"keep_bits must be uint8 {list(want)}, got {keep_bits.dtype} "
                         f"{list(keep_bits.shape)}")
    if not keep_bits.is_contiguous() or keep_bits.device != torch.device(device):
        raise ValueError(f"keep_bits must be contiguous on {device}, got "
                         f"{'non-contiguous' if not keep_bits.is_contiguous() else keep_bits.device}")


def token_keep_mask(seed: int, adapter_ids: Tensor, cols: int, dropout_p: Sequence[float]) -> Tensor:
    """Keep-mask ``[T, cols]`` of a heterogeneous batch: one draw over the ``[T, cols]`` grid
    (:func:`dropout_keep_bits`), row ``t`` thresholded with the ``p`` of its slot
    ``adapter_ids[t]`` (``dropout_p[slot]``); rows of ``-1`` tokens keep everything."""
    thresholds = torch.tensor([keep_threshold(p) for p in dropout_p] + [0], dtype=torch.int64,
                              device=adapter_ids.device)
    ids = adapter_ids.to(torch.int64)
    row_thr = thresholds[torch.where(ids < 0, len(dropout_p), ids)]
    bits = dropout_keep_bits(seed, ids.shape[0], cols, adapter_ids.device)
    return bits >= row_thr[:, None]


def keep_like(x: Tensor, seed: int, p: float, keep_mask=None) -> Optional[Tensor]:
    """The keep-mask over the ``[rows, cols]`` grid of 2-D ``x``; None when ``p <= 0``.
    ``keep_mask`` replaces :func:`dropout_keep_mask` by an equal but faster generator."""
    if p <= 0.0:
        return None
    return (keep_mask or dropout_keep_mask)(seed, x.shape[0], x.shape[1], p, device=x.device)


def apply_keep(x: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    """``x ∘ keep / (1 − p)``; ``x`` itself when ``keep`` is None (no dropout)."""
    if keep is None:
        return x
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def apply_dropout(x: Tensor, seed: int, p: float, keep_mask=None) -> Tensor:
    """``x ∘ keep / (1 − p)`` with the counter-based mask over the rows of 2-D ``x``.
    ``keep_mask`` replaces :func:`dropout_keep_mask` by an equal but faster generator."""
    return apply_keep(x, keep_like(x, seed, p, keep_mask), p)


# --------------------------------------------------------------------------------------------
# Oracle: single adapter
# --------------------------------------------------------------------------------------------
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` for ``x [..., K]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.t()
    if bias is not None:
        y = y + bias
    xd = apply_dropout(x2, seed, dropout_p)
    y = y + scaling * ((xd @ lora_a.t()) @ lora_b.t())
    return y.reshape(*lead, weight.shape[0])


def packed_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                       lora_b: Tensor, out_slices: Sequence[int], lora_slices: Sequence[bool],
                       scaling: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """Packed projection (GPT-2 ``c_attn``, fused qkv) with LoRA on some output slices only.

    ``weight [sum(out_slices), K]``; ``lora_a [n_adapted·r, K]`` (one ``[r, K]`` block per adapted
    slice, in order); ``lora_b [sum of adapted widths, r]``. Slice j gets
    ``s·(drop(x)·A_jᵀ)·B_jᵀ`` if ``lora_slices[j]``, nothing otherwise.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.t()
    if bias is not None:
        y = y + bias
    n_adapted = sum(bool(f) for f in lora_slices)
    r = lora_a.shape[0] // max(n_adapted, 1)
    xd = apply_dropout(x2, seed, dropout_p)
    parts, col, brow, group = [], 0, 0, 0
    for width, adapted in zip(out_slices, lora_slices):
        part = y[:, col:col + width]
        if adapted:
            a_j = lora_a[group * r:(group + 1) * r]
            b_j = lora_b[brow:brow + width]
            part = part + scaling * ((xd @ a_j.t()) @ b_j.t())
            brow += width
            group += 1
        parts.append(part)
        col += width
    return torch.cat(parts, dim=1).reshape(*lead, weight.shape[0])


# --------------------------------------------------------------------------------------------
# Oracle: heterogeneous multi-adapter batches
# --------------------------------------------------------------------------------------------
def _rank_of(ranks: Optional[Tensor], slot: int, slice_idx: int, r_max: int) -> int:
    if ranks is None:
        return r_max
    if ranks.dim() == 1:
        return int(ranks[slot])
    return int(ranks[slot, slice_idx])


def _slice_bounds(out_slices: Optional[Sequence[int]], n: int) -> list[tuple[int, int]]:
    widths = list(out_slices) if out_slices is not None else [n]
    bounds, start = [], 0
    for w in widths:
        bounds.append((start, start + w))
        start += w
    return bounds


def lora_shrink(x: Tensor, lora_a: Tensor, adapter_ids: Tensor, scalings: Optional[Tensor] = None,
                ranks: Optional[Tensor] = None, n_slices: int = 1) -> Tensor:
    """``xa[t] = s_i · x[t]·A_iᵀ`` with ``i = adapter_ids[t]``; zero rows where ``i = −1``.

    ``lora_a [S, n_slices·R, K]`` → ``xa [T, n_slices·R]``. Rank rows at or past ``ranks[i]``
    (per slice when ``ranks`` is ``[S, n_slices]``) contribute zero. Output is at least fp32.
    """
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    T = x.shape[0]
    RR = lora_a.shape[1]
    R = RR // n_slices
    xa = torch.zeros(T, RR, dtype=out_dtype, device=x.device)
    for slot in torch.unique(adapter_ids).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(adapter_ids == slot).flatten()
        xs = x[rows].to(out_dtype)
        s = 1.0 if scalings is None else scalings[slot].to(out_dtype)
        for j in range(n_slices):
            rk = _rank_of(ranks, slot, j, R)
            if rk == 0:
                continue
            a = lora_a[slot, j * R:j * R + rk].to(out_dtype)
            xa[rows, j * R:j * R + rk] = s * (xs @ a.t())
    return xa


def lora_expand(y: Tensor, xa: Tensor, lora_b: Tensor, adapter_ids: Tensor,
                ranks: Optional[Tensor] = None, out_slices: Optional[Sequence[int]] = None) -> Tensor:
    """``y[t] += xa[t]·B_iᵀ`` in place, ``i = adapter_ids[t]``; rows with ``i = −1`` untouched.

    ``lora_b [S, N, R]``; with ``out_slices`` the output columns of slice j read
    ``xa[:, j·R : j·R + rank]``.
    """
    R = lora_b.shape[2]
    bounds = _slice_bounds(out_slices, lora_b.shape[1])
    acc = torch.promote_types(y.dtype, torch.float32)
    for slot in torch.unique(adapter_ids).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(adapter_ids == slot).flatten()
        for j, (c0, c1) in enumerate(bounds):
            rk = _rank_of(ranks, slot, j, R)
            if rk == 0:
                continue
            b = lora_b[slot, c0:c1, :rk].to(acc)
            delta = xa[rows, j * R:j * R + rk].to(acc) @ b.t()
            y[rows, c0:c1] = (y[rows, c0:c1].to(acc) + delta).to(y.dtype)
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                      lora_b: Tensor, adapter_ids: Tensor, scalings: Tensor,
                      ranks: Optional[Tensor] = None,
                      out_slices: Optional[Sequence[int]] = None,
                      dropout_p: Optional[Sequence[float]] = None, seed: int = 0) -> Tensor:
    """``y[t] = x[t]·Wᵀ + b + s_i·(drop_i(x[t])·A_iᵀ)·B_iᵀ``, base only where ``adapter_ids[t] = −1``.

    Differentiable (autograd) in every floating input. ``x [T, K]``. ``dropout_p``: one
    probability per slot (None = no dropout), drawn with :func:`token_keep_mask` from ``seed``.
    """
    keep = None
    if dropout_p is not None and any(p > 0.0 for p in dropout_p):
        keep = token_keep_mask(seed, adapter_ids, x.shape[1], dropout_p)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    R = lora_b.shape[2]
    bounds = _slice_bounds(out_slices, weight.shape[0])
    delta = torch.zeros_like(y)
    for slot in torch.unique(adapter_ids).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(adapter_ids == slot).flatten()
        xs = x[rows]
        if keep is not None and dropout_p[slot] > 0.0:
            xs = apply_keep(xs, keep[rows], dropout_p[slot])
        cols = []
        for j, (c0, c1) in enumerate(bounds):
            rk = _rank_of(ranks, slot, j, R)
            if rk == 0:
                cols.append(torch.zeros(len(rows), c1 - c0, dtype=y.dtype, device=y.device))
                continue
            a = lora_a[slot, j * R:j * R + rk]
            b = lora_b[slot, c0:c1, :rk]
            cols.append(scalings[slot] * ((xs @ a.t()) @ b.t()))
        delta = delta.index_put((rows,), torch.cat(cols, dim=1))
    return y + delta


# --------------------------------------------------------------------------------------------
# CPU kernels: single adapter, explicit forward/backward
# --------------------------------------------------------------------------------------------
SEED_MIN_ROWS = 1024  # below this many rows lora_linear_forward runs base-first (see there)


def lora_linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                        lora_b: Tensor, scaling: float, dropout_p: float = 0.0, seed: int = 0,
                        out: Optional[Tensor] = None, keep_mask=None, *,
                        keep_bits: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Forward for 2-D ``x [M, K]``: returns ``(y, xa)`` with ``xa = drop(x)·Aᵀ`` (saved for backward).
    ``keep_bits`` (uint8 ``[M, ceil(K/8)]``, with dropout): receives the packed mask
    (:func:`pack_keep_bits`) for the backward to read.

    The rank-r term seeds ``y`` (``bias + (s·xa)·Bᵀ``, a GEMM with inner size r) and the base
    GEMM then accumulates into it (``beta = 1``): LoRAFusion's "seed the accumulator" on CPU. y
    is written by the small GEMM and read once inside the big one instead of a separate
    read-modify-write pass after it. ``F.linear`` for the skinny GEMMs: measured on 2 cores
    (M=2048, K=N=1024, r=16) ``x @ A.t()`` takes 0.79 ms, ``F.linear(x, A)`` 0.58 ms, and the
    whole forward lands within ~2% of the bare ``F.linear`` (was 1.11x with addmm_ after).
    """
    keep = keep_like(x, seed, dropout_p, keep_mask)
    if keep_bits is not None and keep is not None:
        keep_bits.copy_(pack_keep_bits(keep))
    xd = apply_keep(x, keep, dropout_p)
    xa = F.linear(xd, lora_a)
    if out is None and x.shape[0] < SEED_MIN_ROWS:
        # Few rows: the seeding saves one pass over a small y, nothing measurable (base first
        # was as fast or faster at M=256, K=N=256). Base GEMM first, then the low-rank term, is
        # the order of multi_lora_forward (and of PEFT): a token then gets the same rounding
        # through the single- and the multi-adapter path, which PEFT's own tests compare with
        # allclose's default (fp32 ulp-level) tolerance.
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        y.addmm_(xa * scaling, lora_b.t())
        return y, xa
    if out is None:
        y = F.linear(xa * scaling, lora_b, bias)
    elif bias is not None:  # write the seed straight into out: no copy pass
        y = torch.addmm(bias, xa, lora_b.t(), alpha=scaling, out=out)
    else:
        y = torch.mm(xa * scaling, lora_b.t(), out=out)
    y.addmm_(x, weight.t())
    return y, xa


def lora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                         xa: Tensor, scaling: float, dropout_p: float, seed: int,
                         needs: Sequence[bool], keep_mask=None, *,
                         keep_bits: Optional[Tensor] = None) -> tuple[Optional[Tensor], ...]:
    """Gradients ``(dx, dweight, dbias, dlora_a, dlora_b)`` for ``needs`` in that order.

    ``dx = dy·W + drop'(s·(dy·B)·A)``; ``dA = s·(dy·B)ᵀ·drop(x)``; ``dB = s·dyᵀ·xa``. The only
    new intermediates are rank-sized (``s·dy·B`` and ``s·xa``, ``[M, r]``); the scaling is
    applied there, never to an M×K or M×N tensor, and the low-rank part of dx seeds the big
    GEMM's output as in the forward. ``keep_bits``: the forward's packed mask, read instead
    of redrawing it (same bits either way).
    """
    need_x, need_w, need_b, need_a, need_bb = needs
    dx = dw = db = da = dbb = None
    dybs = keep = None
    if need_x or need_a:
        dybs = (dy @ lora_b).mul_(scaling)  # s·dy·B, [M, r]
        # dx and dA drop on the same [M, K] grid: one mask for both (None without dropout).
        if keep_bits is not None and dropout_p > 0.0:
            keep = unpack_keep_bits(keep_bits, x.shape[1])
        else:
            keep = keep_like(x, seed, dropout_p, keep_mask)
    if need_x:
        dx = apply_keep(dybs @ lora_a, keep, dropout_p)
        dx.addmm_(dy, weight)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0)
    if need_a:
        xk = apply_keep(x, keep, dropout_p)
        # Large M: (xᵀ·dybs)ᵀ, 1.4 ms against 2.2 ms for dybsᵀ·x at M=2048, K=1024, r=16
        # (2 cores). Small M: the transposing copy dominates - dybsᵀ·x took 37 µs against
        # 185 µs at M=1 and 80 against 120 µs at M=256 (same box, 2 threads).
        da = dybs.t() @ xk if x.shape[0] < 1024 else (xk.t() @ dybs).t().contiguous()
    if need_bb:
        dbb = dy.t() @ (xa * scaling)
    return dx, dw, db, da, dbb


# --------------------------------------------------------------------------------------------
# CPU kernels: heterogeneous batches, grouped by adapter
# --------------------------------------------------------------------------------------------
def _rows(t: Tensor, rows) -> Tensor:
    # A slice is a contiguous run of tokens: a view, no gather copy.
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def multi_lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                       lora_b: Tensor, scalings: Sequence[float], groups: Sequence[tuple],
                       ranks: Optional[Sequence] = None, out_slices: Optional[Sequence[int]] = None,
                       need_xa: bool = False, keep: Optional[Tensor] = None,
                       dropout_p: Optional[Sequence[float]] = None
                       ) -> tuple[Tensor, Optional[Tensor]]:
    """Forward grouped by adapter: one base GEMM, then per group two small GEMMs — no per-token
    Python loop.

    ``groups``: ``(slot, rows)`` where ``rows`` is a token-index tensor (gathered, then
    ``index_add_``-ed back) or a ``slice`` for a contiguous run of tokens (views; the expand
    accumulates straight into ``y`` with ``addmm_``, no temporary). A slot may appear in several
    groups. ``ranks``: host-side ranks (``ranks[slot]`` an int or per-slice list), None = R.
    Returns ``(y, xa)``; ``xa [T, n_slices·R]`` (scaled shrink output, ≥ fp32) only if ``need_xa``.
    Dropout: ``keep [T, K]`` (:func:`token_keep_mask`) and host ``dropout_p[slot]``; the LoRA
    branch of a group reads ``drop(x[G])``, the base GEMM plain ``x``.
    """
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    R = lora_b.shape[2]
    bounds = _slice_bounds(out_slices, weight.shape[0])
    xa = None
    if need_xa:
        xa = x.new_zeros(x.shape[0], len(bounds) * R, dtype=torch.promote_types(x.dtype, torch.float32))
    for slot, rows in groups:
        xs = _dropped_rows(x, rows, keep, dropout_p, slot)
        s = float(scalings[slot])
        rks = _host_ranks(ranks, slot, len(bounds), R)
        delta = None
        for j, (c0, c1) in enumerate(bounds):
            rk = rks[j]
            if rk == 0:
                continue
            u = (xs @ lora_a[slot, j * R:j * R + rk].t()) * s  # [G, rk], scaled
            if xa is not None:
                xa[rows, j * R:j * R + rk] = u.to(xa.dtype)
            b = lora_b[slot, c0:c1, :rk].t()
            if isinstance(rows, slice):
                y[rows, c0:c1].addmm_(u, b)
            elif len(bounds) == 1:
                delta = u @ b
            else:
                if delta is None:
                    delta = xs.new_zeros(xs.shape[0], weight.shape[0])
                delta[:, c0:c1] = u @ b
        if delta is not None:
            y.index_add_(0, rows, delta)
    return y, xa


def _slot_p(dropout_p: Optional[Sequence[float]], slot: int) -> float:
    return 0.0 if dropout_p is None else float(dropout_p[slot])


def _dropped_rows(x: Tensor, rows, keep: Optional[Tensor], dropout_p, slot: int) -> Tensor:
    """``drop(x[rows])`` with slot ``slot``'s probability (``x[rows]`` without dropout)."""
    p = _slot_p(dropout_p, slot)
    if keep is None or p <= 0.0:
        return _rows(x, rows)
    return apply_keep(_rows(x, rows), _rows(keep, rows), p)


def _host_ranks(ranks, slot: int, n_slices: int, r_max: int) -> list[int]:
    if ranks is None:
        return [r_max] * n_slices
    rk = ranks[slot]
    return list(rk) if isinstance(rk, (list, tuple)) else [int(rk)] * n_slices


def multi_lora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                        scalings: Tensor, groups: Sequence[tuple[int, Tensor]],
                        needs: Sequence[bool], ranks: Optional[Sequence] = None,
                        out_slices: Optional[Sequence[int]] = None,
                        xa: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                        dropout_p: Optional[Sequence[float]] = None
                        ) -> tuple[Optional[Tensor], ...]:
    """Gradients ``(dx, dweight, dbias, dlora_a, dlora_b)``; dA/dB are zero for absent slots.
    ``groups`` as in :func:`multi_lora_forward` (index tensors or slices; a slot may repeat).

    Per active slot i with tokens G: ``u = dy[G]·B_i`` ``[|G|, r]``; ``dx[G] += s_i·u·A_i``;
    ``dA_i = s_i·uᵀ·x[G]``; ``dB_i = s_i·dy[G]ᵀ·(x[G]·A_iᵀ)``. Each slot's sums run over its own
    tokens in a fixed order: deterministic, no atomics. ``xa`` (the forward's scaled shrink
    output ``[T, n_slices·R]``) saves recomputing ``x[G]·A_iᵀ`` for dB. With dropout (``keep``,
    ``dropout_p`` as in :func:`multi_lora_forward`) the LoRA part of ``dx[G]`` is masked the same
    way and ``dA_i`` reads ``drop(x[G])``.
    """
    need_x, need_w, need_b, need_a, need_bb = needs
    dx = dy @ weight if need_x else None
    dw = dy.t() @ x if need_w else None
    db = dy.sum(0) if need_b else None
    da = torch.zeros_like(lora_a) if need_a else None
    dbb = torch.zeros_like(lora_b) if need_bb else None
    R = lora_b.shape[2]
    bounds = _slice_bounds(out_slices, weight.shape[0])
    for slot, rows in groups:
        s = float(scalings[slot])
        p = _slot_p(dropout_p, slot) if keep is not None else 0.0
        xs = _dropped_rows(x, rows, keep, dropout_p, slot)
        dys = _rows(dy, rows)
        rks = _host_ranks(ranks, slot, len(bounds), R)
        # A run of tokens accumulates straight into its rows of dx (a view); gathered tokens
        # (and dropped ones, which are masked first) sum their slices in dx_s, then one add.
        in_place = need_x and isinstance(rows, slice) and p <= 0.0
        dx_s = dx[rows] if in_place else None
        for j, (c0, c1) in enumerate(bounds):
            rk = rks[j]
            if rk == 0:
                continue
            a = lora_a[slot, j * R:j * R + rk]
            b = lora_b[slot, c0:c1, :rk]
            us = (dys[:, c0:c1] @ b).mul_(s)  # s·dy[G]·B_i, [G, rk]: the scaling goes here
            if need_x:
                if dx_s is None:
                    dx_s = us @ a
                else:
                    dx_s.addmm_(us, a)
            if need_a:
                da[slot, j * R:j * R + rk].addmm_(us.t(), xs)
            if need_bb:
                if xa is None:
                    xas = (xs @ a.t()) * s
                else:
                    xas = _rows(xa, rows)[:, j * R:j * R + rk].to(dys.dtype)
                dbb[slot, c0:c1, :rk] += dys[:, c0:c1].t() @ xas
        if dx_s is not None and not in_place:
            if p > 0.0:
                dx_s = apply_keep(dx_s, _rows(keep, rows), p)
            if isinstance(rows, slice):
                dx[rows] += dx_s
            else:
                dx.index_add_(0, rows, dx_s)
    return dx, dw, db, da, dbb


# --------------------------------------------------------------------------------------------
# Oracle: DoRA (weight-decomposed LoRA, Liu et al. 2024), PEFT's semantics
# --------------------------------------------------------------------------------------------
def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """``‖W0_n + s·(B·A)_n‖`` per output row n, the direct way (an N×K temporary), detached."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + scaling * (lora_b @ lora_a), dim=1)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                lora_b: Tensor, magnitude: Tensor, scaling: float = 1.0, dropout_p: float = 0.0,
                seed: int = 0, keep_mask=None) -> Tensor:
    """PEFT's ``use_dora=True`` linear, composed directly (autograd gives the gradients):

    ``y = x·W0ᵀ + b + (c − 1)⊙(drop(x)·W0ᵀ) + c⊙s·(drop(x)·Aᵀ)·Bᵀ``,
    ``c_n = m_n / ‖W0_n + s·(B·A)_n‖`` with the norm detached (paper §4.3, PEFT). Without
    dropout this is ``b + c⊙(x·W0ᵀ + s·(x·Aᵀ)·Bᵀ)``. With dropout PEFT (and the paper's code)
    feed the dropped input to the ``(c − 1)`` base term too, so two base products differ.
    ``keep_mask`` replaces :func:`dropout_keep_mask` (a backend's own generator).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    c = magnitude / dora_weight_norm(weight, lora_a, lora_b, scaling)
    xd = apply_dropout(x2, seed, dropout_p, keep_mask)
    base = x2 @ weight.t()
    base_d = base if dropout_p <= 0.0 else xd @ weight.t()
    y = base + (c - 1) * base_d + c * (scaling * ((xd @ lora_a.t()) @ lora_b.t()))
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


# ------------------------------------------------------------------------------------------
# Mixture-of-experts LoRA (one expert projection): the float64 oracle of ops.moe_lora
# ------------------------------------------------------------------------------------------
def moe_lora_linear_reference(x, expert_weight, topk_ids, lora_a, lora_b, scaling,
                              topk_weights=None):
    """Per (token, expert) pair ``y[t, j] = x_p·W_eᵀ + s·(x_p·A_eᵀ)·B_eᵀ`` with ``e =
    topk_ids[t, j]``, in float64, one pair at a time (the plainest statement of the math).

    ``x`` is ``[T, K]`` (every pair of token t reads row t: a gate/up projection) or
    ``[T, k, K]`` (pair (t, j) reads its own row: the down projection of the activated
    intermediate). Returns ``[T, k, N]``; with ``topk_weights [T, k]`` the gate-weighted sum
    over the k pairs, ``[T, N]`` (what a transformers MoE block adds to the residual)."""
    T, k = topk_ids.shape
    x64 = x.double()
    w64, a64, b64 = expert_weight.double(), lora_a.double(), lora_b.double()
    y = x64.new_zeros(T, k, expert_weight.shape[1])
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            xp = x64[t] if x.dim() == 2 else x64[t, j]
            y[t, j] = xp @ w64[e].t() + scaling * ((xp @ a64[e].t()) @ b64[e].t())
    if topk_weights is None:
        return y
    return (y * topk_weights.double()[..., None]).sum(1)


def moe_multi_lora_linear_reference(x, expert_weight, topk_ids, lora_a, lora_b, adapter_ids,
                                    scalings, topk_weights=None):
    """Multi-adapter MoE-LoRA in float64: token t uses adapter slot ``adapter_ids[t]`` (-1:
    base experts only), ``lora_a [S, E, r, K]``, ``lora_b [S, E, N, r]``, ``scalings [S]``;
    otherwise :func:`moe_lora_linear_reference`."""
    T, k = topk_ids.shape
    x64 = x.double()
    w64, a64, b64 = expert_weight.double(), lora_a.double(), lora_b.double()
    y = x64.new_zeros(T, k, expert_weight.shape[1])
    for t in range(T):
        slot = int(adapter_ids[t])
        for j in range(k):
            e = int(topk_ids[t, j])
            xp = x64[t] if x.dim() == 2 else x64[t, j]
            y[t, j] = xp @ w64[e].t()
            if slot >= 0:
                y[t, j] += float(scalings[slot]) * ((xp @ a64[slot, e].t()) @ b64[slot, e].t())
    if topk_weights is None:
        return y
    return (y * topk_weights.double()[..., None]).sum(1)
