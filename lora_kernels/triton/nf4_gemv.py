"""The NF4 decode GEMV (M ≤ 16 rows of x): ``y = x·Wᵀ + b + s·xa·Bᵀ`` over bitsandbytes' packed
NF4 storage on CUDA cores, no tl.dot.

At decode shapes the GEMM core's 16-row tl.dot tile spends its time decoding W into the MMA
layout (28.8 SASS instructions per weight element at M = 1, notes/nf4perf.md). Here each weight
element is touched by a few instructions and then used M times by fp32 FMAs:

* one byte = two codes: a 256-entry *pair* table (``hi[b] = code[b >> 4]``, ``lo[b] =
  code[b & 15]``, built in the prologue from the 16 NF4 values and gathered in registers /
  shared memory with ``tl.gather``), so no nibble is extracted per element;
* the block scale is factored out: ``Σ_k table[code_k]·x[k]`` over one 64-element block in fp32,
  times the block's absmax once per (row, block) — not once per element;
* the bytes are read ``[BLOCK_N rows, CHUNKS blocks, QBLOCK/2]``, contiguous along K (16-byte
  vector loads); x is read as fp32 pairs ``(x[2j], x[2j+1])`` matching the bytes;
* split-K: ``SPLIT_K`` programs per column tile publish fp32 partials ``[SPLIT_K, M, N]`` and
  the one that takes the tile's last ticket sums them in slab order (deterministic, no data
  atomics; gemm/schedule.py), adds the bias and the LoRA term, stores y, resets the ticket.

Numerics: fp32 throughout. bitsandbytes rounds ``code·absmax`` to the storage dtype before
the product; here ``absmax·Σ code·x`` is exact in real arithmetic, so against
``dequantize_4bit`` the result differs by the storage rounding of W (none for fp32 storage,
≤ 2⁻⁹ relative per element for bf16) — inside the dtype tolerances of DESIGN.md.

Layout requirements (the launcher checks them, the op routes other weights to the GEMM core):
row-major ``W [N, K]`` with ``K % QBLOCK == 0`` (blocks never straddle rows; K even), x
contiguous.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton.device import interpreting, num_sms
from lora_kernels.triton.gemm.formats import _block_scale
from lora_kernels.triton.gemm.modes import WEIGHT_NF4, WEIGHT_NF4_NESTED
from lora_kernels.triton.gemm.schedule import split_k_publish, split_k_sum

__all__ = ["nf4_gemv", "gemv_supported", "gemv_config", "GEMV_MAX_ROWS"]

# Rows of x the GEMV takes (the decode class of lora_kernels.runtime).
GEMV_MAX_ROWS = 16


@triton.jit
def _pair_tables(lut_ptr):
    """The 256-entry pair tables of one byte's two codes: (high nibble, low nibble) values."""
    code = tl.load(lut_ptr + tl.arange(0, 16))
    b = tl.arange(0, 256)
    return tl.gather(code, b >> 4, 0), tl.gather(code, b & 15, 0)


@triton.jit
def _lowrank_expand(u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um, stride_lbn, scaling,
                    BLOCK_R: tl.constexpr):
    """``s·u[m, :]·B[n, :]ᵀ`` ``[BLOCK_M, BLOCK_N]`` on CUDA cores (r ≤ BLOCK_R per pass)."""
    rr = tl.arange(0, BLOCK_R)
    term = tl.zeros((rm64.shape[0], rn64.shape[0]), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        u = tl.load(u_ptr + rm64[:, None] * stride_um + (r0 + rr)[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(lb_ptr + rn64[:, None] * stride_lbn + (r0 + rr)[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        term += tl.sum(u[:, None, :] * b[None, :, :], axis=2)
    return term * scaling


@triton.jit
def nf4_gemv_kernel(x_ptr, codes_ptr, absmax_ptr, absmax2_ptr, lut_ptr, offset, y_ptr,
                    bias_ptr, u_ptr, lb_ptr, ws_ptr, cnt_ptr, scaling, M, N, K, R,
                    stride_xm, stride_ym, stride_um, stride_lbn,
                    WEIGHT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                    SPLIT_K: tl.constexpr):
    """Program ``(n tile, K slab, m tile)``: ``BLOCK_N`` rows of W over ``CHUNKS`` QBLOCKs per
    step of its K slab, for ``BLOCK_M`` rows of x (each thread uses a decoded code for all
    of them)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF: tl.constexpr = QBLOCK // 2
    rn64 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm64 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok = rn64 < N
    m_ok = rm64 < M
    blocks = K // QBLOCK                                   # per row of W
    per_split = tl.cdiv(tl.cdiv(blocks, SPLIT_K), CHUNKS) * CHUNKS
    b_lo = pid_k * per_split
    b_hi = tl.minimum(blocks, b_lo + per_split)
    hi_tab, lo_tab = _pair_tables(lut_ptr)
    ch = tl.arange(0, CHUNKS)
    jj = tl.arange(0, HALF)
    # byte (and x pair) j of block b of row n: n·K/2 + b·HALF + j
    row_byte = rn64 * (K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(b_lo, b_hi, CHUNKS):
        blk = b0 + ch                                      # [CHUNKS] block within the row
        c_ok = blk < b_hi
        pair = blk[:, None] * HALF + jj[None, :]           # [CHUNKS, HALF]
        ok = n_ok[:, None, None] & c_ok[None, :, None]
        byte = tl.load(codes_ptr + row_byte[:, None, None] + pair[None, :, :], mask=ok,
                       other=0).to(tl.int32)
        flat = tl.reshape(byte, (BLOCK_N * CHUNKS * HALF,))
        q_hi = tl.reshape(tl.gather(hi_tab, flat, 0), (BLOCK_N, CHUNKS, HALF))
        q_lo = tl.reshape(tl.gather(lo_tab, flat, 0), (BLOCK_N, CHUNKS, HALF))
        scale = _block_scale(absmax_ptr, absmax2_ptr, lut_ptr, offset,
                             rn64[:, None] * blocks + blk[None, :], n_ok[:, None] & c_ok[None, :],
                             WEIGHT, QBLOCK2)              # [BLOCK_N, CHUNKS]
        x_e = x_ptr + rm64[:, None, None] * stride_xm + 2 * pair[None, :, :]
        x_ok = m_ok[:, None, None] & c_ok[None, :, None]
        xe = tl.load(x_e, mask=x_ok, other=0.0).to(tl.float32)        # [BLOCK_M, CHUNKS, HALF]
        xo = tl.load(x_e + 1, mask=x_ok, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            part = tl.sum(q_hi * xe + q_lo * xo, axis=2)               # [BLOCK_N, CHUNKS]
            acc += tl.sum(part * scale, axis=1)[None, :]
        else:
            part = tl.sum(q_hi[None, :, :, :] * xe[:, None, :, :]
                          + q_lo[None, :, :, :] * xo[:, None, :, :], axis=3)
            acc += tl.sum(part * scale[None, :, :], axis=2)
    tile = pid_m * tl.num_programs(0) + pid_n
    last = split_k_publish(acc, ws_ptr, cnt_ptr, tile, pid_k, rm64, rn64, m_ok, n_ok, M, N,
                           SPLIT_K)
    if last:
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            out = _lowrank_expand(u_ptr, lb_ptr, rm64, rn64, m_ok, n_ok, R, stride_um,
                                  stride_lbn, scaling, BLOCK_R)
        out = split_k_sum(out, ws_ptr, rm64, rn64, m_ok, n_ok, M, N, SPLIT_K)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :],
                 out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        tl.atomic_xchg(cnt_ptr + tile, 0)  # the ticket is back at zero for the next launch


def gemv_supported(pw, M: int) -> bool:
    """Whether :func:`nf4_gemv` takes this call: an NF4 W in its forward (not the dX Wᵀ view),
    K a multiple of the absmax block (blocks never straddle rows), M ≤ GEMV_MAX_ROWS."""
    if pw.weight not in (int(WEIGHT_NF4), int(WEIGHT_NF4_NESTED)) or pw.transposed:
        return False
    K = pw.base_shape[1]
    return 1 <= M <= GEMV_MAX_ROWS and K % pw.qblock == 0 and pw.qblock % 2 == 0


def gemv_config(M: int, N: int, K: int, qblock: int, device: torch.device) -> dict:
    """Tile, steps and split: ``BLOCK_N`` rows × ``CHUNKS`` QBLOCKs per step, and enough K slabs
    that ≥ 2 programs per SM stream W (N = K = 4096: 32 column tiles × 8 slabs = 256 programs
    on 132 SMs)."""
    if interpreting() or device.type != "cuda":
        cfg = dict(BLOCK_N=16, CHUNKS=2, num_warps=1)
    else:
        cfg = dict(BLOCK_N=128, CHUNKS=1, num_warps=4)
    cfg["BLOCK_M"] = min(triton.next_power_of_2(max(M, 1)), GEMV_MAX_ROWS)
    blocks = K // qblock
    tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
    split = max(1, min(triton.cdiv(2 * num_sms(device), tiles),
                       triton.cdiv(blocks, cfg["CHUNKS"]), MAX_GEMV_SPLIT))
    cfg["SPLIT_K"] = triton.next_power_of_2(split) if split > 1 else 1
    cfg["SPLIT_K"] = min(cfg["SPLIT_K"], MAX_GEMV_SPLIT)
    return cfg


# Slabs per column tile: the workspace is [SPLIT_K, M, N] fp32 (16 × 16 × 4096 × 4 B = 4 MiB
# at most for the decode class).
MAX_GEMV_SPLIT = 16


def nf4_gemv(x: torch.Tensor, pw, y: torch.Tensor, bias: Optional[torch.Tensor] = None,
             u: Optional[torch.Tensor] = None, lb: Optional[torch.Tensor] = None,
             scaling: float = 1.0, config: Optional[dict] = None) -> torch.Tensor:
    """``y[M, N] = x·Wᵀ (+ bias) (+ scaling·u·lbᵀ)`` for a contiguous ``x [M, K]`` and an NF4
    ``pw`` (a :class:`gemm.formats.PackedWeight` with :func:`gemv_supported`); ``u [M, r]``
    is the shrink's ``drop(x)·Aᵀ``, ``lb [N, r]``. Writes and returns ``y``."""
    from lora_kernels.triton.fused_gemm import _scratch, _tickets, _WORKSPACE
    M, K = x.shape
    N = pw.base_shape[0]
    cfg = dict(config) if config is not None else gemv_config(M, N, K, pw.qblock, x.device)
    warps = cfg.pop("num_warps", 4)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(M, cfg["BLOCK_M"]))
    ws = _scratch(_WORKSPACE, x.device, cfg["SPLIT_K"] * M * N, torch.float32)
    tickets = _tickets(x.device, grid[0] * grid[2])
    has_lora = u is not None and u.shape[1] > 0
    R = u.shape[1] if has_lora else 0
    dummy = y
    nf4_gemv_kernel[grid](
        x, pw.codes, pw.absmax, pw.absmax2 if pw.absmax2 is not None else pw.absmax, pw.lut,
        float(pw.offset), y, bias if bias is not None else dummy, u if has_lora else dummy,
        lb if has_lora else dummy, ws, tickets, float(scaling), M, N, K, R,
        x.stride(0), y.stride(0), u.stride(0) if has_lora else 0,
        lb.stride(0) if has_lora else 0,
        WEIGHT=int(pw.weight), QBLOCK=int(pw.qblock), QBLOCK2=int(pw.qblock2),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_R=min(triton.next_power_of_2(max(R, 1)), 16), num_warps=warps, **cfg)
    return y
