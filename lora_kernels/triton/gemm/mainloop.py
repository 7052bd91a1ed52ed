"""The GEMM core's only K loop.

``acc += a[rows, k:k+BK]·w[cols, k:k+BK]ᵀ`` over ``[k_lo, k_hi)``; with the in-loop low-rank
mode the same ``a`` tiles also feed ``u += a·laᵀ`` (one extra ``[BLOCK_K, BLOCK_R]`` load and an
r-wide dot per step: no extra read of a). Every GEMM of the package (forward, dX, dW, the
multi-adapter forward) runs this loop; what differs is the operand loaders' flags.
"""

import triton
import triton.language as tl

from lora_kernels.triton.gemm.modes import WEIGHT_DENSE, WEIGHT_FP8_ACT
from lora_kernels.triton.gemm.operands import load_a, load_w


@triton.jit
def mainloop(acc, u_acc, a_ptrs, w_ptrs, la_ptrs, a_desc, w_desc, row0, col0, k_lo, k_hi,
             row_ok, col_ok, r_ok, stride_ak, stride_wk, stride_lak,
             STORE: tl.constexpr, IN_LOOP: tl.constexpr, MASK_ROWS: tl.constexpr,
             MASK_COLS: tl.constexpr, EVEN_K: tl.constexpr, W_KMAJOR: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, wq=None,
             WEIGHT: tl.constexpr = 0, QBLOCK: tl.constexpr = 64, QBLOCK2: tl.constexpr = 256,
             QROUND: tl.constexpr = 0, BLOCK_N: tl.constexpr = 16, slice_len=0,
             SLICED: tl.constexpr = False):
    """Returns ``(acc, u_acc)``. Pointers start at ``k_lo`` and advance by BLOCK_K (64-bit
    adds, no per-step offset products); descriptors are indexed by ``k``. ``wq``/``WEIGHT``/
    ``Q*``: a quantized w (formats.py), cast to a's dtype for the MMA.

    ``SLICED`` (the panel mode's fallback, gemm/panel.py): u accumulates per K slice of
    ``slice_len`` (a multiple of BLOCK_K) from zero, and each finished slice is added to
    ``u_acc`` in slice order — the same fp32 operations, in the same order, as the shares the
    persistent programs make and sum, so both ways to u give the same bits."""
    rk = tl.arange(0, BLOCK_K)
    s_acc = tl.zeros_like(u_acc)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k + rk) < k_hi
        a = load_a(a_ptrs, a_desc, row0, k, row_ok, k_ok, STORE, MASK_ROWS, EVEN_K)
        w = load_w(w_ptrs, w_desc, col0, k, col_ok, k_ok, STORE, MASK_COLS, EVEN_K, W_KMAJOR,
                   wq, WEIGHT, QBLOCK, QBLOCK2, QROUND, BLOCK_K, BLOCK_N)
        if WEIGHT != WEIGHT_DENSE and WEIGHT != WEIGHT_FP8_ACT:  # fp8_act: both float8 as is
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if IN_LOOP:
            if EVEN_K:
                la = tl.load(la_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                la = tl.load(la_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if SLICED:
                s_acc = tl.dot(a, la, s_acc, input_precision=PRECISION)
                # a select, not a branch: the loop body stays one block for the pipeliner
                flush = (((k + BLOCK_K) % slice_len) == 0) | (k + BLOCK_K >= k_hi)
                u_acc = tl.where(flush, u_acc + s_acc, u_acc)
                s_acc = tl.where(flush, 0.0, s_acc)
            else:
                u_acc = tl.dot(a, la, u_acc, input_precision=PRECISION)
            la_ptrs += BLOCK_K * stride_lak
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc, u_acc
