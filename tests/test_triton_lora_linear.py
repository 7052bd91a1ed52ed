"""The Triton single-adapter LoRA linear, through the public op and autograd, against the
float64 reference. On CPU the real kernels run under TRITON_INTERPRET=1 (fp32/fp16, tiny odd
shapes); the ``gpu`` tests add bf16, benchmark-sized shapes and index math past 2³¹."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels
from lora_kernels import reference

from helpers import rel_err, tol, triton_device, triton_dtypes

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="Triton can run neither on a GPU nor in the interpreter")

if DEVICE is not None:
    import lora_kernels.triton.fused_gemm as FG
    import lora_kernels.triton.lora_linear as TL
    from lora_kernels.triton import dropout_keep_mask as triton_keep_mask

DTYPES = triton_dtypes(DEVICE) if DEVICE else []


def _inputs(M, K, N, r, dtype, device, bias=True, lead=None):
    x = torch.randn(*(lead or (M,)), K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64) / K ** 0.5
    b = torch.randn(N, dtype=torch.float64) if bias else None
    a = torch.randn(r, K, dtype=torch.float64) / K ** 0.5
    bb = torch.randn(N, r, dtype=torch.float64) / max(r, 1) ** 0.5
    return [None if t is None else t.to(dtype=dtype, device=device) for t in (x, w, b, a, bb)]


def _check(x, w, b, a, bb, *, scaling=0.5, p=0.0, seed=1234, grads=("x", "a", "b"), dy=None):
    """Run the triton op + autograd and the float64 reference on the same rounded inputs."""
    dtype, device = x.dtype, x.device
    names = {"x": x, "w": w, "bias": b, "a": a, "b": bb}
    # detach (not clone): a strided x must reach the op with its strides.
    leaves = {k: v.detach().requires_grad_(k in grads) for k, v in names.items() if v is not None}
    y = lora_kernels.lora_linear(leaves["x"], leaves["w"], leaves.get("bias"), leaves["a"],
                                 leaves["b"], scaling=scaling, dropout_p=p, backend="triton",
                                 dropout_seed=seed)
    ref_leaves = {k: v.detach().to(torch.float64).requires_grad_(k in grads) for k, v in leaves.items()}
    ref = reference.lora_linear(ref_leaves["x"], ref_leaves["w"], ref_leaves.get("bias"),
                                ref_leaves["a"], ref_leaves["b"], scaling, p, seed)
    assert y.shape == ref.shape and y.dtype == dtype
    t = tol(dtype, device)
    assert rel_err(y, ref) <= t, ("forward", rel_err(y, ref))
    if grads:
        dy = torch.randn_like(ref) if dy is None else dy
        got = torch.autograd.grad(y, [leaves[g] for g in grads], dy.to(dtype))
        want = torch.autograd.grad(ref, [ref_leaves[g] for g in grads], dy)
        for g, gt, wt in zip(grads, got, want):
            assert gt.dtype == leaves[g].dtype and gt.shape == wt.shape
            assert rel_err(gt, wt) <= t, (f"d{g}", rel_err(gt, wt))
    return y


# A covering set of odd shapes, not the product: every M class (1, ≤ 16, > 16), every rank
# class (1, 8, 13, 64 — padded to 16/16/16/64), K and N below, across and not multiples of the
# 32-wide interpreter tiles, bias on and off, scaling ≠ 1.
SHAPES = [
    # M, K, N, r, bias
    (1, 37, 45, 8, True),
    (7, 45, 19, 13, False),
    (33, 37, 45, 1, True),
    (33, 45, 19, 64, False),
    (7, 19, 37, 64, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r,bias", SHAPES)
def test_forward_and_grads(M, K, N, r, bias, dtype):
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, DEVICE, bias)
    _check(x, w, b, a, bb, scaling=0.75)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_and_bias_grads(dtype):
    x, w, b, a, bb = _inputs(33, 37, 45, 8, dtype, DEVICE)
    _check(x, w, b, a, bb, grads=("x", "w", "bias", "a", "b"))
    x, w, b, a, bb = _inputs(3, 37, 45, 8, dtype, DEVICE)  # dW with a 3-row reduction
    _check(x, w, b, a, bb, grads=("w", "bias"))


def test_3d_and_noncontiguous_inputs():
    dtype = torch.float32
    K, N, r = 37, 45, 13
    _, w, b, a, bb = _inputs(1, K, N, r, dtype, DEVICE)
    # 3-D x that is a transpose (non-contiguous): [5, 3, K] -> [3, 5, K]
    x = torch.randn(5, 3, K, dtype=dtype, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous()
    y = _check(x, w, b, a, bb)
    assert y.shape == (3, 5, N)
    # x strided along K, a weight that is the transpose of a [K, N] tensor and a strided bias
    # (the kernels take strides rather than copying).
    x = torch.randn(7, 2 * K, dtype=dtype, device=DEVICE)[:, ::2]
    w_t = torch.randn(K, N, dtype=dtype, device=DEVICE).t()
    b_s = torch.randn(2 * N, dtype=dtype, device=DEVICE)[::2]
    _check(x, w_t, b_s, a, bb, grads=("x", "w", "bias", "a", "b"))


def test_fp32_adapters_with_fp16_input():
    # PEFT keeps adapters in fp32 while x is fp16: the op casts, grads come back in fp32.
    x, w, b, a, bb = _inputs(7, 37, 45, 8, torch.float16, DEVICE)
    _check(x, w, b, a.float(), bb.float())


# ---- dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 7, -5, 2**40 + 3, 2**63 + 11])
def test_keep_mask_matches_reference_bit_for_bit(seed):
    for rows, cols, p in [(37, 45, 0.1), (5, 19, 0.5), (33, 64, 0.37)]:
        got = triton_keep_mask(seed, rows, cols, p, DEVICE).cpu()
        want = reference.dropout_keep_mask(seed, rows, cols, p)
        assert got.dtype == torch.bool and torch.equal(got, want)
    assert bool(triton_keep_mask(seed, 3, 4, 0.0, DEVICE).all())


def test_keep_rate():
    p = 0.3
    keep = triton_keep_mask(20240601, 256, 1024, p, DEVICE).float().mean().item()
    # 262144 Bernoulli draws: std of the rate ≈ 0.0009, so ±0.01 is > 10 sigma.
    assert abs(keep - (1 - p)) < 0.01


def test_dropout_p0_equals_no_dropout():
    x, w, b, a, bb = _inputs(7, 37, 45, 8, torch.float32, DEVICE)
    plain = lora_kernels.lora_linear(x, w, b, a, bb, scaling=0.5, backend="triton")
    zero = lora_kernels.lora_linear(x, w, b, a, bb, scaling=0.5, dropout_p=0.0, dropout_seed=9,
                                    backend="triton")
    evald = lora_kernels.lora_linear(x, w, b, a, bb, scaling=0.5, dropout_p=0.4, training=False,
                                     backend="triton")
    assert torch.equal(plain, zero) and torch.equal(plain, evald)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(7, 37, 45, 13), (33, 45, 19, 8)])
def test_dropout_matches_reference(M, K, N, r, dtype):
    # Forward and every gradient against the reference drawing the mask from the same seed:
    # dx and dA only match if the backward regenerates the forward's mask.
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, DEVICE)
    _check(x, w, b, a, bb, p=0.25, seed=2**33 + 77, grads=("x", "a", "b"))


def test_dropout_seed_reproducible():
    x, w, b, a, bb = _inputs(7, 37, 45, 8, torch.float32, DEVICE)
    run = lambda s: lora_kernels.lora_linear(x, w, b, a, bb, dropout_p=0.5, dropout_seed=s,
                                             backend="triton")
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# ---- paths: decode (split-K) vs tiled, fused vs precomputed shrink, out= ---------------------
@pytest.mark.parametrize("small_m_max,mode", [(0, 2), (16, 1), (0, 1)])
def test_forced_paths(monkeypatch, small_m_max, mode):
    """M = 1 and 7 through the tiled path, and the precomputed-shrink epilogue at small M."""
    monkeypatch.setattr(TL, "SMALL_M_MAX", small_m_max)
    monkeypatch.setattr(TL, "lora_mode", lambda m, r, p: 1 if p > 0 else mode)
    for M in (1, 7):
        x, w, b, a, bb = _inputs(M, 37, 45, 13, torch.float32, DEVICE)
        _check(x, w, b, a, bb)


def _ref_fwd(x, w, b, a, bb, s, p=0.0, seed=0):
    d = lambda t: None if t is None else t.double().cpu()
    return reference.lora_linear_forward(d(x), d(w), d(b), d(a), d(bb), s, p, seed)


@pytest.mark.parametrize("split", [1, 3])
def test_split_k_launcher(split):
    """The decode GEMM with 1 and 3 K slabs (3 > the slabs K needs: one slab is empty), in both
    LoRA modes and the dX form (transposed weight, output-side dropout)."""
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, SPLIT_K=split)
    M, K, N, r = 5, 37, 45, 13
    x, w, b, a, bb = _inputs(M, K, N, r, torch.float32, DEVICE)
    want, want_xa = _ref_fwd(x, w, b, a, bb, 0.5)
    for mode in (1, 2):
        y, xa = TL.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=mode, config=cfg)
        assert rel_err(y, want) <= 1e-5 and rel_err(xa, want_xa) <= 1e-5
    # dX = dY·W + mask∘(s·(dY·B)·A)/(1-p) with the GEMM on Wᵀ/Aᵀ views.
    dy = torch.randn(M, N, dtype=torch.float32, device=DEVICE)
    dyb = dy @ bb
    dx = torch.empty(M, K, dtype=torch.float32, device=DEVICE)
    FG.fused_gemm(dy, w.t(), dx, lora=1, u=dyb, lb=a.t(), scaling=0.5, dropout_p=0.3, seed=11,
                  config=cfg)
    want_dx = dy.double() @ w.double() + reference.apply_dropout(0.5 * dyb.double() @ a.double(), 11, 0.3)
    assert rel_err(dx, want_dx) <= 1e-5
    # the tickets are back at zero for the next launch
    assert all(int(t.abs().sum()) == 0 for t in FG._TICKETS.values())


def test_split_k_workspace_is_cached():
    """The decode path's fp32 workspaces are cached per (device, stream) and grown on demand,
    not allocated per call; u's workspace exists only for LORA=2. A reused (stale) buffer must
    not leak into the result."""
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, SPLIT_K=2)
    FG._WORKSPACE.clear()
    FG._WORKSPACE_U.clear()
    x, w, b, a, bb = _inputs(5, 37, 45, 13, torch.float32, DEVICE)
    TL.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=1, config=cfg)
    assert len(FG._WORKSPACE) == 1 and not FG._WORKSPACE_U
    (buf,) = FG._WORKSPACE.values()
    y, xa = TL.lora_linear_fwd(x[:3], w, b, a, bb, 0.5, 0.0, 0, mode=2, config=cfg)
    (same,) = FG._WORKSPACE.values()
    assert same is buf and len(FG._WORKSPACE_U) == 1
    want, want_xa = _ref_fwd(x[:3], w, b, a, bb, 0.5)
    assert rel_err(y, want) <= 1e-5 and rel_err(xa, want_xa) <= 1e-5
    x, w, b, a, bb = _inputs(5, 37, 300, 13, torch.float32, DEVICE)  # 2·5·300 > the buffer
    y, _ = TL.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, mode=1, config=cfg)
    (grown,) = FG._WORKSPACE.values()
    assert grown is not buf and grown.numel() >= 2 * 5 * 300
    assert rel_err(y, _ref_fwd(x, w, b, a, bb, 0.5)[0]) <= 1e-5


def test_out_column_view():
    x, w, b, a, bb = _inputs(7, 37, 45, 8, torch.float32, DEVICE)
    buf = torch.full((7, 60), 7.0, dtype=torch.float32, device=DEVICE)
    out = buf[:, 10:55]
    y, _ = TL.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, _ref_fwd(x, w, b, a, bb, 0.5)[0]) <= 1e-5
    assert bool((buf[:, :10] == 7).all()) and bool((buf[:, 55:] == 7).all())


@pytest.mark.parametrize("M", [3, 33])
def test_nan_propagates_to_its_row_only(M):
    # A NaN in row 1 of x must reach all of row 1 of y (through W, dropout or not) and no other
    # row; dx depends on dy, W, A, B only, so it stays finite.
    x, w, b, a, bb = _inputs(M, 37, 45, 8, torch.float32, DEVICE)
    x[1, 5] = float("nan")
    x.requires_grad_(True)
    y = lora_kernels.lora_linear(x, w, b, a, bb, dropout_p=0.3, dropout_seed=1, backend="triton")
    (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())
    assert bool(dx.isfinite().all())


@pytest.mark.parametrize("M,K,N,r", [(5, 6, 0, 3), (5, 6, 7, 0)])
def test_degenerate_sizes(M, K, N, r):
    """N or r = 0 (the reference cannot reshape K = 0): no kernel runs; output and every gradient still match the reference
    (with dropout on: the low-rank products are empty or zero, so no mask is drawn)."""
    x, w, b, a, bb = _inputs(M, K, N, r, torch.float32, DEVICE)
    _check(x, w, b, a, bb, p=0.2, grads=("x", "w", "bias", "a", "b"))


def test_large_rank_loops_over_rank_chunks():
    # r = 100 > 64: precomputed shrink over two rank tiles, epilogue loops over rank chunks.
    x, w, b, a, bb = _inputs(7, 37, 45, 100, torch.float32, DEVICE)
    _check(x, w, b, a, bb)


# ---- the GEMM core's spec axes: column scale, persistent / TMA schedule ----------------------
_SCHEDULES = [("tiles", None), ("split_k", None), ("persistent", "pointer"), ("persistent", "tma")]


def _core_case(M, K, N, r, dtype, device, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(a=rnd(M, K), w=rnd(N, K) / K ** 0.5, bias=rnd(N), la=rnd(r, K) / K ** 0.5,
             lb=rnd(N, r) / r ** 0.5, cs=rnd(N).abs() + 0.5)
    t["u"] = t["a"] @ t["la"].t()
    return {k: v.to(device=device, dtype=torch.float32 if k == "cs" else dtype)
            for k, v in t.items()}


@pytest.mark.parametrize("schedule,store", _SCHEDULES)
@pytest.mark.parametrize("lora", ["none", "seeded", "in_loop"])
def test_col_scale_epilogue(lora, schedule, store):
    """out = col_scale[n]·(a·wᵀ + s·u·lbᵀ) + bias[n] (bias after the scale) on every schedule
    of the core, against float64; 9 output tiles of 32x32 over the interpreter's 2 programs."""
    from lora_kernels.triton.gemm.modes import LoraMode
    M, K, N, r = 70, 40, 72, 5
    t = _core_case(M, K, N, r, torch.float32, DEVICE)
    mode = {"none": LoraMode.NONE, "seeded": LoraMode.SEEDED, "in_loop": LoraMode.IN_LOOP}[lora]
    out = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    u = t["u"] if lora == "seeded" else torch.empty(M, r, dtype=torch.float32, device=DEVICE)
    split = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, SPLIT_K=2)
    FG.fused_gemm(t["a"], t["w"], out, bias=t["bias"], lora=mode, u=u, la=t["la"], lb=t["lb"],
                  scaling=0.5, col_scale=t["cs"], schedule=schedule, store=store,
                  small_m_max=16, config=split if schedule == "split_k" else None)
    d = {k: v.double() for k, v in t.items()}
    low = 0.5 * (d["a"] @ d["la"].t()) @ d["lb"].t() if lora != "none" else 0.0
    want = d["cs"] * (d["a"] @ d["w"].t() + low) + d["bias"]
    assert rel_err(out, want) <= 1e-5
    if lora == "in_loop":
        assert rel_err(u, d["a"] @ d["la"].t()) <= 1e-5


def test_col_scale_rejects_bad_vectors():
    t = _core_case(5, 8, 8, 2, torch.float32, DEVICE)
    out = torch.empty(5, 8, device=DEVICE)
    for bad, err in [(t["cs"].half(), ValueError), (t["cs"][:4], ValueError),
                     (t["cs"].tolist(), TypeError)]:
        with pytest.raises(err, match="col_scale"):
            FG.fused_gemm(t["a"], t["w"], out, col_scale=bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store", ["pointer", "tma"])
def test_persistent_forward_and_dx(store, dtype):
    """The persistent schedule (descriptor or pointer memory path) for the forward and the dX
    form (N-major Wᵀ view, dropout mask in the seeded epilogue) over an odd tile count."""
    from lora_kernels.triton.gemm.modes import LoraMode
    M, K, N, r, p = 70, 40, 72, 5, 0.3
    t = _core_case(M, K, N, r, dtype, DEVICE, gen_seed=1)
    y = torch.empty(M, N, dtype=dtype, device=DEVICE)
    FG.fused_gemm(t["a"], t["w"], y, bias=t["bias"], lora=LoraMode.SEEDED, u=t["u"], lb=t["lb"],
                  scaling=0.5, schedule="persistent", store=store)
    d = {k: v.double().cpu() for k, v in t.items()}
    want = d["a"] @ d["w"].t() + d["bias"] + 0.5 * d["u"] @ d["lb"].t()
    assert rel_err(y, want) <= tol(dtype, DEVICE)
    # dX[M, N] = dY[M, 48]·W2[48, N] + mask∘(s·dyb·lb2ᵀ)/(1-p) of a layer with 48 outputs:
    # the kernel's w is the N-major view W2ᵀ.
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    dy, w2, dyb, lb2 = rnd(M, 48), rnd(48, N) / 7, rnd(M, r), rnd(N, r)
    dx = torch.empty(M, N, dtype=dtype, device=DEVICE)
    FG.fused_gemm(dy, w2.t(), dx, lora=LoraMode.SEEDED, u=dyb, lb=lb2, scaling=0.5,
                  dropout_p=p, seed=11, schedule="persistent", store=store)
    low = 0.5 * dyb.double().cpu() @ lb2.double().cpu().t()
    want_dx = dy.double().cpu() @ w2.double().cpu() + reference.apply_dropout(low, 11, p)
    assert rel_err(dx, want_dx) <= tol(dtype, DEVICE)


# ---- GPU only: bf16, benchmark-sized shapes, determinism, int64 offsets ----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r,p", [(1, 4096, 4096, 16, 0.0), (16, 4096, 14336, 16, 0.0),
                                       (17, 1000, 1003, 13, 0.1), (300, 4096, 4096, 64, 0.0),
                                       (2048, 4096, 4096, 16, 0.1), (2048, 1024, 4096, 8, 0.0)])
def test_gpu_shapes(M, K, N, r, p, dtype):
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, "cuda")
    _check(x, w, b, a, bb, scaling=2.0, p=p, grads=("x", "w", "bias", "a", "b"))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 300])
def test_gpu_fp32_tf32_when_torch_allows_it(M):
    # torch.set_float32_matmul_precision("high") lets the fp32 path use tf32 tensor cores,
    # which the project's GPU fp32 tolerance (5e-4) is set for.
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        x, w, b, a, bb = _inputs(M, 4096, 4096, 16, torch.float32, "cuda")
        _check(x, w, b, a, bb, p=0.1)
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 2048])
def test_gpu_deterministic(M):
    x, w, b, a, bb = _inputs(M, 4096, 4096, 16, torch.bfloat16, "cuda")
    dy = torch.randn(M, 4096, dtype=torch.bfloat16, device="cuda")

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
        y = lora_kernels.lora_linear(leaves[0], w, b, leaves[1], leaves[2], dropout_p=0.1,
                                     dropout_seed=5, backend="triton")
        return (y, *torch.autograd.grad(y, leaves, dy))

    first, second = run(), run()
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    assert all(int(t.abs().sum()) == 0 for t in FG._TICKETS.values())


@pytest.mark.gpu
def test_gpu_index_math_past_2_31():
    K, N, r = 4096, 64, 8
    M = 2**31 // K + 3  # M·K > 2^31 elements of x
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    _, w, b, a, bb = _inputs(1, K, N, r, torch.bfloat16, "cuda")
    y = lora_kernels.lora_linear(x, w, b, a, bb, dropout_p=0.1, dropout_seed=3, backend="triton")
    rows = slice(M - 5, M)  # the rows past the int32 boundary
    keep = reference.dropout_keep_mask(3, 5, K, 0.1, device="cuda", row_offset=M - 5)
    xd = x[rows].double() * keep / 0.9
    want = x[rows].double() @ w.double().t() + b.double() + (xd @ a.double().t()) @ bb.double().t()
    assert rel_err(y[rows], want) <= tol(torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["tma", "pointer"])
@pytest.mark.parametrize("lora", ["none", "seeded", "in_loop"])
def test_gpu_persistent_odd_tile_counts(lora, store):
    """bf16 persistent schedule at tile counts that do not divide the grid (1000 rows, 1032
    columns: 8 x 5 tiles of 128x256 over 132 programs, 8 x 9 of 128x128), col_scale on,
    forward form; the dX form with dropout for the seeded mode."""
    from lora_kernels.triton.gemm.modes import LoraMode
    mode = {"none": LoraMode.NONE, "seeded": LoraMode.SEEDED, "in_loop": LoraMode.IN_LOOP}[lora]
    M, K, N, r = 1000, 1024, 1032, 16
    t = _core_case(M, K, N, r, torch.bfloat16, "cuda", gen_seed=3)
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    u = t["u"] if lora == "seeded" else torch.empty(M, r, dtype=torch.bfloat16, device="cuda")
    FG.fused_gemm(t["a"], t["w"], out, bias=t["bias"], lora=mode, u=u, la=t["la"], lb=t["lb"],
                  scaling=2.0, col_scale=t["cs"], schedule="persistent", store=store)
    d = {k: v.double() for k, v in t.items()}
    low = 2.0 * (d["a"] @ d["la"].t()) @ d["lb"].t() if lora != "none" else 0.0
    want = d["cs"] * (d["a"] @ d["w"].t() + low) + d["bias"]
    assert rel_err(out, want) <= tol(torch.bfloat16, "cuda")
    if lora == "seeded":
        # dX form: dX [M, N] = dY [M, Q]·W2 [Q, N] + mask∘(s·dyb·lbᵀ)/(1-p); the kernel's w is
        # the N-major view W2ᵀ.
        Q = 520
        g = torch.Generator(device="cuda").manual_seed(4)
        dy = torch.randn(M, Q, device="cuda", generator=g).to(torch.bfloat16)
        w2 = (torch.randn(Q, N, device="cuda", generator=g) / Q ** 0.5).to(torch.bfloat16)
        dx = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
        FG.fused_gemm(dy, w2.t(), dx, lora=LoraMode.SEEDED, u=t["u"], lb=t["lb"], scaling=2.0,
                      dropout_p=0.1, seed=5, schedule="persistent", store=store)
        want_dx = (dy.double() @ w2.double()
                   + reference.apply_dropout(2.0 * d["u"] @ d["lb"].t(), 5, 0.1))
        assert rel_err(dx, want_dx) <= tol(torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["tma", "pointer"])
def test_gpu_persistent_offsets_past_2_31(store):
    """The persistent forward on x with M·K > 2³¹ elements (int64 pointer offsets; 32-bit
    descriptor coordinates stay < 2³¹)."""
    from lora_kernels.triton.gemm.modes import LoraMode
    K, N, r = 4096, 64, 8
    M = 2**31 // K + 300
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    _, w, b, a, bb = _inputs(1, K, N, r, torch.bfloat16, "cuda")
    u = (x @ a.t())
    y = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    FG.fused_gemm(x, w, y, bias=b, lora=LoraMode.SEEDED, u=u, lb=bb, scaling=0.5,
                  schedule="persistent", store=store)
    rows = slice(M - 300, M)
    want = (x[rows].double() @ w.double().t() + b.double()
            + 0.5 * u[rows].double() @ bb.double().t())
    assert rel_err(y[rows], want) <= tol(torch.bfloat16, "cuda")


def test_tuned_configs_file(tmp_path, monkeypatch):
    """Tuned configs come from the JSON for this (kernel, shape class, device, Triton version),
    filled with the in-code defaults; anything else, or a malformed file, falls back."""
    import json

    from lora_kernels.triton import configs as C, tuned
    entry = {"kernel": "gemm", "shape_class": "large", "device": "cpu",
             "triton": tuned.triton_version(),
             "configs": [{"kwargs": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                          "num_warps": 4, "num_stages": 2}]}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv("LORA_KERNELS_TUNED_CONFIGS", str(path))
    (cfg,) = tuned.lookup("gemm", "large", "cpu", C.GEMM_LARGE)
    assert cfg.kwargs["BLOCK_M"] == 64 and cfg.kwargs["SPLIT_K"] == 1 and cfg.num_stages == 2
    assert tuned.lookup("gemm", "medium", "cpu", C.GEMM_MEDIUM) is C.GEMM_MEDIUM
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("LORA_KERNELS_TUNED_CONFIGS", str(bad))
    with pytest.warns(RuntimeWarning, match="tuned configs"):
        assert tuned.lookup("gemm", "large", "cpu", C.GEMM_LARGE) is C.GEMM_LARGE


def test_legal_specs():
    """The spec list: every axis value appears, illegal combinations are refused by name."""
    from lora_kernels.triton.gemm import spec as SP
    from lora_kernels.triton.gemm.spec import GemmSpec, legal_specs
    specs = legal_specs()
    assert len(specs) == len(set(specs))
    for axis, values in (("rows", SP.ROWS), ("lowrank", SP.LOWRANK),
                         ("col_scale", SP.COL_SCALE), ("schedule", SP.SCHEDULE),
                         ("store", SP.STORE)):
        assert {getattr(s, axis) for s in specs} == set(values)
    with pytest.raises(ValueError, match="persistent"):
        GemmSpec(store="tma")
    with pytest.raises(ValueError, match="schedule"):
        GemmSpec(schedule="grouped")
    assert GemmSpec(schedule="persistent", store="tma").constexprs()["STORE"] == 1


def test_config_pruning():
    """Config lists and pruning rules (pure Python, no kernel launch)."""
    from lora_kernels.triton import configs as C
    big = C.prune_dropout(C.GEMM_LARGE, {}, DROPOUT=True)
    assert big and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in big)
    assert C.prune_dropout(C.GEMM_LARGE, {}, DROPOUT=False) == C.GEMM_LARGE
    x = torch.empty(1, 4096)
    for N, K in [(4096, 4096), (45, 37), (14336, 4096)]:
        kept = C.prune_small(C.GEMM_SMALL, {"M": 1, "N": N, "K": K, "a_ptr": x})
        assert kept and all(c.kwargs["BLOCK_M"] == 16 for c in kept)
        for c in kept:  # a split always leaves ≥ 2 K iterations per slab
            split, bk = c.kwargs["SPLIT_K"], c.kwargs["BLOCK_K"]
            assert split == 1 or -(-K // split) > bk
    bf, f32 = torch.empty(1, 1, dtype=torch.bfloat16), torch.empty(1, 1)
    for a, kw, cap in [(bf, {}, 128), (bf, {"DROPOUT": True}, 64), (bf, {"LORA": 2}, 64),
                       (bf, {"DROPOUT": True, "STORE": 1}, 128), (f32, {}, 128)]:
        kept = C.prune_persistent(C.GEMM_PERSISTENT, {"a_ptr": a}, **kw)
        assert kept and all(C.stage_bytes(c, a.element_size()) <= C.SMEM_BYTES
                            and C.acc_per_thread(c) <= cap for c in kept)
        if cap == 128 and kw:  # dropout + descriptors: 128 per thread only with 8 warps
            assert all(c.num_warps == 8 for c in kept if C.acc_per_thread(c) > 64)
    assert TL.lora_mode(1, 16, 0.0) == 2 and TL.lora_mode(8192, 16, 0.0) == 1
    assert TL.lora_mode(1, 16, 0.1) == 1 and TL.lora_mode(1, 100, 0.0) == 1


# ---- CPU: the GPU code paths compile for sm_90 (bench/sass_report.py) -------------------------
def test_kernels_compile_for_sm90():
    """The interpreter never compiles: constexpr branches, int64 offsets, the split-K ticket,
    tensor descriptors and the dropout epilogue only meet Triton's compiler and ptxas on a GPU.
    ``bench/sass_report.py --fast --check`` compiles every legal GEMM-core spec (plus the
    shrink, dA/dB and mask kernels) for sm_90a with a fake driver, in a process without the
    interpreter, and fails on any spill or a large-M forward/dX kernel without wgmma + TMA."""
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without ptxas")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "sass_report.py"), "--fast",
                           "--check"], capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    from lora_kernels.triton.gemm.spec import legal_specs
    for spec in legal_specs():  # every legal spec was compiled
        assert spec.name in proc.stdout, spec.name
