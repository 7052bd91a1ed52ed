"""The panel-shared low-rank mode (``LoraMode.PANEL``, gemm/panel.py) of the persistent GEMM:
x·Aᵀ made as K-slice shares one wave ahead, a tile whose panel is not ready computing it in
its K loop. Both paths are exercised on CPU (interpreter, programs run one after another): a
1-program grid (every panel after the first group is ready: shared path), the normal grid
(mostly the fallback) and a forced producer distance past the tile count (fallback only);
all must give the same bits, and match float64."""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels import reference

from helpers import rel_err, tol, triton_device, triton_dtypes

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="Triton can run neither on a GPU nor in the interpreter")

if DEVICE is not None:
    import lora_kernels.triton.configs as C
    import lora_kernels.triton.fused_gemm as FG
    import lora_kernels.triton.lora_linear as TL
    from lora_kernels.triton.gemm.modes import LoraMode
    from lora_kernels.triton.gemm.spec import GemmSpec

DTYPES = triton_dtypes(DEVICE) if DEVICE else []


def _case(M, K, N, r, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(x=rnd(M, K), w=rnd(N, K) / K ** 0.5, bias=rnd(N), la=rnd(r, K) / K ** 0.5,
             lb=rnd(N, r) / r ** 0.5, cs=rnd(N).abs() + 0.5)
    return {k: v.to(device=device, dtype=torch.float32 if k == "cs" else dtype)
            for k, v in t.items()}


def _hits(device) -> int:
    """Tiles that found their panel ready, over all launches so far (cnt[0])."""
    return int(sum(int(buf[0]) for key, buf in FG._PANEL_CNT.items() if key[0] == str(device)))


def _run(t, store, col_scale, ahead=0, config=None):
    M, N, r = t["x"].shape[0], t["w"].shape[0], t["la"].shape[0]
    y = torch.empty(M, N, dtype=t["x"].dtype, device=t["x"].device)
    u = torch.full((M, r), float("nan"), dtype=t["x"].dtype, device=t["x"].device)
    h0 = _hits(t["x"].device)
    FG.fused_gemm(t["x"], t["w"], y, bias=t["bias"], lora=LoraMode.PANEL, u=u, la=t["la"],
                  lb=t["lb"], scaling=0.75, col_scale=t["cs"] if col_scale else None,
                  schedule="persistent", store=store, panel_ahead=ahead, config=config)
    return y, u, _hits(t["x"].device) - h0


def _one_program(monkeypatch):
    monkeypatch.setattr(C, "num_sms", lambda device: 1)
    monkeypatch.setattr(C, "ctas_per_sm", lambda cfg, elt=2: 1)


# M, K, N, r: odd tile counts under the 32x32 interpreter tiles (7 x 5, 3 x 3 tiles), K not a
# multiple of the slice length or of BLOCK_K, ranks padded to 16.
SHAPES = [(200, 296, 152, 7), (70, 104, 72, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store", ["pointer", "tma"])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_panel_paths_same_bits(monkeypatch, M, K, N, r, store, dtype):
    t = _case(M, K, N, r, dtype, DEVICE, seed=M + K)
    col_scale = store == "tma"
    y_fb, u_fb, hits_fb = _run(t, store, col_scale, ahead=10**6)  # no panel ever published
    assert hits_fb == 0
    y_grid, u_grid, _ = _run(t, store, col_scale)  # the normal grid: mostly the fallback
    with monkeypatch.context() as mp:
        _one_program(mp)
        y_one, u_one, hits_one = _run(t, store, col_scale)
    assert hits_one > 0  # the shared path ran
    for y, u in ((y_grid, u_grid), (y_one, u_one)):
        assert torch.equal(y, y_fb) and torch.equal(u, u_fb)
    d = {k: v.double().cpu() for k, v in t.items()}
    u_want = d["x"] @ d["la"].t()
    low = 0.75 * u_want @ d["lb"].t()
    cs = d["cs"] if col_scale else 1.0
    want = cs * (d["x"] @ d["w"].t() + low) + d["bias"]
    assert rel_err(y_fb, want) <= tol(dtype, DEVICE)
    assert rel_err(u_fb, u_want) <= tol(dtype, DEVICE)
    # Every ticket that was taken is back at 0 for the next launch.
    for key, buf in FG._PANEL_CNT.items():
        assert int(buf[2::2].abs().sum()) == 0


def test_panel_hit_count_one_program(monkeypatch):
    """1 program, 7 x 5 tiles of 32x32, GROUP_M = 2: D = 1 + 2·4 = 9 tiles, so the panels of
    the first group (2 panels: 10 tiles) have no producer and every later tile finds its panel
    ready: 25 hits."""
    t = _case(200, 296, 152, 7, torch.float32, DEVICE, seed=5)
    _one_program(monkeypatch)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1, WARP_SPEC=False)
    _, _, hits = _run(t, "pointer", False, config=cfg)
    assert hits == 35 - 10


def test_panel_mode_selection():
    assert TL.forward_mode(8192, 16, 0.0) == LoraMode.PANEL
    assert TL.forward_mode(8192, 16, 0.1) == LoraMode.SEEDED  # dropout: shrink + seeded
    assert TL.forward_mode(8192, 100, 0.0) == LoraMode.SEEDED  # past the in-loop rank cap
    assert TL.forward_mode(1, 16, 0.0) == LoraMode.IN_LOOP
    assert TL.lora_mode(8192, 16, 0.0) == LoraMode.SEEDED  # dora / qlora keep this one
    with pytest.raises(ValueError, match="persistent"):
        GemmSpec(lowrank="panel")
    assert GemmSpec(lowrank="panel", schedule="persistent").constexprs()["LORA"] == 4
    # Off the persistent schedule the panel mode is the in-loop spec (same operands).
    assert FG.select_spec(8192, LoraMode.PANEL, False, "large", False).lowrank == "in_loop"
    assert FG.select_spec(8192, LoraMode.PANEL, False, "large", True).lowrank == "panel"


def _force_panel(monkeypatch, store):
    """The public op on the panel path: forward_mode picks PANEL for p = 0 (SEEDED for
    p > 0 as in production) and the panel spec runs persistent on `store`."""
    monkeypatch.setattr(TL, "forward_mode", lambda m, r, p: LoraMode.PANEL if p == 0.0
                        else LoraMode.SEEDED)
    orig = FG.select_spec

    def select(M, lora, col_scale, path, tma_ok, schedule=None, store_=None, weight="dense"):
        if LoraMode(lora) == LoraMode.PANEL:
            return orig(M, lora, col_scale, path, tma_ok, "persistent", store, weight)
        return orig(M, lora, col_scale, path, tma_ok, schedule, store_, weight)
    monkeypatch.setattr(FG, "select_spec", select)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", ["normal", "one"])
def test_lora_linear_panel_forward_and_grads(monkeypatch, grid, dtype):
    """y, xa and every gradient through lora_kernels.lora_linear(backend="triton") with the
    panel forward (tma store on the 1-program grid: shared path; pointer on the normal one)."""
    _force_panel(monkeypatch, "tma" if grid == "one" else "pointer")
    if grid == "one":
        _one_program(monkeypatch)
    M, K, N, r = 100, 72, 104, 5  # 4 x 4 tiles
    g = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, w, b = rnd(M, K), rnd(N, K) / K ** 0.5, rnd(N)
    a, bb = rnd(r, K) / K ** 0.5, rnd(N, r) / r ** 0.5
    leaves = [v.to(dtype).requires_grad_() for v in (x, w, b, a, bb)]
    y = lora_kernels.lora_linear(*leaves, scaling=0.5, backend="triton")
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    ref = reference.lora_linear(*ref_leaves, 0.5, 0.0, 0)
    assert rel_err(y, ref) <= tol(dtype, DEVICE)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, dy)
    for name, gt, wt in zip(("x", "w", "bias", "a", "b"), got, want):
        assert rel_err(gt, wt) <= tol(dtype, DEVICE), name
    # xa as the forward saves it for the backward
    y2, xa = TL.lora_linear_fwd(leaves[0].detach(), leaves[1].detach(), leaves[2].detach(),
                                leaves[3].detach(), leaves[4].detach(), 0.5, 0.0, 0)
    assert torch.equal(y2, y.detach())
    assert rel_err(xa, x.to(dtype).double() @ a.to(dtype).double().t()) <= tol(dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_dropout_panel_dx(monkeypatch, dtype):
    """p > 0: the forward stays shrink + seeded (its mask is on x), the dX takes the panel mode
    with the mask in its epilogue (read from the forward's packed bits): the reference holds."""
    _force_panel(monkeypatch, "pointer")
    M, K, N, r, p, seed = 100, 72, 104, 5, 0.3, 77
    g = torch.Generator().manual_seed(10)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, w, a, bb = rnd(M, K), rnd(N, K) / K ** 0.5, rnd(r, K) / K ** 0.5, rnd(N, r) / r ** 0.5
    leaves = [v.to(dtype).requires_grad_() for v in (x, w, a, bb)]
    y = lora_kernels.lora_linear(leaves[0], leaves[1], None, leaves[2], leaves[3], scaling=0.5,
                                 dropout_p=p, backend="triton", dropout_seed=seed)
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    ref = reference.lora_linear(ref_leaves[0], ref_leaves[1], None, ref_leaves[2],
                                ref_leaves[3], 0.5, p, seed)
    assert rel_err(y, ref) <= tol(dtype, DEVICE)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, [leaves[0], leaves[2], leaves[3]], dy.to(dtype))
    want = torch.autograd.grad(ref, [ref_leaves[0], ref_leaves[2], ref_leaves[3]], dy)
    for gt, wt in zip(got, want):
        assert rel_err(gt, wt) <= tol(dtype, DEVICE)


# ---- GPU only: bf16, benchmark-sized and odd tile counts, offsets past 2³¹ --------------------
@pytest.mark.gpu
@pytest.mark.parametrize("store", ["tma", "pointer"])
@pytest.mark.parametrize("M,K,N", [(1000, 1024, 1032), (8192, 4096, 4096), (4099, 4096, 1000)])
def test_gpu_panel_bf16_paths_same_bits(M, K, N, store):
    """bf16 on the GPU: the shared path (auto D; the hit count is printed: the first GPU run
    records the hit rate) and the forced fallback give the same bits (the shares and the
    sliced K loop run the same wgmma shapes in the same order), and match float64."""
    t = _case(M, K, N, 16, torch.bfloat16, "cuda", seed=3)
    y_fb, u_fb, hits_fb = _run(t, store, True, ahead=10**9)
    y, u, hits = _run(t, store, True)
    torch.cuda.synchronize()
    tiles_hint = f"hits={hits}"
    assert hits_fb == 0, tiles_hint
    assert torch.equal(y, y_fb) and torch.equal(u, u_fb), tiles_hint
    d = {k: v.double() for k, v in t.items()}
    u_want = d["x"] @ d["la"].t()
    want = d["cs"] * (d["x"] @ d["w"].t() + 0.75 * u_want @ d["lb"].t()) + d["bias"]
    assert rel_err(y, want) <= tol(torch.bfloat16, "cuda")
    assert rel_err(u, u_want) <= tol(torch.bfloat16, "cuda")
    print(f"panel M={M} K={K} N={N} {store}: {hits} tiles found their panel ready")


@pytest.mark.gpu
def test_gpu_panel_deterministic():
    t = _case(8192, 4096, 4096, 16, torch.bfloat16, "cuda", seed=4)
    first = _run(t, "tma", False)
    for _ in range(3):
        again = _run(t, "tma", False)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["tma", "pointer"])
def test_gpu_panel_offsets_past_2_31(store):
    """x with M·K > 2³¹ elements: the producers' int64 row offsets and 32-bit descriptor
    coordinates (< 2³¹)."""
    K, N, r = 4096, 64, 8
    M = 2**31 // K + 300
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    t = _case(1, K, N, r, torch.bfloat16, "cuda", seed=6)
    t["x"] = x
    y, u, _ = _run(t, store, False)
    rows = slice(M - 300, M)
    xr = x[rows].double()
    u_want = xr @ t["la"].double().t()
    want = xr @ t["w"].double().t() + t["bias"].double() + 0.75 * u_want @ t["lb"].double().t()
    assert rel_err(y[rows], want) <= tol(torch.bfloat16, "cuda")
    assert rel_err(u[rows], u_want) <= tol(torch.bfloat16, "cuda")


# dY [200, 104] → dX [200, 136]: 7 x 5 tiles under the 32x32 interpreter tiles
DX_M, DX_N, DX_K, DX_R, DX_S = 200, 104, 136, 6, 0.75


def _dx_form_on_every_path(monkeypatch, dtype, data_seed, store, **drop):
    """The dX form (a = dY [M, N], w = Wᵀ view, la = Bᵀ, lb = Aᵀ) on the fallback-only, normal
    and 1-program paths: asserts they give the same bits and the 1-program grid hits; returns
    the operands and (dx, dyb, db) of the first path."""
    M, N, K, r, s = DX_M, DX_N, DX_K, DX_R, DX_S
    g = torch.Generator().manual_seed(data_seed)
    rnd = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)
    dy, w, a, b, xa = rnd(M, N), rnd(N, K) / N ** 0.5, rnd(r, K), rnd(N, r) / N ** 0.5, rnd(M, r)
    dy, w, a, b, xa = (t.to(dtype=dtype, device=DEVICE) for t in (dy, w, a, b, xa))
    outs = []
    for grid, ahead in (("normal", 10**6), ("normal", 0), ("one", 0)):
        with monkeypatch.context() as mp:
            if grid == "one":
                _one_program(mp)
            dx = torch.empty(M, K, dtype=dtype, device=DEVICE)
            dyb = torch.full((M, r), float("nan"), dtype=dtype, device=DEVICE)
            db = torch.full((N, r), float("nan"), dtype=dtype, device=DEVICE)
            h0 = _hits(DEVICE)
            FG.fused_gemm(dy, w.t(), dx, lora=LoraMode.PANEL, u=dyb, la=b.t(), lb=a.t(),
                          scaling=s, schedule="persistent", store=store, panel_ahead=ahead,
                          db_out=db, db_u=xa, **drop)
            if grid == "one":
                assert _hits(DEVICE) - h0 > 0
            outs.append((dx, dyb, db))
    for o in outs[1:]:
        assert all(torch.equal(q, o0) for q, o0 in zip(o, outs[0]))
    return (dy, w, a, b, xa), outs[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store", ["pointer", "tma"])
def test_panel_dx_form_makes_dyb_and_db(monkeypatch, store, dtype):
    """The dX form: the GEMM writes dyb = dY·B and dB = s·dYᵀ·xa from the dY tiles its shares
    load; same bits on every path."""
    s = DX_S
    (dy, w, a, b, xa), (dx, dyb, db) = _dx_form_on_every_path(monkeypatch, dtype, 21, store)
    d = lambda t: t.double().cpu()
    dyb_want = d(dy) @ d(b)
    assert rel_err(dyb, dyb_want) <= tol(dtype, DEVICE)
    assert rel_err(dx, d(dy) @ d(w) + s * dyb_want @ d(a)) <= tol(dtype, DEVICE)
    assert rel_err(db, s * d(dy).t() @ d(xa)) <= tol(dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [False, True])
def test_panel_dx_form_with_dropout(monkeypatch, bits, dtype):
    """The dX form at p > 0: dX = dY·W + keep∘(s·dyb·A)/(1-p) with the mask on dX's (m, k) grid,
    read from packed bits or redrawn (same mask), dyb and dB unmasked; the same bits on the
    fallback, normal and 1-program paths, and the seeded dX's values."""
    M, K, s, p, seed = DX_M, DX_K, DX_S, 0.3, 1234
    keep_bits = reference.dropout_keep_packed(seed, M, K, p, DEVICE) if bits else None
    (dy, w, a, b, xa), (dx, dyb, db) = _dx_form_on_every_path(
        monkeypatch, dtype, 22, "pointer", dropout_p=p, seed=seed, keep_bits=keep_bits)
    d = lambda t: t.double().cpu()
    keep = reference.dropout_keep_mask(seed, M, K, p).cpu()
    dyb_want = d(dy) @ d(b)
    want = d(dy) @ d(w) + torch.where(keep, s * dyb_want @ d(a) / (1 - p), 0.0)
    assert rel_err(dx, want) <= tol(dtype, DEVICE)
    assert rel_err(dyb, dyb_want) <= tol(dtype, DEVICE)
    assert rel_err(db, s * d(dy).t() @ d(xa)) <= tol(dtype, DEVICE)
    seeded = torch.empty(M, K, dtype=dtype, device=DEVICE)
    FG.fused_gemm(dy, w.t(), seeded, lora=LoraMode.SEEDED, u=dyb, lb=a.t(), scaling=s,
                  dropout_p=p, seed=seed, keep_bits=keep_bits)
    assert rel_err(dx, d(seeded)) <= tol(dtype, DEVICE)


@pytest.mark.parametrize("where", ["a", "b", "x"])
def test_panel_single_inf_lands_where_the_reference_puts_it(monkeypatch, where):
    """One inf in A, B or x on the panel forward + dX (1-program grid: shared and fallback
    panels both): y and dX are non-finite exactly where the float64 reference is."""
    _force_panel(monkeypatch, "pointer")
    _one_program(monkeypatch)
    M, K, N, r = 100, 72, 104, 5
    g = torch.Generator().manual_seed(12)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(x=rnd(M, K), w=rnd(N, K) / K ** 0.5, a=rnd(r, K) / K ** 0.5, b=rnd(N, r) / r ** 0.5)
    t[where][(3, 20) if where != "b" else (20, 3)] = float("inf")
    leaves = {k: v.float().requires_grad_(k == "x") for k, v in t.items()}
    y = lora_kernels.lora_linear(leaves["x"], leaves["w"], None, leaves["a"], leaves["b"],
                                 scaling=0.5, backend="triton")
    ref_x = t["x"].clone().requires_grad_()
    ref = reference.lora_linear(ref_x, t["w"], None, t["a"], t["b"], 0.5, 0.0, 0)
    dy = rnd(M, N)
    (dx,) = torch.autograd.grad(y, [leaves["x"]], dy.float())
    (dx_ref,) = torch.autograd.grad(ref, [ref_x], dy)
    for got, want in ((y, ref), (dx, dx_ref)):
        got, want = got.detach().double(), want.detach()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        if where != "x":
            assert torch.equal(torch.isnan(got), torch.isnan(want))
        # (an inf in x: its row of u is ±inf, and the rank columns padded to BLOCK_R are
        # inf·0 = NaN, so that row of y is NaN where the reference may have ±inf — the
        # in-loop mode's long-standing behaviour, same row either way)
