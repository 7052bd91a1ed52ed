"""Numerics at the edges, on every backend this process can run.

* NaN/Inf isolation: a non-finite value in x, W, b, A, B, a slot's scalings or ranks-padding
  lands in exactly the outputs (and gradients) where the float64 reference has it - same NaN
  positions, same ±inf positions - and nowhere else. In particular a ``-1`` token, another
  slot's token, an inactive slot, and rank rows past a slot's rank are never contaminated.
* fp16 overflow - the documented behaviour (RELIABILITY.md): a result outside fp16's range
  becomes ±inf with the reference's sign, never NaN and never a clamped finite value, and only
  its own rows; a result inside the range whose partial sums (the base GEMM alone, or the
  rank-r intermediate) overflow is either correct or non-finite like the fp16 torch
  composition - never finite and wrong, never NaN where that composition is finite.
* large K (≥ 16384, not a block multiple) within the contract's tolerance, forward and backward;
* determinism: repeated calls are bitwise identical, forward and every gradient, dropout on;
* index arithmetic past 2³¹ elements (GPU only; T·K > 2³¹ in bf16, ~4.3 GB per operand).
"""

from __future__ import annotations

import gc

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import assert_within_contract, f64, gen, randn, rel_err, tol, triton_device


# numpy (under the Triton interpreter) warns about the very NaN/inf arithmetic tested here.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _backends() -> list:
    out = [pytest.param(("torch", "cpu"), id="torch")]
    dev = triton_device()
    if dev is not None:
        out.append(pytest.param(("triton", dev), id=f"triton-{dev}",
                                marks=[pytest.mark.gpu] if dev == "cuda" else []))
    if torch.cuda.is_available():
        from lora_kernels import _ext
        if _ext.why_unavailable() is None:
            out.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu))
    return out


BACKENDS = _backends()


def _dtypes(be) -> list:
    """fp32/fp16/bf16 - but the Triton interpreter gets bf16 wrong (DESIGN.md) and is slow, so
    it runs fp32 only here; its fp16 paths are fuzzed in test_properties.py."""
    name, device = be
    if name == "triton" and device == "cpu":
        return [torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16]


def _interp(be) -> bool:
    return be == ("triton", "cpu")


def same_nonfinite(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool = True) -> None:
    """NaN where the reference has NaN, +inf where it has +inf, -inf where -inf; nowhere else.
    ``exact=False``: only the non-finite positions must agree (an infinite *scaling* makes
    NaN-vs-inf depend on association: (s·xa)·B sums ±inf terms, s·(xa·B) does not)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    checks = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)) if exact \
        else (("non-finite", lambda t: ~torch.isfinite(t)),)
    for what, fn in checks:
        g, w = fn(got), fn(want)
        if not torch.equal(g, w):
            extra = (g & ~w).nonzero()[:5].tolist()
            missing = (w & ~g).nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {what} pattern differs from the reference: extra at "
                                 f"{extra}, missing at {missing}")


def close_where_finite(name, got, want, dtype, device) -> None:
    fin = torch.isfinite(want.detach().cpu())
    err = rel_err(got.detach().cpu()[fin], want.detach().cpu()[fin])
    assert err <= tol(dtype, device), f"{name}: finite part off by {err:.3g}"


# ------------------------------------------------------------------------------------------
# NaN / Inf isolation
# ------------------------------------------------------------------------------------------
M, K, N, R = 7, 37, 19, 5
POISONS = {"nan": float("nan"), "inf": float("inf")}
# (tensor, index) for the single-adapter op: one x element, a weight column, a bias entry,
# an A row element, a B entry.
SINGLE_SPOTS = {"x": (3, 11), "weight": (4, 11), "bias": (6,), "lora_a": (2, 20), "lora_b": (8, 1)}


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("where", list(SINGLE_SPOTS))
@pytest.mark.parametrize("poison", list(POISONS))
def test_single_nonfinite_lands_where_the_reference_puts_it(be, where, poison):
    name, dev = be
    g = gen(1)
    for dtype in _dtypes(be):
        t = dict(x=randn(M, K, generator=g, dtype=dtype, device=dev),
                 weight=randn(N, K, generator=g, dtype=dtype, device=dev, scale=K ** -0.5),
                 bias=randn(N, generator=g, dtype=dtype, device=dev),
                 lora_a=randn(R, K, generator=g, dtype=dtype, device=dev, scale=K ** -0.5),
                 lora_b=randn(N, R, generator=g, dtype=dtype, device=dev))
        t[where][SINGLE_SPOTS[where]] = POISONS[poison]
        for k in t:
            t[k].requires_grad_(True)
        y = lk.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                           scaling=0.7, backend=name)
        t64 = {k: f64(v) for k, v in t.items()}
        y64 = ref.lora_linear(t64["x"], t64["weight"], t64["bias"], t64["lora_a"],
                              t64["lora_b"], 0.7)
        # An infinite B entry meets u = x·Aᵀ, which a fused kernel may add in per-K-split
        # pieces of either sign: ±inf·(pieces) can sum to NaN where s·(u·Bᵀ) is ±inf. Same
        # positions non-finite is then the contract; NaN-vs-inf is association (RELIABILITY.md).
        exact = not (where == "lora_b" and poison == "inf")
        same_nonfinite(f"{dtype} y", y, y64, exact)
        close_where_finite(f"{dtype} y", y, y64, dtype, dev)
        dy = randn(M, N, generator=g, dtype=dtype, device=dev)
        grads = torch.autograd.grad(y, list(t.values()), dy)
        grads64 = torch.autograd.grad(y64, list(t64.values()), dy.to("cpu", torch.float64))
        for k, got, want in zip(t, grads, grads64):
            same_nonfinite(f"{dtype} d{k}", got, want, exact)


S, RMAX = 4, 6
IDS = [2, -1, 0, 2, 3, -1, 0, 2, 0]          # slot 1 has no tokens
RANKS = [6, 4, 0, 3]                          # slot 2 has rank 0: its A/B are never read
# Spots (tensor, index) and which rows they may reach. Rank padding: slot 0 rank 6 = RMAX (no
# padding), slot 3 rank 3 -> A rows 3..5 and B columns 3..5 are padding.
MULTI_SPOTS = {
    "x[-1 token]": ("x", (1, 5)),
    "x[slot 0 token]": ("x", (2, 5)),
    "A[slot 0]": ("lora_a", (0, 1, 7)),
    "B[slot 3]": ("lora_b", (3, 4, 2)),
    "scalings[slot 3]": ("scalings", (3,)),
    "A[inactive slot 1]": ("lora_a", (1, 0, 0)),
    "scalings[inactive slot 1]": ("scalings", (1,)),
    "A[rank-0 slot 2]": ("lora_a", (2, 0, 3)),
    "B[rank-0 slot 2]": ("lora_b", (2, 5, 0)),
    "A[slot 3 rank padding]": ("lora_a", (3, 4, 9)),
    "B[slot 3 rank padding]": ("lora_b", (3, 7, 5)),
}


def _multi_inputs(dtype, dev, g):
    T = len(IDS)
    return dict(x=randn(T, K, generator=g, dtype=dtype, device=dev),
                weight=randn(N, K, generator=g, dtype=dtype, device=dev, scale=K ** -0.5),
                bias=randn(N, generator=g, dtype=dtype, device=dev),
                lora_a=randn(S, RMAX, K, generator=g, dtype=dtype, device=dev, scale=K ** -0.5),
                lora_b=randn(S, N, RMAX, generator=g, dtype=dtype, device=dev),
                scalings=torch.tensor([0.5, 1.5, 2.0, -0.75]))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("spot", list(MULTI_SPOTS))
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_multi_nonfinite_stays_in_its_slot(be, spot, poison):
    name, dev = be
    g = gen(2)
    ids = torch.tensor(IDS)
    ranks = torch.tensor(RANKS)
    for dtype in _dtypes(be):
        t = _multi_inputs(dtype, dev, g)
        key, idx = MULTI_SPOTS[spot]
        t[key][idx] = POISONS[poison]
        diff = ("x", "lora_a", "lora_b")
        for k in diff:
            t[k].requires_grad_(True)
        batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), S)
        y = lk.multi_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], batch,
                                 scalings=t["scalings"].to(dev), ranks=ranks.to(dev), backend=name)
        t64 = {k: f64(v) for k, v in t.items()}
        y64 = ref.multi_lora_linear(t64["x"], t64["weight"], t64["bias"], t64["lora_a"],
                                    t64["lora_b"], ids, t64["scalings"], ranks)
        exact = key != "scalings"
        same_nonfinite(f"{dtype} y", y, y64, exact)
        close_where_finite(f"{dtype} y", y, y64, dtype, dev)
        dy = randn(len(IDS), N, generator=g, dtype=dtype, device=dev)
        opts = dict(allow_unused=True, materialize_grads=True)
        grads = torch.autograd.grad(y, [t[k] for k in diff], dy, **opts)
        grads64 = torch.autograd.grad(y64, [t64[k] for k in diff], dy.to("cpu", torch.float64), **opts)
        for k, got, want in zip(diff, grads, grads64):
            same_nonfinite(f"{dtype} d{k}", got, want, exact)

        # The Punica pair: a -1 token's xa row stays exactly zero, its y row untouched.
        xs = t["x"].detach()
        xa = lk.lora_shrink(xs, t["lora_a"].detach(), batch, t["scalings"].to(dev),
                            ranks=ranks.to(dev), backend=name)
        xa64 = ref.lora_shrink(f64(xs), f64(t["lora_a"]), ids, t64["scalings"].detach(), ranks)
        same_nonfinite(f"{dtype} xa", xa, xa64, exact)
        assert (xa[(ids == -1).to(dev)] == 0).all()
        y0 = randn(len(IDS), N, generator=g, dtype=dtype, device=dev)
        y1 = lk.lora_expand(y0.clone(), xa, t["lora_b"].detach(), batch, ranks=ranks.to(dev),
                            backend=name)
        want = ref.lora_expand(f64(y0), xa.double().cpu(), f64(t["lora_b"]).detach(), ids, ranks)
        same_nonfinite(f"{dtype} expand", y1, want, exact)
        base = (ids == -1).to(dev)
        assert torch.equal(y1[base], y0[base])


# ------------------------------------------------------------------------------------------
# fp16 overflow
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("be", BACKENDS)
def test_fp16_out_of_range_results_are_signed_inf_in_their_rows_only(be):
    """Rows 0/1 have results near ±2.6e5 (fp16 max is 65504): exactly ±inf there, no NaN; the
    other rows are finite and accurate. Single op and multi op (overflow from one slot's
    scaling)."""
    name, dev = be
    h, Kc, Nc, r = torch.float16, 64, 24, 4
    g = gen(3)
    x = randn(6, Kc, generator=g, dtype=h, device=dev)
    x[0], x[1] = 4000.0, -4000.0
    W = (torch.rand(Nc, Kc, generator=g, dtype=torch.float64) + 0.5).to(h).to(dev)
    A = (torch.rand(r, Kc, generator=g, dtype=torch.float64) * 0.01).to(h).to(dev)
    B = (torch.rand(Nc, r, generator=g, dtype=torch.float64) * 0.01).to(h).to(dev)
    b = randn(Nc, generator=g, dtype=h, device=dev)
    y = lk.lora_linear(x, W, b, A, B, scaling=0.5, backend=name)
    assert torch.isposinf(y[0]).all() and torch.isneginf(y[1]).all()
    assert torch.isfinite(y[2:]).all()
    y64 = ref.lora_linear(f64(x), f64(W), f64(b), f64(A), f64(B), 0.5)
    assert rel_err(y[2:], y64[2:]) <= tol(h, dev)

    # Multi: slot 1's huge scaling pushes its tokens' LoRA term past the range; base-only and
    # slot-0 tokens stay finite and accurate.
    xm = (torch.rand(5, Kc, generator=g, dtype=torch.float64) + 0.5).to(h).to(dev)
    Am = (torch.rand(2, r, Kc, generator=g, dtype=torch.float64) * 0.1).to(h).to(dev)
    Bm = (torch.rand(2, Nc, r, generator=g, dtype=torch.float64) * 0.1 + 0.05).to(h).to(dev)
    Wm = (W * 0.01).to(dev)
    ids = torch.tensor([1, -1, 0, 1, -1])
    sc = torch.tensor([0.5, 3.0e5])
    batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), 2)
    ym = lk.multi_lora_linear(xm, Wm, None, Am, Bm, batch, scalings=sc.to(dev), backend=name)
    hot = (ids == 1).to(dev)
    assert torch.isposinf(ym[hot]).all(), ym[hot]
    assert torch.isfinite(ym[~hot]).all()
    ym64 = ref.multi_lora_linear(f64(xm), f64(Wm), None, f64(Am), f64(Bm), ids, sc.double())
    assert rel_err(ym[~hot], ym64[(~hot).cpu()]) <= tol(h, dev)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("partial", ["base_gemm", "rank_r_intermediate"])
def test_fp16_overflowing_partial_sums_are_never_silently_wrong(be, partial):
    """Final results in range (≈ 5e4 and ≈ 1e3) whose partial sums are not: the base GEMM
    alone ≈ 7e4, or the rank-r intermediate x·Aᵀ ≈ 1.3e5. Each element is either accurate or
    non-finite; NaN only where the fp16 torch composition is not finite either."""
    name, dev = be
    h, Kc, Nc = torch.float16, 64, 8
    x = torch.full((3, Kc), 1000.0, dtype=h)
    x[1:] = 1.0
    if partial == "base_gemm":
        W = torch.full((Nc, Kc), 1.1, dtype=h)              # base row 0: 70400
        A = torch.full((1, Kc), 1 / 64, dtype=h)             # xa row 0: 1000
        B = torch.full((Nc, 1), -20.0, dtype=h)              # LoRA row 0: -20000
    else:
        W = torch.full((Nc, Kc), 0.01, dtype=h)              # base row 0: 640
        A = torch.full((1, Kc), 2.0, dtype=h)                # xa row 0: 128000
        B = torch.full((Nc, 1), 0.004, dtype=h)              # LoRA row 0: 512
    x, W, A, B = (t.to(dev) for t in (x, W, A, B))
    y = lk.lora_linear(x, W, None, A, B, backend=name)
    want = ref.lora_linear(f64(x), f64(W), None, f64(A), f64(B))
    comp = ref.lora_linear(x, W, None, A, B)  # the fp16 torch composition
    fin = torch.isfinite(y).cpu()
    assert torch.isfinite(want).all() and want.abs().max() < 6.0e4
    err = (y.double().cpu() - want).abs() / want.abs()
    assert (err[fin] <= 2e-3).all(), f"finite but wrong: {y[0].tolist()} vs {want[0].tolist()}"
    assert torch.isfinite(y[1:]).all(), "overflow leaked into other rows"
    nan = torch.isnan(y).cpu()
    assert not (nan & torch.isfinite(comp).cpu()).any(), "NaN where the fp16 composition is finite"


# ------------------------------------------------------------------------------------------
# Large K
# ------------------------------------------------------------------------------------------
BIG_K = 16384 + 37


def _large_k_dtypes(be):
    # The interpreter's bf16 is wrong (DESIGN.md); fp16 is the case that needs fp32 accumulation.
    return [torch.float32, torch.float16] if _interp(be) else _dtypes(be)


def _grads_if_cheap(be, y, wrt, y64, wrt64, yc, wrtc, dy, dtype, dev):
    """Large K sums over K only in the forward; the backward's reductions run over M, N, r.
    The interpreter (one numpy step per K/BLOCK program) takes minutes on dX [M, 16k], so it
    checks the forward; the torch backend and GPU backends check every gradient too."""
    if _interp(be):
        return
    for nm, a, b_, c in zip(("dx", "dA", "dB"), torch.autograd.grad(y, wrt, dy),
                            torch.autograd.grad(y64, wrt64, dy.double().cpu()),
                            torch.autograd.grad(yc, wrtc, dy)):
        assert_within_contract(f"{dtype} {nm}", a, b_, c, dtype, dev)


@pytest.mark.parametrize("be", BACKENDS)
def test_large_k_single_within_tolerance(be):
    name, dev = be
    g = gen(4)
    Mc, Nc, r = 3, 19, 8
    for dtype in _large_k_dtypes(be):
        x = randn(Mc, BIG_K, generator=g, dtype=dtype, device=dev).requires_grad_()
        W = randn(Nc, BIG_K, generator=g, dtype=dtype, device=dev, scale=BIG_K ** -0.5)
        A = randn(r, BIG_K, generator=g, dtype=dtype, device=dev, scale=BIG_K ** -0.5).requires_grad_()
        B = randn(Nc, r, generator=g, dtype=dtype, device=dev).requires_grad_()
        y = lk.lora_linear(x, W, None, A, B, scaling=0.5, backend=name)
        x64, W64, A64, B64 = (f64(t) for t in (x, W, A, B))
        y64 = ref.lora_linear(x64, W64, None, A64, B64, 0.5)
        xc, Ac, Bc = (t.detach().requires_grad_() for t in (x, A, B))
        yc = ref.lora_linear(xc, W, None, Ac, Bc, 0.5)
        assert_within_contract(f"{dtype} y", y, y64, yc, dtype, dev)
        dy = randn(Mc, Nc, generator=g, dtype=dtype, device=dev)
        _grads_if_cheap(be, y, (x, A, B), y64, (x64, A64, B64), yc, (xc, Ac, Bc), dy, dtype, dev)


@pytest.mark.parametrize("be", BACKENDS)
def test_large_k_multi_within_tolerance(be):
    name, dev = be
    g = gen(5)
    ids = torch.tensor([0, -1, 2, 2, 1, -1])
    Sc, Rc, Nc = 3, 8, 11
    ranks = torch.tensor([8, 3, 5])
    sc = torch.tensor([0.5, 1.0, -2.0])
    for dtype in _large_k_dtypes(be):
        x = randn(len(ids), BIG_K, generator=g, dtype=dtype, device=dev).requires_grad_()
        W = randn(Nc, BIG_K, generator=g, dtype=dtype, device=dev, scale=BIG_K ** -0.5)
        A = randn(Sc, Rc, BIG_K, generator=g, dtype=dtype, device=dev, scale=BIG_K ** -0.5).requires_grad_()
        B = randn(Sc, Nc, Rc, generator=g, dtype=dtype, device=dev).requires_grad_()
        batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), Sc)
        y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc.to(dev),
                                 ranks=ranks.to(dev), backend=name)
        x64, A64, B64 = f64(x), f64(A), f64(B)
        y64 = ref.multi_lora_linear(x64, f64(W), None, A64, B64, ids, sc.double(), ranks)
        xc, Ac, Bc = (t.detach().requires_grad_() for t in (x, A, B))
        yc = ref.multi_lora_linear(xc, W, None, Ac, Bc, ids.to(dev), sc.to(dev, dtype), ranks)
        assert_within_contract(f"{dtype} y", y, y64, yc, dtype, dev)
        dy = randn(len(ids), Nc, generator=g, dtype=dtype, device=dev)
        _grads_if_cheap(be, y, (x, A, B), y64, (x64, A64, B64), yc, (xc, Ac, Bc), dy, dtype, dev)


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------
def _det_shapes(dev):
    # The decode path (M = 1, split-K on a GPU) and a tiled path; bigger on a GPU so split-K and
    # many programs per reduction really happen.
    return [(1, 67, 45, 9), (29, 67, 45, 9)] if dev == "cpu" else [(1, 4099, 1029, 16), (333, 2053, 1029, 64)]


@pytest.mark.parametrize("be", BACKENDS)
def test_single_repeated_calls_are_bitwise_identical(be):
    name, dev = be
    for (Mc, Kc, Nc, r) in _det_shapes(dev):
        for dtype in _dtypes(be):
            g = gen(6)
            ins = [randn(Mc, Kc, generator=g, dtype=dtype, device=dev),
                   randn(Nc, Kc, generator=g, dtype=dtype, device=dev, scale=Kc ** -0.5),
                   randn(Nc, generator=g, dtype=dtype, device=dev),
                   randn(r, Kc, generator=g, dtype=dtype, device=dev, scale=Kc ** -0.5),
                   randn(Nc, r, generator=g, dtype=dtype, device=dev)]
            dy = randn(Mc, Nc, generator=g, dtype=dtype, device=dev)
            runs = []
            for _ in range(3):
                leaves = [t.detach().requires_grad_() for t in ins]
                y = lk.lora_linear(*leaves, scaling=0.8, dropout_p=0.3, dropout_seed=1234,
                                   backend=name)
                runs.append([y.detach(), *torch.autograd.grad(y, leaves, dy)])
            for other in runs[1:]:
                for nm, a, b in zip(("y", "dx", "dW", "db", "dA", "dB"), runs[0], other):
                    assert torch.equal(a, b), f"{dtype} {(Mc, Kc, Nc, r)} {nm} differs between runs"


@pytest.mark.parametrize("be", BACKENDS)
def test_multi_repeated_calls_are_bitwise_identical(be):
    name, dev = be
    T = 41 if dev == "cpu" else 2048
    Kc, Nc, Sc, Rc = (67, 45, 5, 16) if dev == "cpu" else (2053, 1029, 8, 64)
    g = gen(7)
    ids = torch.randint(-1, Sc, (T,), generator=g)
    ranks = torch.randint(0, Rc + 1, (Sc,), generator=g)
    sc = torch.rand(Sc, generator=g) + 0.5
    batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), Sc)
    for dtype in _dtypes(be):
        ins = [randn(T, Kc, generator=g, dtype=dtype, device=dev),
               randn(Nc, Kc, generator=g, dtype=dtype, device=dev, scale=Kc ** -0.5),
               randn(Nc, generator=g, dtype=dtype, device=dev),
               randn(Sc, Rc, Kc, generator=g, dtype=dtype, device=dev, scale=Kc ** -0.5),
               randn(Sc, Nc, Rc, generator=g, dtype=dtype, device=dev)]
        dy = randn(T, Nc, generator=g, dtype=dtype, device=dev)
        runs = []
        for _ in range(3):
            leaves = [t.detach().requires_grad_() for t in ins]
            y = lk.multi_lora_linear(*leaves, batch, scalings=sc.to(dev), ranks=ranks.to(dev),
                                     backend=name)
            xa = lk.lora_shrink(ins[0], ins[3], batch, sc.to(dev), ranks=ranks.to(dev), backend=name)
            runs.append([y.detach(), xa, *torch.autograd.grad(y, leaves, dy)])
        for other in runs[1:]:
            for nm, a, b in zip(("y", "xa", "dx", "dW", "db", "dA", "dB"), runs[0], other):
                assert torch.equal(a, b), f"{dtype} {nm} differs between runs"


# ------------------------------------------------------------------------------------------
# Index arithmetic past 2**31 elements (GPU)
# ------------------------------------------------------------------------------------------
BIG_T, BIG_KK = 2**17 + 3, 2**14 + 16   # T·K = 2 149 629 968 > 2**31


def _gpu_backends():
    out = ["torch", "triton"]
    if torch.cuda.is_available():
        from lora_kernels import _ext
        if _ext.why_unavailable() is None:
            out.append("cuda")
    return out


def _rows_to_check(T, K):
    edge = 2**31 // K  # the row whose elements straddle offset 2**31
    return torch.tensor(sorted({0, 1, edge - 1, edge, edge + 1, T - 2, T - 1}))


@pytest.mark.gpu
@pytest.mark.parametrize("name", _gpu_backends())
def test_index_math_past_2_31_elements(name):
    dev, bf = "cuda", torch.bfloat16
    torch.cuda.empty_cache()
    g = torch.Generator(device=dev).manual_seed(8)
    Nc, r, Sc = 24, 8, 4
    x = torch.randn(BIG_T, BIG_KK, device=dev, dtype=bf, generator=g).requires_grad_()
    W = (torch.randn(Nc, BIG_KK, device=dev, generator=g) * BIG_KK ** -0.5).to(bf)
    A = (torch.randn(r, BIG_KK, device=dev, generator=g) * BIG_KK ** -0.5).to(bf).requires_grad_()
    B = torch.randn(Nc, r, device=dev, generator=g).to(bf).requires_grad_()
    rows = _rows_to_check(BIG_T, BIG_KK).to(dev)
    try:
        y = lk.lora_linear(x, W, None, A, B, backend=name)
        xr = x.detach()[rows].double()
        want = ref.lora_linear(xr, W.double(), None, A.detach().double(), B.detach().double())
        assert rel_err(y[rows], want) <= tol(bf, dev)
        dy = torch.randn(BIG_T, Nc, device=dev, generator=g).to(bf)
        dx, dA = torch.autograd.grad(y, (x, A), dy)
        dyr = dy[rows].double()
        dx_want = dyr @ W.double() + (dyr @ B.detach().double()) @ A.detach().double()
        assert rel_err(dx[rows], dx_want) <= tol(bf, dev)
        # dA = (dy·B)ᵀ·x reduces over every row: chunked float64 reference.
        dA_want = torch.zeros(r, BIG_KK, dtype=torch.float64, device=dev)
        dyb = dy.double() @ B.detach().double()
        for s in range(0, BIG_T, 8192):
            dA_want += dyb[s:s + 8192].t() @ x.detach()[s:s + 8192].double()
        assert rel_err(dA, dA_want) <= tol(bf, dev)
        del y, dx, dA, dyb, dA_want

        ids = torch.randint(-1, Sc, (BIG_T,), device=dev, generator=g)
        ids[rows] = torch.arange(len(rows), device=dev) % (Sc + 1) - 1
        batch = lk.LoRABatch.from_adapter_ids(ids, Sc)
        Am = (torch.randn(Sc, r, BIG_KK, device=dev, generator=g) * BIG_KK ** -0.5).to(bf)
        Bm = torch.randn(Sc, Nc, r, device=dev, generator=g).to(bf)
        sc = torch.ones(Sc, device=dev)
        with torch.no_grad():
            ym = lk.multi_lora_linear(x.detach(), W, None, Am, Bm, batch, scalings=sc, backend=name)
        want = ref.multi_lora_linear(xr, W.double(), None, Am.double(), Bm.double(), ids[rows],
                                     sc.double())
        assert rel_err(ym[rows], want) <= tol(bf, dev)
    finally:
        del x
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("name", _gpu_backends())
def test_expand_past_2_31_output_elements(name):
    """lora_expand adds into y [T, N] with T·N > 2**31."""
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(9)
    Sc, r = 3, 8
    y = torch.zeros(BIG_T, BIG_KK, device=dev, dtype=bf)
    try:
        ids = torch.randint(-1, Sc, (BIG_T,), device=dev, generator=g)
        rows = _rows_to_check(BIG_T, BIG_KK).to(dev)
        ids[rows] = torch.arange(len(rows), device=dev) % (Sc + 1) - 1
        batch = lk.LoRABatch.from_adapter_ids(ids, Sc)
        xa = torch.randn(BIG_T, r, device=dev, generator=g)
        Bm = torch.randn(Sc, BIG_KK, r, device=dev, generator=g).to(bf)
        lk.lora_expand(y, xa, Bm, batch, backend=name)
        want = ref.lora_expand(torch.zeros(len(rows), BIG_KK, dtype=torch.float64, device=dev),
                               xa[rows].double(), Bm.double(), ids[rows])
        assert rel_err(y[rows], want) <= tol(bf, dev)
        assert (y[rows][ids[rows] == -1] == 0).all()
    finally:
        del y
        gc.collect()
        torch.cuda.empty_cache()
