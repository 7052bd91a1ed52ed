"""Triton backend of the fused single-adapter LoRA linear (docs/BACKENDS.md, "Single adapter").

Forward ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``: one fused GEMM writes y once (fused_gemm.py);
the rank-sized ``xa = drop(x)·Aᵀ`` comes from the GEMM's own K loop (``IN_LOOP``), from K-slice
shares the persistent programs make one wave ahead (``PANEL``), or from a shrink kernel that
reads x once before it (``SEEDED``, dropout), see :func:`lora_mode`.

Backward, with ``dyb = dY·B`` ``[M, r]`` the only new intermediate:

* ``dX = dY·W + mask∘(s·dyb·A)/(1−p)``: the same fused GEMM on ``Wᵀ``/``Aᵀ`` views — no M×K
  temporary besides dX. At large M without dropout (:func:`forward_mode` = PANEL) dyb and
  dB are made by that GEMM from its panel shares and written out, so dY is read once;
  otherwise a shrink makes dyb and the (masked) term seeds the accumulator;
* ``dA = s·dybᵀ·drop(x)`` and ``dB = s·dYᵀ·xa``: reductions over M into rank-sized outputs
  (lowrank.py), deterministic;
* ``dW = dYᵀ·x`` (only when W requires grad): the fused GEMM on transposed views, no LoRA;
  ``db = Σ dY`` by ``torch.sum`` (fp32 accumulate; a column sum has nothing to fuse with).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lora_kernels.triton import configs as C
from lora_kernels.triton.device import on_device
from lora_kernels.triton.dropout import dropout_keep_mask, dropout_keep_packed
from lora_kernels.triton.fused_gemm import fused_gemm
from lora_kernels.triton.gemm.modes import LoraMode
from lora_kernels.triton.lowrank import reduce_rows, shrink

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "dropout_keep_mask", "forward_mode"]

# M at or below which the GEMM takes the decode path (16-row tiles, split-K); a module global
# so tests can move it.
SMALL_M_MAX = C.DECODE_MAX_ROWS
# IN_LOOP (u accumulated in the GEMM's K loop) costs ≈ r/BLOCK_N extra MMA work once the GEMM
# is compute bound; SEEDED costs a separate launch plus one read of x (M·K·2 bytes). On H100
# (≈700 dense bf16 TFLOP/s, ≈3 TB/s), K = N = 4096, BLOCK_N = 128 the two break even near
# M·r ≈ 15k (r=16: M ≈ 940; r=64: M ≈ 140), hence this bound. Below it the GEMM is also
# bandwidth bound on W, where the extra MMA work is free. Prediction, to be re-measured.
FUSED_SHRINK_MAX_MR = 16384
# The in-loop u accumulator lives in registers next to the main one: ranks above 64 go to SEEDED.
FUSED_SHRINK_MAX_R = 64



def lora_mode(m: int, r: int, dropout_p: float) -> LoraMode:
    """``LoraMode.SEEDED`` (1) = precomputed shrink + seeded accumulator, ``LoraMode.IN_LOOP``
    (2) = shrink fused in the GEMM's K loop.

    :func:`forward_mode` replaces the large-M SEEDED case without dropout by
    ``LoraMode.PANEL`` (4): on the persistent schedule x·Aᵀ is made as K-slice shares one
    wave ahead (gemm/panel.py: no extra pass over x, ≈ 0.4% + the first wave's in-loop
    work); elsewhere (tiles schedule, CPU) it runs as IN_LOOP.

    Dropout always takes mode 1: mode 2 would redraw the Philox mask of every x tile in every
    N-tile program (N/BLOCK_N times), ~60 integer ops per element on the CUDA cores — far
    more than the one draw per element the shrink kernel makes. The panel mode is kept off
    for p > 0 as well: its shares would draw each mask element once (like the shrink), but a
    tile that falls back (every first-wave tile) would draw the mask on every x tile of its
    K loop and keep a masked copy of the tile next to the unmasked one the main GEMM needs
    (registers are already at the in-loop cap), and the shrink is where the forward's
    dropout mask is made for the backward (the packed-mask work of helper ``mask``).
    """
    if dropout_p > 0.0 or r > FUSED_SHRINK_MAX_R:
        return LoraMode.SEEDED
    if m <= SMALL_M_MAX or m * r <= FUSED_SHRINK_MAX_MR:
        return LoraMode.IN_LOOP
    return LoraMode.SEEDED


def forward_mode(m: int, r: int, dropout_p: float) -> LoraMode:
    """:func:`lora_mode`, with the large-M no-dropout SEEDED case taken by ``LoraMode.PANEL``
    (the single-adapter forward; dora.py / quant_lora.py keep lora_mode until they are
    measured with it)."""
    mode = lora_mode(m, r, dropout_p)
    if mode == LoraMode.SEEDED and dropout_p == 0.0 and r <= FUSED_SHRINK_MAX_R:
        return LoraMode.PANEL
    return mode


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    dropout_p: float, seed: int, out: Optional[torch.Tensor] = None,
                    *, mode: Optional[int] = None, config: Optional[dict] = None,
                    keep_bits: Optional[torch.Tensor] = None):
    """``(y [M, N], xa [M, r])``; ``mode``/``config`` force a path (tests, benchmarks).
    ``keep_bits`` (uint8 ``[M, ceil(K/8)]``, with dropout) receives the packed mask."""
    with on_device(x):
        return _fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, out, mode, config,
                    keep_bits)


def _fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, out, mode, config,
         keep_bits=None):
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    xa = torch.empty(M, r, dtype=x.dtype, device=x.device)
    if K == 0 or N == 0:  # degenerate: nothing for a kernel to do
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros((), dtype=x.dtype))
        _write_bits_apart(keep_bits, seed, dropout_p, K)
        return y, xa.zero_()
    mode = forward_mode(M, r, dropout_p) if mode is None else mode
    if r == 0:
        fused_gemm(x, weight, y, bias=bias, small_m_max=SMALL_M_MAX, config=config)
        _write_bits_apart(keep_bits, seed, dropout_p, K)
    elif mode == LoraMode.SEEDED:
        shrink(x, lora_a, xa, dropout_p, seed, keep_bits)
        fused_gemm(x, weight, y, bias=bias, lora=LoraMode.SEEDED, u=xa, lb=lora_b, scaling=scaling,
                   small_m_max=SMALL_M_MAX, config=config)
    else:  # IN_LOOP or PANEL: u (= xa) is made in the GEMM and written out
        fused_gemm(x, weight, y, bias=bias, lora=LoraMode(mode), u=xa, la=lora_a, lb=lora_b,
                   scaling=scaling, small_m_max=SMALL_M_MAX, config=config)
        _write_bits_apart(keep_bits, seed, dropout_p, K)  # only a forced mode reaches this
    return y, xa


def _write_bits_apart(keep_bits, seed, dropout_p, cols):
    """The packed mask where no shrink draws it (degenerate shapes, a forced in-loop mode)."""
    if keep_bits is not None and dropout_p > 0.0 and keep_bits.numel():
        keep_bits.copy_(dropout_keep_packed(seed, keep_bits.shape[0], cols,
                                            dropout_p, keep_bits.device))


def _degenerate_bwd(dy, x, weight, lora_a, lora_b, needs):
    """K, N or r is 0: nothing worth a kernel. Every low-rank product is then empty or zero
    (dyb = dY·B and xa are [M, 0], or dY is [M, 0], or x is [M, 0]), so dA and dB are zeros
    and no dropout mask is needed."""
    need_x, need_w, need_b, need_a, need_bb = (bool(n) for n in needs)
    return (dy @ weight.to(dy.dtype) if need_x else None,
            (dy.t() @ x).to(weight.dtype) if need_w else None,
            dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None,
            torch.zeros_like(lora_a) if need_a else None,
            torch.zeros_like(lora_b) if need_bb else None)


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor,
                    scaling: float, dropout_p: float, seed: int, needs: Sequence[bool],
                    *, config: Optional[dict] = None, keep_bits: Optional[torch.Tensor] = None):
    """``(dx, dweight, dbias, dlora_a, dlora_b)``, ``None`` where ``needs`` is False.
    ``keep_bits``: the forward's packed mask, read by the dX epilogue and dA (else redrawn)."""
    with on_device(x):
        return _bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, config,
                    keep_bits)


def _bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, needs, config,
         keep_bits=None):
    need_x, need_w, need_b, need_a, need_bb = (bool(n) for n in needs)
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    dx = dw = db = da = dbb = None
    if K == 0 or N == 0 or r == 0:
        return _degenerate_bwd(dy, x, weight, lora_a, lora_b, needs)
    dyb = None
    # dyb = dY·B is a reduction over the dX GEMM's own K loop (N): at large M the panel mode
    # makes it (K-slice shares) and writes it out, with dB from the same dY tiles, so dY is
    # read once. The dX mask is on dX's own (m, k) grid and applies to the low-rank tile alone
    # (the panel epilogue masks it apart), so this holds at p > 0 too — given the forward's
    # packed bits: the Philox redraw in that epilogue is a form bench/sass_report.py does not
    # vouch for (the bits form compiles spill-free at 255 registers). Everything else: the
    # shrink + the seeded epilogue. Not the small-M in-loop dX: it runs split-K, whose slabs
    # each add their share of s·dyb·A — with an inf in A, ±inf shares of one element meet as
    # NaN where the reference (dyb complete first) has ±inf (tests/test_numerics_edges.py).
    dx_mode = (forward_mode(M, r, 0.0) if need_x and (dropout_p == 0.0 or keep_bits is not None)
               else LoraMode.SEEDED)
    if dx_mode != LoraMode.PANEL:
        dx_mode = LoraMode.SEEDED
    if need_a or need_x:
        dyb = torch.empty(M, r, dtype=dy.dtype, device=dy.device)
    if dx_mode == LoraMode.SEEDED and (need_x or need_a):
        # dyb = dY·B: the shrink kernel with Bᵀ (a [r, N] view) as its "A".
        shrink(dy, lora_b.t(), dyb)
    if need_x:
        dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
        # dX[M, K] = dY[M, N]·W[N, K]: the kernel's "w" is Wᵀ (a [K, N] view), its low-rank
        # "lb" is Aᵀ (a [K, r] view), its "la" Bᵀ ([r, N]); the dropout mask is drawn on dX's
        # own (m, k) grid.
        if dx_mode == LoraMode.SEEDED:
            fused_gemm(dy, weight.t(), dx, lora=LoraMode.SEEDED, u=dyb, lb=lora_a.t(),
                       scaling=scaling, dropout_p=dropout_p, seed=seed,
                       small_m_max=SMALL_M_MAX, config=config, keep_bits=keep_bits)
        else:  # + dB = s·dYᵀ·xa from the dY tiles the panel shares load (fused_gemm doc)
            dbb = torch.empty_like(lora_b) if need_bb else None
            fused_gemm(dy, weight.t(), dx, lora=dx_mode, u=dyb, la=lora_b.t(), lb=lora_a.t(),
                       scaling=scaling, dropout_p=dropout_p, seed=seed,
                       small_m_max=SMALL_M_MAX, config=config, keep_bits=keep_bits,
                       db_out=dbb, db_u=xa if need_bb else None)
    if need_a:
        da = torch.empty_like(lora_a)
        # dAᵀ [K, r] = s·drop(x)ᵀ·dyb: K on the big (MMA-row) side, written through a view.
        reduce_rows(x, dyb, da.t(), scaling, dropout_p, seed, keep_bits)
    if need_bb and dbb is None:
        dbb = torch.empty_like(lora_b)
        reduce_rows(dy, xa, dbb, scaling)
    if need_w:
        dw = torch.empty_like(weight)
        # dW[N, K] = dYᵀ[N, M]·x[M, K]: the kernel's "a" is dYᵀ and its "w" is xᵀ ([K, M]).
        fused_gemm(dy.t(), x.t(), dw, small_m_max=SMALL_M_MAX)
    if need_b:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, da, dbb
