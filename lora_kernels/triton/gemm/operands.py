"""Operand loaders of the GEMM core: where the rows of ``a`` come from and how an ``a`` / ``w``
K-step tile is read.

* rows: dense (row m of a is output row m, masked past M) or gathered (tile rows are positions
  of a sorted token list; rows past T read token 0 and columns past N wrap, so the main loop
  needs no row/column masks);
* memory: strided pointers (any strides, K masks unless EVEN_K) or tensor descriptors (TMA on
  sm_90+: out-of-bounds reads are zero, so no masks at all).

A new weight format (NF4 unpack, FP8 upcast) is one more branch of :func:`load_w`.
"""

import triton
import triton.language as tl

from lora_kernels.triton.gemm.formats import fp8_tile, nf4_tile
from lora_kernels.triton.gemm.modes import (ROWS_GATHERED, STORE_TMA, WEIGHT_DENSE,
                                            WEIGHT_FP8_ACT, WEIGHT_FP8_E4M3)


@triton.jit
def a_rows(a_ptr, sorted_ids, row0, M, stride_am, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(row offsets of a (int64 elements), output row offsets' rows, rows in range)``.

    Dense: rows ``row0 + i`` (int64: M·K may pass 2³¹). Gathered: the tokens at sorted
    positions ``row0 + i``; positions past M read token 0."""
    pos = row0 + tl.arange(0, BLOCK_M)
    ok = pos < M
    if ROWS == ROWS_GATHERED:
        rows = tl.load(sorted_ids + pos, mask=ok, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    return rows, rows * stride_am, ok


@triton.jit
def load_a(a_ptrs, a_desc, row0, k, row_ok, k_ok, STORE: tl.constexpr, MASK_ROWS: tl.constexpr,
           EVEN_K: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` tile of a at K offset ``k``. (One return: Triton type-checks
    every return of a function, taken constexpr branch or not.)"""
    if STORE == STORE_TMA:
        a = a_desc.load([row0, k])
    elif MASK_ROWS:
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    elif EVEN_K:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
    return a


@triton.jit
def load_w(w_ptrs, w_desc, col0, k, col_ok, k_ok, STORE: tl.constexpr, MASK_COLS: tl.constexpr,
           EVEN_K: tl.constexpr, W_KMAJOR: tl.constexpr, wq, WEIGHT: tl.constexpr,
           QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, QROUND: tl.constexpr,
           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of wᵀ at K offset ``k``. With descriptors a K-major w
    (the forward's ``W [N, K]``) is read as ``[BLOCK_N, BLOCK_K]`` and transposed in shared
    memory (free for wgmma); an N-major one (dX's ``Wᵀ`` view) is read as is. A quantized
    weight (``WEIGHT`` ≠ dense, pointer store only) is decoded from its packed storage, whose
    base pointer then travels in ``w_desc`` (formats.py); an FP8 e4m3 one is read through
    ``w_ptrs`` like a dense w and its bytes decoded (formats.fp8_tile). ``WEIGHT_FP8_ACT``: w
    is a plain float8 tensor read like a dense one (pointer or descriptor) and goes to the MMA
    undecoded."""
    if WEIGHT != WEIGHT_DENSE and WEIGHT != WEIGHT_FP8_ACT and WEIGHT != WEIGHT_FP8_E4M3:
        w = nf4_tile(w_desc, wq, col0, k, col_ok, k_ok, WEIGHT, QBLOCK, QBLOCK2, QROUND, EVEN_K,
                     BLOCK_K, BLOCK_N)
    elif STORE == STORE_TMA:
        if W_KMAJOR:
            w = w_desc.load([col0, k]).T
        else:
            w = w_desc.load([k, col0])
    elif MASK_COLS:
        if EVEN_K:
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    elif EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
    if WEIGHT == WEIGHT_FP8_E4M3:  # the code bytes, read as a dense w, decoded in registers
        w = fp8_tile(w, wq, col0, k, col_ok, k_ok, W_KMAJOR, QROUND, BLOCK_K, BLOCK_N)
    return w


@triton.jit
def descriptors(a_ptr, w_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_wk, stride_om,
                W_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Tensor descriptors of a ``[M, K]``, w (``[N, K]`` or ``[K, N]`` by its unit stride) and
    out ``[M, N]`` (unit inner strides, 16-byte aligned: the launcher checks)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if W_KMAJOR:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    return a_desc, w_desc, o_desc
