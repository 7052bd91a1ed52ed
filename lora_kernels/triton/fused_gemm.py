"""One GEMM kernel with the LoRA low-rank term fused into it, and its launcher.

``out[M, N] = a[M, K]·w[N, K]ᵀ (+ bias) (+ s·lowrank)``, every operand a strided view, so the
same kernel runs

* the forward      a = x,  w = W         low-rank = (drop(x)·Aᵀ)·Bᵀ
* the dX backward  a = dY, w = Wᵀ view   low-rank = mask ∘ ((dY·B)·A) / (1 − p)
* the dW backward  a = dYᵀ view, w = xᵀ view, no low-rank term.

The low-rank term (``LORA``):

* ``1``: ``u [M, r]`` is precomputed (the shrink kernel in lowrank.py) and ``s·u·lbᵀ`` seeds
  the fp32 accumulator before the main loop (LoRAFusion's design); ``out`` is stored once.
  Costs one extra read of ``a`` (the shrink) but no extra MMA work in the main loop; the only
  mode that supports dropout (the mask is drawn once per element of x in the shrink, or once
  per element of dX in this epilogue).
* ``2``: ``u`` accumulates in the main K loop from the same ``a`` tiles already in registers
  (one extra [BLOCK_K, r] load and an r-wide dot per step: r/BLOCK_N more MMA work, no extra
  read of x, one launch). Programs with ``pid_n == 0`` write ``u`` (= xa) for the backward.
  Wins where the GEMM is bandwidth bound (small/medium M) and the launch of a separate shrink
  is not amortised; see ``lora_linear.lora_mode``.

Split-K (``SPLIT_K > 1``, the decode path): each program reduces one K slab into an fp32
workspace; the last program to finish a tile (an atomic ticket per tile) sums the slabs in
slab order, so the result is deterministic, then runs the epilogue. One launch, no atomics on
data, no memset: the last program resets the ticket to zero for the next launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lora_kernels.triton import configs as C
from lora_kernels.triton.dropout import drop_threshold, keep_tile, seed_arg
from lora_kernels.triton.tiles import grouped_tile

# M is bucketed (training sees many sequence lengths); the strides tell the forward's K-major
# weight from the dX's N-major view of the same [N, K] tensor, which tune differently.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "stride_ak", "stride_wk", "LORA", "BLOCK_R", "HAS_BIAS",
                 "PRECISION", "DROPOUT"]


@triton.jit
def _lowrank_seed(u_ptr, lb_ptr, row0, col0, rm64, rn64, m_ok, n_ok, N, R, stride_um, stride_ur, stride_lbn,
                  stride_lbr, scaling, seed, drop_threshold, drop_scale, DROPOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The LORA=1 term ``s·u[rows, :R]·lb[cols, :R]ᵀ`` (masked for the dX backward) as the
    accumulator's initial value (LoRAFusion), so the output is stored once.

    Register budget, from sm_90 compiles (ptxas -v) of the 128-row dX tiles with dropout:
    adding the term in the epilogue instead needs a second fp32 tile next to the main one
    (the mask applies to this term only) and spilled up to 10 KB per thread; seeding, with the
    Philox mask drawn *before* the low-rank dot and folded into one per-element factor,
    compiles spill-free (~245 registers) at 64 accumulator elements per thread (128x128 with
    8 warps, 128x64 / 64x128 with 4). 128 elements per thread still spill, so those configs
    are pruned when the dX carries dropout (``configs.prune_dropout``). Rank chunks of BLOCK_R
    loop, so any r fits.
    """
    rr = tl.arange(0, BLOCK_R)
    if DROPOUT:
        # dX's mask is the forward's mask on x: element (m, k) of dX is element (m, k) of the
        # [M, K] mask grid, and K is this GEMM's N.
        keep = keep_tile(seed, row0, col0, N, drop_threshold, BLOCK_M, BLOCK_N)
        fac = tl.where(keep, drop_scale * scaling, 0.0)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        u = tl.load(u_ptr + rm64[:, None] * stride_um + (r0 + rr)[None, :] * stride_ur,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        lbt = tl.load(lb_ptr + rn64[None, :] * stride_lbn + (r0 + rr)[:, None] * stride_lbr,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        low = tl.dot(u, lbt, low, input_precision=PRECISION)
    if DROPOUT:
        # where, not a bare product: a dropped element is 0 even when the term is inf/NaN (as
        # in the reference); testing fac keeps no second mask tile alive.
        low = tl.where(fac != 0.0, low * fac, 0.0)
    else:
        low = low * scaling
    return low


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _fused_gemm_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr,
    u_ptr, la_ptr, lb_ptr,
    ws_ptr, wsu_ptr, cnt_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    stride_um, stride_ur, stride_lar, stride_lak, stride_lbn, stride_lbr, stride_b,
    scaling, seed, drop_threshold, drop_scale,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    # int64 row/column offsets: M·K (or N·K) may pass 2^31 elements.
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    # K slab of this program (slabs are whole BLOCK_Ks, so only the last one is ragged).
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rk64 = (k_lo + rk).to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak
    w_ptrs = w_ptr + rn64[None, :] * stride_wn + rk64[:, None] * stride_wk
    if LORA == 1 and SPLIT_K == 1:
        acc = _lowrank_seed(u_ptr, lb_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, rm64, rn64, m_ok, n_ok, N, R, stride_um, stride_ur,
                            stride_lbn, stride_lbr, scaling, seed, drop_threshold, drop_scale,
                            DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA == 2:
        la_ptrs = la_ptr + rr[None, :].to(tl.int64) * stride_lar + rk64[:, None] * stride_lak
        u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k + rk) < k_hi
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if LORA == 2:
            if EVEN_K:
                la = tl.load(la_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                la = tl.load(la_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            u_acc = tl.dot(a, la, u_acc, input_precision=PRECISION)
            la_ptrs += BLOCK_K * stride_lak
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if LORA == 2:
        # s·u is rounded once to the input dtype (the torch composition rounds u there too) and
        # the dot accumulates straight into acc: no second fp32 tile in registers. The term of
        # a K slab is linear in the slab, so split programs each add their own share.
        lbt = tl.load(lb_ptr + rn64[None, :] * stride_lbn + rr[:, None] * stride_lbr,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot((u_acc * scaling).to(lbt.dtype), lbt, acc, input_precision=PRECISION)

    if SPLIT_K > 1:
        # Workspace [SPLIT_K, M, N] (and [SPLIT_K, M, BLOCK_R] for u), fp32, int64 offsets.
        ws_tile = rm64[:, None] * N + rn64[None, :]
        mn_ok = m_ok[:, None] & n_ok[None, :]
        slab = tl.cast(M, tl.int64) * N  # tl.cast: M == 1 arrives as a constexpr
        tl.store(ws_ptr + pid_k * slab + ws_tile, acc, mask=mn_ok)
        if LORA == 2:
            wsu_tile = rm64[:, None] * BLOCK_R + rr[None, :]
            if pid_n == 0:
                tl.store(wsu_ptr + pid_k * M * BLOCK_R + wsu_tile, u_acc, mask=m_ok[:, None])
        # Every thread's partial must be stored before the ticket is taken (the barrier), and
        # the ticket is acq_rel at GPU scope so the last program sees all slabs.
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            if LORA == 1:
                acc = _lowrank_seed(u_ptr, lb_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, rm64, rn64, m_ok, n_ok, N, R, stride_um,
                                    stride_ur, stride_lbn, stride_lbr, scaling, seed,
                                    drop_threshold, drop_scale, DROPOUT, BLOCK_M, BLOCK_N,
                                    BLOCK_R, PRECISION)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                # .cg: bypass L1, the slabs were written by other SMs.
                acc += tl.load(ws_ptr + s * slab + ws_tile, mask=mn_ok, other=0.0,
                               cache_modifier=".cg")
            if LORA == 2:
                if pid_n == 0:
                    u_sum = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for s in range(0, SPLIT_K):
                        u_sum += tl.load(wsu_ptr + s * M * BLOCK_R + wsu_tile,
                                         mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
                    tl.store(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
                             u_sum.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
            _epilogue(acc, out_ptr, bias_ptr, rm64, rn64, m_ok, n_ok, stride_om, stride_on, stride_b,
                      HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        if LORA == 2:
            if pid_n == 0:
                tl.store(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
                         u_acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
        _epilogue(acc, out_ptr, bias_ptr, rm64, rn64, m_ok, n_ok, stride_om, stride_on, stride_b,
                  HAS_BIAS)


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, rm64, rn64, m_ok, n_ok, stride_om, stride_on, stride_b,
              HAS_BIAS: tl.constexpr):
    """Bias, then the one store of the output tile in its dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64 * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _even_k(args):
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


_heuristic_kernel = triton.heuristics({"EVEN_K": _even_k})(_fused_gemm_kernel)
_TUNED = {
    "small": triton.autotune(C.GEMM_SMALL, key=_AUTOTUNE_KEY,
                             prune_configs_by={"early_config_prune": C.prune_small})(_heuristic_kernel),
    "medium": triton.autotune(C.GEMM_MEDIUM, key=_AUTOTUNE_KEY,
                              prune_configs_by={"early_config_prune": C.prune_dropout})(_heuristic_kernel),
    "large": triton.autotune(C.GEMM_LARGE, key=_AUTOTUNE_KEY,
                             prune_configs_by={"early_config_prune": C.prune_dropout})(_heuristic_kernel),
}

# Split-K scratch: the tickets (one int32 per output tile, kept at zero between launches by the
# kernel itself) and the fp32 workspaces ([split, M, N] output slabs; [split, M, BLOCK_R] u
# slabs for LORA=2). One buffer of each per (device, stream), grown on demand and never shrunk
# (no allocation per decode step): launches on one stream are serialised, launches on
# different streams must not share them.
_TICKETS: dict = {}
_WORKSPACE: dict = {}
_WORKSPACE_U: dict = {}


def _scratch(cache: dict, device: torch.device, n: int, dtype: torch.dtype,
             zero: bool = False, floor: int = 1024) -> torch.Tensor:
    """≥ ``n`` elements of the (device, current stream)'s buffer in ``cache``.

    Under CUDA-graph capture the buffer is allocated per call instead (from the graph's private
    pool, which the graph keeps alive): a cached buffer baked into a graph would be freed by a
    later grow while the graph still replays into it."""
    alloc = torch.zeros if zero else torch.empty
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return alloc(n, dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = alloc(max(n, floor), dtype=dtype, device=device)
    return buf


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    return _scratch(_TICKETS, device, n, torch.int32, zero=True)


def fused_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
               bias: Optional[torch.Tensor] = None, lora: int = 0,
               u: Optional[torch.Tensor] = None, la: Optional[torch.Tensor] = None,
               lb: Optional[torch.Tensor] = None, scaling: float = 1.0,
               dropout_p: float = 0.0, seed: int = 0, small_m_max: int = 16,
               config: Optional[dict] = None) -> torch.Tensor:
    """``out = a·wᵀ + bias + low-rank`` (see the module doc); ``a [M, K]``, ``w [N, K]``,
    ``out [M, N]``, ``lb [N, r]``; ``lora=1``: ``u [M, r]`` input; ``lora=2``: ``la [r, K]`` and
    ``u [M, r]`` is *written* (xa). All may be strided views (unit inner stride not required).
    ``config`` forces one launch config (tests; the interpreter always uses one)."""
    M, K = a.shape
    N = w.shape[0]
    assert w.shape[1] == K and out.shape == (M, N) and M > 0 and N > 0
    r = lb.shape[1] if lora else 0
    if lora and r == 0:
        lora = 0
    dev = a.device
    dummy = out  # never dereferenced when the matching constexpr flag is off
    block_r = C.rank_block(r)
    if lora == 2:
        assert r <= 64 and dropout_p == 0.0, "fused shrink: r ≤ 64 and no dropout"
        assert la is not None and u is not None
    path = C.gemm_path(M, small_m_max)

    if config is None and C.interpreting():
        config = C.gemm_interpret_config(path)
    max_split = config["SPLIT_K"] if config is not None else (C.MAX_SPLIT_K if path == "small" else 1)
    ws = wsu = tickets = dummy
    if max_split > 1:
        ws = _scratch(_WORKSPACE, dev, max_split * M * N, torch.float32)
        if lora == 2:
            wsu = _scratch(_WORKSPACE_U, dev, max_split * M * block_r, torch.float32)
        tickets = _tickets(dev, triton.cdiv(M, 16) * triton.cdiv(N, 16))

    u_t = u if u is not None else dummy
    la_t = la if la is not None else dummy
    lb_t = lb if lb is not None else dummy
    args = (
        a, w, out, bias if bias is not None else dummy,
        u_t, la_t, lb_t, ws, wsu, tickets,
        M, N, K, r, C.m_bucket(M),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        u_t.stride(0) if u is not None else 0, u_t.stride(1) if u is not None else 0,
        la_t.stride(0) if la is not None else 0, la_t.stride(1) if la is not None else 0,
        lb_t.stride(0) if lb is not None else 0, lb_t.stride(1) if lb is not None else 0,
        bias.stride(0) if bias is not None else 0, float(scaling), seed_arg(seed), drop_threshold(dropout_p),
        1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
    )
    flags = dict(HAS_BIAS=bias is not None, LORA=lora, DROPOUT=lora == 1 and dropout_p > 0.0,
                 BLOCK_R=block_r, PRECISION=C.dot_precision(a.dtype))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is not None:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        _heuristic_kernel[grid](*args, **flags, **cfg, num_warps=warps, num_stages=stages)
    else:
        _TUNED[path][grid](*args, **flags)
    return out
