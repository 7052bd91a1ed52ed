"""Roofline of every headline op: the minimal bytes and FLOPs, what the chosen kernels actually
move (from their launch plans), and predicted H100 / H200 times. Runs on any CPU.

For each op at the target shapes (bf16; single adapter M=8192, K=N=4096, r=16, with and
without dropout p=0.05, forward and forward+backward, and M=1 decode; multi-adapter decode
T=64 all distinct r=16 and prefill T=8192 over 64 adapters, K=N=4096; the FP8 forward with
per-token e4m3 activations, ``act_quant="e4m3_per_token"``) three launch plans:

* ``ours``  — the kernels ``backend="triton"`` launches today (lora_kernels/triton/*.py: the
  launchers' own choices — ``lora_mode``, the shrink/reduce configs, the multi-adapter
  ``plan`` — are called, not copied, wherever they are pure host code);
* ``floor`` — the cuBLAS composition (lora_kernels/ops/cublas_backend.py, Unsloth's layout);
* ``bare``  — the base GEMM(s) alone (the denominator of every target).

Each launch is one row of a small per-kernel table (:class:`Launch`): tensor-core FLOPs as
issued (tile padding included), HBM bytes read and written (each tensor once per launch: the
L2 absorbs the re-reads inside one launch, which the ``l2`` column counts separately), and
CUDA-core integer ops (the dropout mask: one Philox4x32-10 call ≈ ``PHILOX_OPS`` instructions
per 8 elements under mask v2, plus ``MASK_OPS_PER_ELEM`` to pick, compare and select).

Time of a launch = max(FLOPs / matrix rate, bytes / bandwidth, int ops / integer rate); an op
= the sum over its launches + ``LAUNCH_GAP_US`` between dependent launches. These are
**predictions**: the rates are the datasheet's (H100) or measured once on this workplace's
H200 (KINDS.md), and a real GEMM reaches 75-90 % of them, so the *ratios* to the bare GEMM are
the figures to hold the first GPU run to.

    python bench/roofline.py [--json out.json] [--device H100|H200]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # roofline_quant.py, beside this file
# roofline_quant imports its pieces from "roofline": run as a script this module is __main__,
# so it is registered under that name too (one module, not a second copy).
sys.modules.setdefault("roofline", sys.modules[__name__])

MiB = 1 << 20
E = 2                      # bf16 bytes
SMS = 132                  # H100 SXM and H200: 132 SMs
PHILOX_OPS = 70            # integer instructions per Philox4x32-10 call (10 rounds, sm_90 SASS)
MASK_OPS_PER_ELEM = 3      # extract the 16-bit half, compare, select
BITS_READ_OPS = 3.8        # per element: the packed keep bits spread in the dX epilogue (sass_report)
LAUNCH_GAP_US = 1.5        # between two dependent launches on one stream (eager, warm)
# e4m3 wgmma issues at twice the bf16 rate (H100 datasheet: 1979 vs 989 TFLOP/s dense); not
# measured on this workplace's H200, where only the bf16 rate was.
FP8_RATE = 2.0

# Rates: matrix bf16 dense (TFLOP/s), HBM (TB/s, read + write), CUDA-core int32 (Tops/s:
# 132 SMs × 64 INT32 lanes × ~1.98 GHz).
DEVICES = {
    "H100": dict(tflops=989.0, tbs=3.35, int_tops=16.7, source="datasheet (SXM5 80 GB)"),
    "H200": dict(tflops=790.0, tbs=4.3, int_tops=16.7,
                 source="measured here: 8192³ bf16 GEMM ~790 TFLOP/s, D2D copy ~4.3 TB/s"),
}
# Instruction issue (thread-instructions / s) for CUDA-core kernels: 132 SMs × 4 schedulers ×
# 32 lanes × ~1.75 GHz sustained (Tops/s).
ISSUE_TOPS = 132 * 128 * 1.75e9 / 1e12

TARGETS = {  # the issue's targets (ratio of ours to bare), for the report
    "fwd": 1.05, "fwd+bwd": 1.10, "fwd+bwd p=0.05": 1.15, "decode M=1": 1.2,
    "nf4 decode M=1": 0.4,  # issue #16: ≥ 2.5× faster than the bf16 GEMV
    "prefill T=8192 64 adapters": 1.10, "fwd fp8 act_quant": 0.65,
}


@dataclass
class Launch:
    kernel: str
    flops: float = 0.0     # tensor-core FLOPs issued
    read: float = 0.0      # HBM bytes read
    write: float = 0.0     # HBM bytes written
    int_ops: float = 0.0   # CUDA-core integer ops
    l2: float = 0.0        # re-reads served by L2 inside the launch (not counted in read)
    serial_int: bool = False  # the int ops run before the MMA main loop, not beside it
    flops_fp8: float = 0.0  # tensor-core FLOPs on e4m3 operands (FP8_RATE x the bf16 rate)
    sass: float = 0.0      # thread-instructions issued beside the MMA (the NF4 slab / in-mainloop
    #                        decodes: static SASS counts), at the clock the MMA rate implies
    issue: float = 0.0     # thread-instructions of a kernel with no MMA (the NF4 decode GEMV), at
    #                        ISSUE_TOPS (no tensor-core power draw: a higher sustained clock)

    def seconds(self, dev) -> float:
        mma = (self.flops + self.flops_fp8 / FP8_RATE) / (dev["tflops"] * 1e12)
        mem = (self.read + self.write) / (dev["tbs"] * 1e12)
        alu = self.int_ops / (dev["int_tops"] * 1e12)
        issue = self.sass / issue_rate(dev) + self.issue / (ISSUE_TOPS * 1e12)
        return max(mma, mem) + alu if self.serial_int else max(mma, mem, alu, issue)


def issue_rate(dev) -> float:
    """Thread-instructions per second: 4 schedulers × 32 lanes per SM per clock, at the clock
    the matrix rate implies (4096 dense bf16 FLOP per SM per clock: H100 1.83 GHz, the H200's
    measured 790 TFLOP/s 1.46 GHz), so issue and MMA time scale together."""
    return SMS * 128 * dev["tflops"] * 1e12 / (SMS * 4096)


def mask_ops(elems: float) -> float:
    """Integer ops to draw the v2 dropout mask over ``elems`` elements once."""
    return elems * (PHILOX_OPS / 8 + MASK_OPS_PER_ELEM)


def pad(n: int, b: int) -> int:
    return -(-n // b) * b


# ---------------------------------------------------------------------------------------------
# What the launchers choose (called, not copied, where it is pure host code)
# ---------------------------------------------------------------------------------------------
def _triton_choices():
    """The launchers' host-side choices, or None if lora_kernels.triton does not import here."""
    try:
        from lora_kernels.triton import configs as C
        from lora_kernels.triton import lora_linear as TL
        from lora_kernels.triton import multi_lora as ML
        return SimpleNamespace(C=C, TL=TL, ML=ML)
    except Exception:  # noqa: BLE001 - the roofline still prints with the documented defaults
        return None


CH = _triton_choices()


def rank_block(r: int) -> int:
    return CH.C.rank_block(r) if CH else min(max(16, 1 << (max(r, 1) - 1).bit_length()), 64)


def lora_mode(m: int, r: int, p: float) -> int:
    return CH.TL.lora_mode(m, r, p) if CH else (1 if p > 0 or m * r > 16384 and m > 16 else 2)


def forward_mode(m: int, r: int, p: float) -> int:
    """The single-adapter forward's (and the p = 0 dX's) mode: 4 = panel-shared x·Aᵀ."""
    if CH:
        return int(CH.TL.forward_mode(m, r, p))
    mode = lora_mode(m, r, p)
    return 4 if mode == 1 and p == 0 and r <= 64 else mode


def panel_tile() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, GROUP_M) of the panel mode: the first persistent config that the
    pruning keeps for it (bf16, descriptors; the in-loop fallback caps the accumulator)."""
    if not CH:
        return 128, 128, 8
    import torch
    kept = CH.C.prune_persistent(CH.C.GEMM_PERSISTENT, {"a_ptr": torch.empty(1, dtype=torch.bfloat16)},
                                 LORA=4, STORE=1)
    k = kept[0].kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["GROUP_M"]


def triton_panel_gemm(M, N, K, r, name, db=False) -> Launch:
    """fused_gemm LORA=4 (gemm/panel.py): x·Aᵀ as one K-slice share per tile, made one wave
    ahead; the D = P + GROUP_M·(NT − 1) first tiles (panels without producers) run the in-loop
    u instead (assumed: every later tile finds its panel ready — the GPU run counts hits)."""
    bm, bn, group = panel_tile()
    Mp, Np = pad(M, bm), pad(N, bn)
    br = rank_block(r)
    nt, tiles = Np // bn, (Mp // bm) * (Np // bn)
    d = min(tiles, SMS + group * (nt - 1))
    fallback = d / tiles
    flops = (2 * Mp * Np * K + 2 * Mp * Np * br          # main loop + the expand dot
             + 2 * Mp * K * br                           # the shares: x·Aᵀ once
             + fallback * nt * 2 * Mp * K * br)           # fallback tiles' in-loop u
    scratch = Mp * nt * br * 4 + Mp * br * 4              # fp32 shares + final u, written once
    read = (M * K + N * K + r * K + N * r) * E + scratch  # ... and read once (L2 mostly)
    write = M * N * E + M * r * E + scratch
    l2 = (nt - 1) * Mp * br * 4                           # final u re-read by each column tile
    if db:  # the dX form: dB partials aᵀ·xa [npm, K, BLOCK_R] fp32 from the shares' a tiles
        flops += 2 * Mp * K * br
        read += M * r * E
        write += (Mp // bm) * K * br * 4
    return Launch(name + f" [{bm}x{bn}, fallback {100 * fallback:.0f}% of tiles]", flops, read,
                  write, 0.0, l2)


def gemm_tile(m: int, dropout: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) assumed for the fused GEMM: the first config of its autotune list
    (the Hopper-sized one) that the dropout pruning keeps. The autotuner may pick another; at
    these shapes every candidate tiles M and N exactly, so only the L2 re-reads change."""
    if not CH:
        return (16, 32) if m <= 16 else (128, 256 if not dropout else 128)
    C = CH.C
    path = C.gemm_path(m, CH.TL.SMALL_M_MAX)
    cfgs = {"small": C.GEMM_SMALL, "medium": C.GEMM_MEDIUM, "large": C.GEMM_LARGE}[path]
    if dropout:
        cfgs = C.prune_dropout(cfgs, {}, DROPOUT=True)
    k = cfgs[0].kwargs
    return k["BLOCK_M"], k["BLOCK_N"]


def small_split(M: int, N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K) of the decode path: the first config ``prune_small`` keeps."""
    if not CH:
        return 32, 128, 2
    C = CH.C
    with mock.patch.object(C, "num_sms", lambda device: SMS):
        kept = C.prune_small(C.GEMM_SMALL, {"M": M, "N": N, "K": K,
                                            "a_ptr": SimpleNamespace(device=None)})
    k = kept[0].kwargs
    return k["BLOCK_N"], k["BLOCK_K"], k["SPLIT_K"]


def reduce_split(M: int, P: int, Q: int, dropout: bool) -> int:
    """M-splits of ``lowrank.reduce_rows`` (partials ``[split, P, Q]`` fp32 then summed)."""
    if CH:  # the GPU config, also when this process runs the interpreter (CI)
        with mock.patch.object(CH.C, "interpreting", lambda: False):
            cfg = CH.C.reduce_config(dropout)
    else:
        cfg = dict(BLOCK_P=128, BLOCK_M=32 if dropout else 64)
    bp, bm, bq = cfg["BLOCK_P"], cfg["BLOCK_M"], rank_block(Q)
    tiles = -(-P // bp) * -(-Q // bq)
    split = max(1, min(-(-2 * SMS // tiles), -(-M // (4 * bm))))
    rows = pad(-(-M // split), bm)
    return -(-M // rows)


def seg_plan(T: int, n_adapters: int, seg_len: int, K: int, N: int, R: int):
    """``multi_lora.plan`` for a batch of ``n_adapters`` equal segments (the real planner, with
    the device's SM count patched in)."""
    batch = SimpleNamespace(num_active=n_adapters, num_tokens=T, max_seg_len=seg_len, num_slots=n_adapters)
    if not CH:
        decode = seg_len <= 16
        return SimpleNamespace(block_m=16 if decode else 64, block_r=16, block_k=256 if decode else 64,
                               block_n=256 if decode else 128, split=16 if decode else 8, inline=False)
    with mock.patch.object(CH.C, "num_sms", lambda device: SMS):
        return CH.ML.plan(batch, K, N, R, 1, SimpleNamespace(type="cuda"), E)


def use_fused(T: int, n_adapters: int) -> bool:
    t = CH.ML.TUNING if CH else {"fused_min_tokens": 1024}
    return T >= t["fused_min_tokens"] and T >= 32 * n_adapters


# ---------------------------------------------------------------------------------------------
# Per-kernel tables: one Launch each
# ---------------------------------------------------------------------------------------------
def cublas_gemm(M, N, K, name="cublas GEMM", accumulate=False, extra_read=0.0) -> Launch:
    """``torch.mm``/``addmm``: out[M, N] = a[M, K]·b[K, N] (+ out when beta = 1)."""
    return Launch(name, 2 * M * N * K, (M * K + N * K) * E + (M * N * E if accumulate else 0) + extra_read,
                  M * N * E)


def elementwise(elems, reads, writes, name) -> Launch:
    """A torch elementwise pass: ``reads``/``writes`` = bytes per element."""
    return Launch(name, 0, elems * reads, elems * writes)


def triton_shrink(M, K, r, p, name="shrink (lowrank._shrink_kernel)") -> Launch:
    """u[M, r] = drop(x)·Aᵀ: one program per BLOCK_M rows streams its rows of x once."""
    return Launch(name, 2 * M * K * rank_block(r), (M * K + r * K) * E, M * r * E,
                  mask_ops(M * K) if p > 0 else 0.0)


def triton_fused_gemm(M, N, K, r, mode, p, name) -> Launch:
    """fused_gemm: out = a·wᵀ (+ s·u·lbᵀ seed, LORA=1 | + in-loop u, LORA=2), mask in the seed."""
    bm, bn = gemm_tile(M, p > 0)
    Mp, Np = pad(M, bm), pad(N, bn)
    br = rank_block(r)
    flops = 2 * Mp * Np * K + 2 * Mp * Np * br            # main loop + the low-rank dot
    l2 = (Np // bn - 1) * M * r * E                        # u re-read by every column tile
    if mode == 2:
        flops += (Np // bn) * 2 * Mp * K * br              # x·Aᵀ recomputed per column tile
        l2 = (Np // bn - 1) * r * K * E
    read = (M * K + N * K + M * r + N * r) * E
    write = M * N * E + (M * r * E if mode == 2 else 0)
    # The mask is drawn in the tile's prologue (the seed), before the main loop: at 1 CTA per
    # SM (200+ registers) nothing overlaps it, so it adds to the tile's time.
    return Launch(name, flops, read, write, mask_ops(M * N) if p > 0 else 0.0, l2, serial_int=p > 0)


def triton_decode_gemm(M, N, K, r, name="fused GEMM, decode split-K (LORA=2)") -> Launch:
    """The M ≤ 16 path: 16-row tiles, split-K into an fp32 workspace, LORA=2 (in-loop x·Aᵀ)."""
    bn, bk, split = small_split(M, N, K)
    br, Mp, Np = rank_block(r), pad(M, 16), pad(N, bn)
    flops = 2 * Mp * Np * K + (Np // bn) * 2 * Mp * K * br + 2 * Mp * Np * br
    ws = split * M * N * 4
    read = (M * K + N * K + r * K + N * r) * E + ws
    return Launch(name + f" [BLOCK_N={bn}, BLOCK_K={bk}, SPLIT_K={split}]", flops, read,
                  M * N * E + ws + M * r * E, 0.0, (Np // bn - 1) * r * K * E)


def triton_reduce(M, P, Q, p, name) -> list:
    """reduce_rows: out[P, Q] = drop(l)ᵀ·r over M, M split into fp32 partials, then
    ``torch.sum`` + ``copy_`` of the rank-sized partials (a second launch)."""
    split = reduce_split(M, P, Q, p > 0)
    part = split * P * Q * 4 if split > 1 else 0
    main = Launch(name + f" [M split {split}]", 2 * M * P * rank_block(Q), (M * P + M * Q) * E,
                  P * Q * E if split == 1 else part, mask_ops(M * P) if p > 0 else 0.0)
    return [main] + ([Launch("sum of the partials (torch)", 0, part, P * Q * E)] if split > 1 else [])


def triton_mask(M, K) -> Launch:
    """dropout_keep_mask: the v2 mask written as a bool tensor (the floor needs it stored)."""
    return Launch("dropout mask (bool tensor)", 0, 0, M * K, mask_ops(M * K))


def sgmv_shrink(T, K, A, R, cfg) -> Launch:
    """sgmv._shrink_kernel: BLOCK_M-row tiles per segment, K split into fp32 partial planes."""
    tiles = A * max(1, -(-T // A // cfg.block_m))
    return Launch(f"segment shrink [BLOCK_M={cfg.block_m}, split {cfg.split}]",
                  2 * tiles * cfg.block_m * pad(R, cfg.block_r) * K, (T * K + A * R * K) * E,
                  cfg.split * T * R * 4)


def sgmv_expand(T, N, A, R, cfg) -> Launch:
    """sgmv._expand_kernel: y[t] += Σ planes · B_iᵀ, read-modify-write of y."""
    tiles = A * max(1, -(-T // A // cfg.block_m))
    ntile = -(-N // cfg.block_n)
    return Launch(f"segment expand [BLOCK_N={cfg.block_n}]", 2 * tiles * cfg.block_m * N * pad(R, cfg.block_r),
                  cfg.split * T * R * 4 + A * N * R * E + T * N * E, T * N * E,
                  0.0, (ntile - 1) * cfg.split * T * R * 4)


def multi_fused(T, N, K, A, R) -> Launch:
    """multi_fused._fused_kernel: base GEMM over sorted tokens + one epilogue MMA per slot per
    tile; with equal segments a multiple of BLOCK_M long, one slot per tile."""
    bm, bn = 128, 256
    if CH:
        k = CH.C.MULTI_FUSED[0].kwargs
        bm, bn = k["BLOCK_M"], k["BLOCK_N"]
    Tp, Np = pad(T, bm), pad(N, bn)
    seg = T // A
    slots_per_tile = 1 if seg % bm == 0 else 2
    tiles_m = Tp // bm
    b_bytes = min(tiles_m * slots_per_tile, A * max(1, tiles_m // A)) * N * R * E
    return Launch(f"fused base GEMM + per-token LoRA epilogue [{bm}x{bn}]",
                  2 * Tp * Np * K + slots_per_tile * 2 * Tp * Np * 16,
                  (T * K + N * K + T * R * 2) * E + b_bytes, T * N * E)


# ---------------------------------------------------------------------------------------------
# Ops: minimal traffic and the three plans
# ---------------------------------------------------------------------------------------------
def single_adapter(M, K, N, r, p, bwd):
    mode = forward_mode(M, r, p)
    minimal = Launch("minimal", 2 * M * K * N + 2 * M * r * (K + N),
                     (M * K + N * K + r * K + N * r) * E, (M * N + M * r) * E,
                     mask_ops(M * K) if p > 0 else 0.0)
    if M <= 16:
        ours = [triton_decode_gemm(M, N, K, r)]
    elif mode == 1:
        ours = [triton_shrink(M, K, r, p), triton_fused_gemm(M, N, K, r, 1, 0.0, "fused GEMM, seeded (LORA=1)")]
    elif mode == 4:
        ours = [triton_panel_gemm(M, N, K, r, "fused GEMM, panel-shared x·Aᵀ (LORA=4)")]
    else:
        ours = [triton_fused_gemm(M, N, K, r, 2, 0.0, "fused GEMM, in-loop shrink (LORA=2)")]
    floor = []
    if p > 0:
        floor += [triton_mask(M, K), elementwise(M * K, E, E, "x·1/(1-p)"),
                  elementwise(M * K, 1 + E, E, "where(keep, ·, 0)")]
    floor += [cublas_gemm(M, r, K, "cuBLAS shrink drop(x)·Aᵀ"), elementwise(M * r, E, E, "s·xa"),
              cublas_gemm(M, N, r, "cuBLAS seed bias + (s·xa)·Bᵀ"),
              cublas_gemm(M, N, K, "cuBLAS addmm_ (beta=1)", accumulate=True)]
    bare = [cublas_gemm(M, N, K, "cuBLAS x·Wᵀ")]
    if bwd:
        minimal.flops += 2 * M * N * K + 2 * M * r * (2 * N + 2 * K)
        minimal.read += (M * N + N * K + M * K + M * r) * E
        minimal.write += (M * K + r * K + N * r) * E
        # The dX GEMM makes dyb = dY·B and dB = dYᵀ·xa itself whenever M is large, at any p:
        # its mask is on dX's grid, read from the forward's packed bits (triton/lora_linear.py).
        dx_panel = M > 16 and forward_mode(M, r, 0.0) == 4
        if dx_panel:
            npm = pad(M, panel_tile()[0]) // panel_tile()[0]
            dx = triton_panel_gemm(M, K, N, r, "dX fused GEMM, panel-shared dY·B + dB partials (LORA=4)"
                                   + (" + mask bits" if p else ""), db=True)
            if p > 0:  # one byte per 8 elements of dX, spread in registers (3.8 SASS/element)
                dx.read += M * K / 8
                dx.int_ops += BITS_READ_OPS * M * K
            ours += [dx, Launch("sum of the dB partials (torch)", 0, npm * N * rank_block(r) * 4, N * r * E)]
        else:
            ours += [triton_shrink(M, N, r, 0.0, "dY·B (shrink on Bᵀ)"),
                     triton_fused_gemm(M, K, N, r, 1, p, "dX fused GEMM, seeded" + (" + mask" if p else ""))]
        ours += [*triton_reduce(M, K, r, p, "dA = drop(x)ᵀ·dyb" + (" (mask redrawn)" if p else ""))]
        if not dx_panel:
            ours += [*triton_reduce(M, N, r, 0.0, "dB = dYᵀ·xa")]
        floor += [cublas_gemm(M, r, N, "cuBLAS dY·B"), elementwise(M * r, E, E, "·s")]
        if p > 0:
            floor += [triton_mask(M, K)]
        floor += [cublas_gemm(M, K, r, "cuBLAS (s·dyb)·A")]
        if p > 0:
            floor += [elementwise(M * K, E, E, "·1/(1-p)"), elementwise(M * K, 1 + E, E, "where (dX)"),
                      elementwise(M * K, E, E, "x·1/(1-p)"), elementwise(M * K, 1 + E, E, "where (x)")]
        floor += [cublas_gemm(M, K, N, "cuBLAS addmm_ dY·W (beta=1)", accumulate=True),
                  cublas_gemm(K, r, M, "cuBLAS dA = drop(x)ᵀ·dyb"),
                  cublas_gemm(N, r, M, "cuBLAS dB = dYᵀ·(s·xa)")]
        bare += [cublas_gemm(M, K, N, "cuBLAS dY·W")]
    return minimal, {"ours": ours, "floor": floor, "bare": bare}


def multi_adapter(T, K, N, R, n_adapters):
    seg = T // n_adapters
    minimal = Launch("minimal", 2 * T * K * N + 2 * T * R * (K + N),
                     (T * K + N * K + n_adapters * R * (K + N)) * E, T * N * E)
    bare = [cublas_gemm(T, N, K, "cuBLAS x·Wᵀ")]
    cfg = seg_plan(T, n_adapters, seg, K, N, R)
    if use_fused(T, n_adapters):
        ours = [sgmv_shrink(T, K, n_adapters, R, cfg)]
        if cfg.split > 1:
            ours.append(Launch("sum of the shrink planes (torch)", 0, cfg.split * T * R * 4, T * R * 4))
        ours.append(multi_fused(T, N, K, n_adapters, R))
    else:
        ours = [cublas_gemm(T, N, K, "cuBLAS x·Wᵀ"), sgmv_shrink(T, K, n_adapters, R, cfg),
                sgmv_expand(T, N, n_adapters, R, cfg)]
    return minimal, {"ours": ours, "bare": bare}


def ops():
    import roofline_quant as Q  # imports from this module: loaded once this one is complete
    M, K, N, r = 8192, 4096, 4096, 16
    return {
        "fwd": single_adapter(M, K, N, r, 0.0, False),
        "fwd p=0.05": single_adapter(M, K, N, r, 0.05, False),
        "fwd+bwd": single_adapter(M, K, N, r, 0.0, True),
        "fwd+bwd p=0.05": single_adapter(M, K, N, r, 0.05, True),
        "decode M=1": single_adapter(1, K, N, r, 0.0, False),
        "nf4 decode M=1": Q.nf4_decode_gemv(1, K, N, r),
        "multi decode T=64 distinct": multi_adapter(64, K, N, r, 64),
        "prefill T=8192 64 adapters": multi_adapter(8192, K, N, r, 64),
        "fwd fp8 act_quant": Q.fp8_act_forward(M, K, N, r),
        "nf4 fwd": Q.nf4_single_adapter(M, K, N, r, False),
        "nf4 fwd+bwd": Q.nf4_single_adapter(M, K, N, r, True),
        "fp8 fwd": Q.nf4_single_adapter(M, K, N, r, False, "FP8"),
        "fp8 fwd+bwd": Q.nf4_single_adapter(M, K, N, r, True, "FP8"),
        "fp8 decode M=1": Q.quant_decode(1, K, N, r, "FP8"),
        "nf4 decode M=4": Q.quant_decode(4, K, N, r, "NF4"),
        "fp8 fwd M=512": Q.nf4_single_adapter(512, K, N, r, False, "FP8"),
    }


def predict(plan, dev) -> float:
    """Seconds: Σ per-launch roofline + a gap between dependent launches."""
    return sum(l.seconds(dev) for l in plan) + max(len(plan) - 1, 0) * LAUNCH_GAP_US * 1e-6


def totals(plan) -> Launch:
    return Launch("total", sum(l.flops for l in plan), sum(l.read for l in plan),
                  sum(l.write for l in plan), sum(l.int_ops for l in plan), sum(l.l2 for l in plan),
                  flops_fp8=sum(l.flops_fp8 for l in plan), sass=sum(l.sass for l in plan),
                  issue=sum(l.issue for l in plan))


def report(devices) -> dict:
    import roofline_quant as Q
    out = {"assumptions": dict(PHILOX_OPS=PHILOX_OPS, MASK_OPS_PER_ELEM=MASK_OPS_PER_ELEM,
                               LAUNCH_GAP_US=LAUNCH_GAP_US, devices=DEVICES,
                               launchers="called" if CH else "defaults (lora_kernels.triton not importable)"),
           "ops": {}}
    for name, (minimal, plans) in ops().items():
        plans = {**plans, "minimal": [minimal]}  # one ideal pass: each tensor once, useful FLOPs
        entry = {"minimal": asdict(minimal), "plans": {}}
        for dev_name in devices:
            dev = DEVICES[dev_name]
            entry.setdefault("minimal_us", {})[dev_name] = minimal.seconds(dev) * 1e6
        for pname, plan in plans.items():
            t = totals(plan)
            p = {"launches": [asdict(l) for l in plan], "total": asdict(t), "us": {}, "ratio_to_bare": {}}
            for dev_name in devices:
                dev = DEVICES[dev_name]
                p["us"][dev_name] = predict(plan, dev) * 1e6
                p["ratio_to_bare"][dev_name] = predict(plan, dev) / predict(plans["bare"], dev)
            entry["plans"][pname] = p
        entry["target"] = TARGETS.get(name)
        if name in Q.NF4_TARGETS:  # the issue's NF4 targets: ours against bare or PEFT + bnb
            base, bound = Q.NF4_TARGETS[name]
            entry["nf4_target"] = {"against": base, "max_ratio": bound, "ratio": {
                d: entry["plans"]["ours"]["us"][d] / entry["plans"][base]["us"][d]
                for d in devices}}
        if name.startswith("multi decode"):  # issue #4: the LoRA part against copy bandwidth
            lora = [l for l in plans["ours"] if not l.kernel.startswith("cuBLAS")]
            adapter_bytes = 64 * 16 * (4096 + 4096) * E
            entry["lora_part"] = {d: {"us": predict(lora, DEVICES[d]) * 1e6 + LAUNCH_GAP_US,
                                      "adapter_MiB": adapter_bytes / MiB,
                                      "fraction_of_bw": adapter_bytes / (predict(lora, DEVICES[d]) + LAUNCH_GAP_US * 1e-6)
                                      / (DEVICES[d]["tbs"] * 1e12)} for d in devices}
        out["ops"][name] = entry
    return out


def markdown(rep, devices) -> str:
    lines = ["# Roofline predictions (bf16; predictions, not measurements)", "",
             f"Launch plans from the launchers ({rep['assumptions']['launchers']}); per launch "
             f"max(FLOPs/rate, bytes/BW, int ops/int rate), + {LAUNCH_GAP_US} µs between launches; "
             f"mask v2 = {PHILOX_OPS}/8 + {MASK_OPS_PER_ELEM} int ops per element drawn. Rates: " +
             "; ".join(f"{d} {DEVICES[d]['tflops']:.0f} TFLOP/s, {DEVICES[d]['tbs']} TB/s "
                       f"({DEVICES[d]['source']})" for d in devices), ""]
    hdr = ["op", "minimal MiB", "minimal GFLOP", "plan", "launches", "MiB moved", "GFLOP issued",
           "mask Gops", *[f"{d} µs" for d in devices], *[f"{d} ×bare" for d in devices], "target"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name, e in rep["ops"].items():
        mn = e["minimal"]
        first = True
        for pname, p in e["plans"].items():
            t = p["total"]
            row = [name if first else "", f"{(mn['read'] + mn['write']) / MiB:.1f}" if first else "",
                   f"{(mn['flops'] + mn['flops_fp8']) / 1e9:.2f}" if first else "", pname,
                   str(len(p["launches"])), f"{(t['read'] + t['write']) / MiB:.1f}",
                   f"{(t['flops'] + t['flops_fp8']) / 1e9:.2f}",
                   f"{t['int_ops'] / 1e9:.2f}",
                   *[f"{p['us'][d]:.1f}" for d in devices],
                   *[f"{p['ratio_to_bare'][d]:.3f}" for d in devices],
                   (f"≤ {e['target']}" if e["target"] and pname == "ours" else "")]
            lines.append("| " + " | ".join(row) + " |")
            first = False
    for name, e in rep["ops"].items():
        for d, lp in e.get("lora_part", {}).items():
            lines.append(f"\n{name}, {d}: LoRA part (shrink + expand, after the base GEMM) "
                         f"{lp['us']:.1f} µs for {lp['adapter_MiB']:.0f} MiB of adapters = "
                         f"{100 * lp['fraction_of_bw']:.0f} % of HBM bandwidth (target ≥ 40 %)")
    for name, e in rep["ops"].items():
        t = e.get("nf4_target")
        if t:
            lines.append(f"\n{name}: ours / {t['against']} = " + ", ".join(
                f"{d} {r:.3f}" for d, r in t["ratio"].items()) + f" (target ≤ {t['max_ratio']:.3f})"
                + "".join(f"; mainloop / {t['against']} {d} "
                          f"{e['plans']['mainloop']['us'][d] / e['plans'][t['against']]['us'][d]:.3f}"
                          for d in t["ratio"]))
    lines += ["", "Launches of `ours` (H100 µs each):", ""]
    for name, e in rep["ops"].items():
        parts = [f"{l['kernel']} {Launch(**l).seconds(DEVICES['H100']) * 1e6:.1f}"
                 for l in e["plans"]["ours"]["launches"]]
        lines.append(f"* {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", action="append", choices=sorted(DEVICES), default=None)
    args = ap.parse_args(argv)
    devices = args.device or ["H100", "H200"]
    rep = report(devices)
    print(markdown(rep, devices))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2, default=float))
    bad = [n for n, e in rep["ops"].items() for p in e["plans"].values()
           if not all(math.isfinite(v) for v in p["us"].values())]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
