"""Property-based fuzzing (hypothesis) of every public op on every backend this process can run,
against the float64 reference (DESIGN.md numerics).

Ops: ``lora_linear`` (forward + every gradient), ``multi_lora_linear`` (forward + gradients),
``lora_shrink`` / ``lora_expand``, ``PackedLoRALinear`` (block-diagonal B through the fused op),
``LoRABatch`` metadata invariants. Inputs: sizes including 0, 1 and primes, K/N not multiples of
any block, r from 1 to 128 (64 in the interpreter), 3-D / transposed / strided inputs and
weights, bias or not, dropout, fp32 adapters on fp16/bf16 activations, random adapter-id
layouts with -1, mixed per-slot and per-slice ranks, packed output slices.

Pass rule per tensor: ``rel_err ≤ max(tol(dtype, device), 2 × rel_err of the same-dtype torch
composition)`` - the contract's tolerance, except where the problem itself is ill-conditioned
(a tiny output from cancelling terms), where no backend can beat rounding and the "≤ 2× torch"
half of the contract is the meaningful bound. NaN in an output fails (no NaN goes in).

Budgets: profile ``ci`` (default; derandomized, a small fixed number of examples per backend)
and ``gpu`` (10× the examples, fresh randomness each run; a failure prints a reproduction
blob). Pick with ``HYPOTHESIS_PROFILE=gpu``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import assert_within_contract, f64, gen, randn, triton_device, triton_dtypes

# ------------------------------------------------------------------------------------------
# Profiles and budgets
# ------------------------------------------------------------------------------------------
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("gpu", derandomize=False, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
_SCALE = 10 if PROFILE == "gpu" else 1

# Examples per (test, backend) in the ci profile. The interpreter runs Triton kernels in numpy
# one program at a time: a handful of examples is seconds, not minutes.
BUDGET = {"torch": 40, "triton-interp": 12, "triton": 40, "cuda": 40}


@dataclass(frozen=True)
class Backend:
    name: str      # the backend= argument
    device: str
    key: str       # budget / limits key

    @property
    def dtypes(self):
        if self.key == "triton-interp":
            return triton_dtypes("cpu")  # the interpreter gets bf16 wrong (DESIGN.md)
        return [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Limits:
    rows: int   # M or T
    k: int
    n: int
    r: int
    slots: int


LIMITS = {
    "torch": Limits(rows=48, k=160, n=160, r=128, slots=6),
    "triton-interp": Limits(rows=40, k=70, n=70, r=64, slots=4),
    "triton": Limits(rows=300, k=600, n=600, r=128, slots=8),
    "cuda": Limits(rows=300, k=600, n=600, r=128, slots=8),
}


def _cuda_ext_loaded() -> bool:
    if not torch.cuda.is_available():
        return False
    from lora_kernels import _ext
    return _ext.why_unavailable() is None


def backends() -> list:
    out = [pytest.param(Backend("torch", "cpu", "torch"), id="torch")]
    dev = triton_device()
    if dev == "cpu":
        out.append(pytest.param(Backend("triton", "cpu", "triton-interp"), id="triton-interp"))
    elif dev == "cuda":
        out.append(pytest.param(Backend("triton", "cuda", "triton"), id="triton-cuda",
                                marks=pytest.mark.gpu))
    if _cuda_ext_loaded():
        out.append(pytest.param(Backend("cuda", "cuda", "cuda"), id="cuda", marks=pytest.mark.gpu))
    return out


BACKENDS = backends()


def run_property(be: Backend, strategy, prop, scale: float = 1.0) -> None:
    """Run ``prop(be, case)`` over ``strategy`` with this backend's example budget."""
    n = max(1, int(BUDGET[be.key] * scale * _SCALE))

    @settings(max_examples=n)
    @given(case=strategy)
    def inner(case):
        prop(be, case)

    inner()


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------
_AWKWARD = (1, 2, 3, 5, 7, 13, 17, 31, 33, 37, 61, 67, 97, 127, 131, 257, 509)


def dim(hi: int, lo: int = 1):
    """Sizes that break blocked kernels: 1, primes, one past a power of two, and uniform."""
    picks = [d for d in _AWKWARD if lo <= d <= hi] + ([0] if lo == 0 else [])
    return st.one_of(st.sampled_from(picks), st.integers(lo, hi))


def scalings_st():
    return st.one_of(st.sampled_from([1.0, 0.5, 2.0, -1.25, 0.0]),
                     st.floats(-4.0, 4.0, allow_nan=False, width=32))


@dataclass
class SingleCase:
    M: int
    K: int
    N: int
    r: int
    lead: tuple        # x's leading dims (prod = M)
    x_layout: str      # contiguous | transposed | strided
    w_layout: str      # contiguous | transposed (Conv1D) | strided
    bias: bool
    bias_strided: bool
    scaling: float
    dropout_p: float
    seed: int
    fp32_adapters: bool
    weight_grad: bool
    dtype: torch.dtype
    data_seed: int
    knobs: tuple       # Triton planner overrides (name, value)


@st.composite
def single_cases(draw, be: Backend):
    lim = LIMITS[be.key]
    shape3d = draw(st.booleans())
    if shape3d:
        lead = (draw(st.integers(0, 4)), draw(st.integers(1, max(1, lim.rows // 4))))
    else:
        lead = (draw(dim(lim.rows, lo=0)),)
    M = lead[0] * (lead[1] if len(lead) > 1 else 1)
    dtype = draw(st.sampled_from(be.dtypes))
    knobs = ()
    if be.name == "triton":
        # Force the decode / tiled and fused-shrink / epilogue paths at sizes the fuzzer reaches.
        knobs = (("SMALL_M_MAX", draw(st.sampled_from([16, 0, 10**9]))),
                 ("FUSED_SHRINK_MAX_MR", draw(st.sampled_from([16384, 0]))))
    return SingleCase(
        M=M, K=draw(dim(lim.k)), N=draw(dim(lim.n)), r=draw(dim(lim.r)), lead=lead,
        x_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        w_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        bias=draw(st.booleans()), bias_strided=draw(st.booleans()),
        scaling=draw(scalings_st()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        seed=draw(st.integers(0, 2**62)),
        fp32_adapters=dtype != torch.float32 and draw(st.booleans()),
        weight_grad=draw(st.booleans()), dtype=dtype,
        data_seed=draw(st.integers(0, 2**31 - 1)), knobs=knobs)


# ------------------------------------------------------------------------------------------
# Building inputs
# ------------------------------------------------------------------------------------------
def make(shape, g, dtype, device, scale=1.0, layout="contiguous"):
    """A tensor of ``shape`` with the requested memory layout (values drawn in float64, so the
    reference sees exactly the rounded values the op sees)."""
    vals = randn(*shape, generator=g, dtype=dtype, scale=scale)
    if layout == "contiguous" or len(shape) == 0 or vals.numel() == 0:
        return vals.to(device)
    if layout == "transposed":  # last two dims swapped in memory (Conv1D-style weights, x.t())
        if len(shape) == 1:
            return vals.to(device)
        store = vals.transpose(-1, -2).contiguous().to(device)
        return store.transpose(-1, -2)
    if layout == "strided":  # every other element of the last dim
        store = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        store[..., ::2] = vals.to(device)
        return store[..., ::2]
    raise AssertionError(layout)


def leaf(t, grad=True):
    return t.detach().requires_grad_(grad)


def same_dtype(t, dtype):
    """Same-dtype composition input: a differentiable cast of the leaf (as the op casts)."""
    return None if t is None else t.to(dtype)


def check(name, got, want64, comp, dtype, device, case):
    """The pass rule of this file (module docstring)."""
    if got is None and want64 is None:
        return
    assert got is not None and want64 is not None, name
    assert got.shape == want64.shape, f"{name}: shape {list(got.shape)} != {list(want64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN from finite inputs ({case})"
    assert_within_contract(name, got, want64, comp, dtype, device, case)


@contextlib.contextmanager
def knobs(pairs):
    """Temporarily set Triton launcher module constants (planner thresholds)."""
    if not pairs:
        yield
        return
    import lora_kernels.triton.lora_linear as tl_single
    saved = {}
    try:
        for name, value in pairs:
            if hasattr(tl_single, name):
                saved[name] = getattr(tl_single, name)
                setattr(tl_single, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(tl_single, name, value)


# ------------------------------------------------------------------------------------------
# lora_linear
# ------------------------------------------------------------------------------------------
def prop_lora_linear(be: Backend, c: SingleCase):
    g, dev, dt = gen(c.data_seed), be.device, c.dtype
    adt = torch.float32 if c.fp32_adapters else dt
    x = leaf(make((*c.lead, c.K), g, dt, dev, layout=c.x_layout if c.M else "contiguous"))
    W = leaf(make((c.N, c.K), g, dt, dev, scale=c.K ** -0.5, layout=c.w_layout), c.weight_grad)
    b = None
    if c.bias:
        b = leaf(make((c.N,), g, dt, dev, layout="strided" if c.bias_strided else "contiguous"),
                 c.weight_grad)
    A = leaf(make((c.r, c.K), g, adt, dev, scale=c.K ** -0.5))
    B = leaf(make((c.N, c.r), g, adt, dev, scale=c.r ** -0.5))
    kw = dict(scaling=c.scaling, dropout_p=c.dropout_p, dropout_seed=c.seed)
    with knobs(c.knobs):
        y = lk.lora_linear(x, W, b, A, B, backend=be.name, **kw)
    assert y.dtype == dt and y.shape == (*c.lead, c.N)

    ins = [x, W, b, A, B]
    ins64 = [f64(t) for t in ins]
    y64 = ref.lora_linear(*ins64, c.scaling, c.dropout_p, c.seed)
    insc = [leaf(t.detach(), t.requires_grad) if t is not None else None for t in ins]
    yc = ref.lora_linear(insc[0], insc[1], insc[2], same_dtype(insc[3], dt),
                         same_dtype(insc[4], dt), c.scaling, c.dropout_p, c.seed)
    check("y", y, y64, yc, dt, dev, c)

    dy = make(tuple(y.shape), g, dt, dev)
    wrt = [i for i, t in enumerate(ins) if t is not None and t.requires_grad]
    with knobs(c.knobs):
        got = torch.autograd.grad(y, [ins[i] for i in wrt], dy)
    want = torch.autograd.grad(y64, [ins64[i] for i in wrt], dy.to("cpu", torch.float64))
    comp = torch.autograd.grad(yc, [insc[i] for i in wrt], dy)
    for i, gg, w, cc in zip(wrt, got, want, comp):
        assert gg.dtype == ins[i].dtype, f"grad {i} dtype {gg.dtype} != {ins[i].dtype}"
        check(f"grad[{['x', 'weight', 'bias', 'lora_a', 'lora_b'][i]}]", gg, w, cc, dt, dev, c)


@pytest.mark.parametrize("be", BACKENDS)
def test_lora_linear_matches_reference(be):
    run_property(be, single_cases(be), prop_lora_linear)


# ------------------------------------------------------------------------------------------
# Multi-adapter batches
# ------------------------------------------------------------------------------------------
@dataclass
class MultiCase:
    T: int
    lead: tuple
    K: int
    N: int
    S: int
    R: int
    ids: list
    out_slices: tuple | None
    ranks: list | None
    scalings: list
    bias: bool
    x_layout: str
    w_layout: str
    fp32_adapters: bool
    dtype: torch.dtype
    grad: bool
    scaled_shrink: bool
    data_seed: int
    plan: tuple


def _partition(draw, n: int, parts: int) -> tuple:
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=parts - 1, max_size=parts - 1,
                                unique=True)))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


@st.composite
def id_layouts(draw, T: int, S: int, samples: int):
    """Adapter-id layouts serving engines produce: interleaved with -1, base only, one adapter,
    sorted runs, one adapter per sample (PEFT ``adapter_names=``), all distinct."""
    kind = draw(st.sampled_from(["random", "base_only", "single", "runs", "per_sample", "distinct"]))
    any_id = st.integers(-1, S - 1)
    if kind == "random":
        return draw(st.lists(any_id, min_size=T, max_size=T))
    if kind == "base_only":
        return [-1] * T
    if kind == "single":
        return [draw(st.integers(0, S - 1))] * T
    if kind == "runs":
        return sorted(draw(st.lists(any_id, min_size=T, max_size=T)))
    if kind == "per_sample" and samples > 0:
        per = T // samples
        sids = draw(st.lists(any_id, min_size=samples, max_size=samples))
        return [s for s in sids for _ in range(per)]
    return [t % (S + 1) - 1 for t in range(T)]


@st.composite
def multi_cases(draw, be: Backend, for_grad: bool = True):
    lim = LIMITS[be.key]
    shape3d = draw(st.booleans())
    if shape3d:
        lead = (draw(st.integers(0, 4)), draw(st.integers(1, max(1, lim.rows // 4))))
        T, samples = lead[0] * lead[1], lead[0]
    else:
        lead = (draw(dim(lim.rows, lo=0)),)
        T, samples = lead[0], 0
    K, N = draw(dim(lim.k)), draw(dim(lim.n))
    S, R = draw(st.integers(1, lim.slots)), draw(dim(lim.r))
    out_slices = None
    if N >= 2 and draw(st.booleans()):
        out_slices = _partition(draw, N, draw(st.integers(2, min(3, N))))
    n_sl = 1 if out_slices is None else len(out_slices)
    ranks = None
    rank_mode = draw(st.sampled_from(["none", "per_slot", "per_slice"]))
    if rank_mode == "per_slot":
        ranks = draw(st.lists(st.integers(0, R), min_size=S, max_size=S))
    elif rank_mode == "per_slice" and n_sl > 1:
        ranks = draw(st.lists(st.lists(st.integers(0, R), min_size=n_sl, max_size=n_sl),
                              min_size=S, max_size=S))
    dtype = draw(st.sampled_from(be.dtypes))
    plan = ()
    if be.name == "triton":
        # Every planner choice of the multi-adapter launcher, at sizes the fuzzer reaches.
        plan = (("path", draw(st.sampled_from(["auto", "fused", "unfused"]))),
                ("shape", draw(st.sampled_from(["auto", "decode", "prefill"]))),
                ("inline", draw(st.sampled_from(["auto", True, False]))))
    return MultiCase(
        T=T, lead=lead, K=K, N=N, S=S, R=R, ids=draw(id_layouts(T, S, samples)),
        out_slices=out_slices, ranks=ranks,
        scalings=draw(st.lists(scalings_st(), min_size=S, max_size=S)), bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        w_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        fp32_adapters=dtype != torch.float32 and draw(st.booleans()),
        dtype=dtype, grad=for_grad and draw(st.sampled_from([True, True, False])),
        scaled_shrink=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**31 - 1)), plan=plan)


@contextlib.contextmanager
def plan_override(pairs):
    if not pairs:
        yield
        return
    from lora_kernels.triton import multi_lora as tm
    override = getattr(tm, "override", None)
    known = getattr(tm, "TUNING", {})
    pairs = {k: v for k, v in pairs if k in known}
    with (override(**pairs) if override is not None and pairs else contextlib.nullcontext()):
        yield


def multi_inputs(be: Backend, c: MultiCase):
    g, dev, dt = gen(c.data_seed), be.device, c.dtype
    adt = torch.float32 if c.fp32_adapters else dt
    n_sl = 1 if c.out_slices is None else len(c.out_slices)
    x = make((*c.lead, c.K), g, dt, dev, layout=c.x_layout if c.T else "contiguous")
    W = make((c.N, c.K), g, dt, dev, scale=c.K ** -0.5, layout=c.w_layout)
    b = make((c.N,), g, dt, dev) if c.bias else None
    A = make((c.S, n_sl * c.R, c.K), g, adt, dev, scale=c.K ** -0.5)
    B = make((c.S, c.N, c.R), g, adt, dev, scale=c.R ** -0.5)
    ids = torch.tensor(c.ids, dtype=torch.int64).reshape(-1)
    sc = torch.tensor(c.scalings, dtype=torch.float32)
    ranks = None if c.ranks is None else torch.tensor(c.ranks, dtype=torch.int64)
    return g, x, W, b, A, B, ids, sc, ranks


def prop_multi_lora_linear(be: Backend, c: MultiCase):
    g, x, W, b, A, B, ids, sc, ranks = multi_inputs(be, c)
    dev, dt = be.device, c.dtype
    x, A, B = leaf(x, c.grad), leaf(A, c.grad), leaf(B, c.grad)
    batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), c.S)
    kw = dict(scalings=sc.to(dev), ranks=None if ranks is None else ranks.to(dev),
              out_slices=c.out_slices)
    with plan_override(c.plan):
        y = lk.multi_lora_linear(x, W, b, A, B, batch, backend=be.name, **kw)
    assert y.dtype == dt and y.shape == (*c.lead, c.N)

    K = c.K
    ins = [x, A, B]
    x64, A64, B64 = (f64(t) for t in ins)
    y64 = ref.multi_lora_linear(x64.reshape(-1, K), f64(W), f64(b), A64, B64, ids,
                                sc.double(), ranks, c.out_slices).reshape(y.shape)
    xc, Ac, Bc = (leaf(t.detach(), c.grad) for t in ins)
    yc = ref.multi_lora_linear(xc.reshape(-1, K), W, b, Ac.to(dt), Bc.to(dt), ids.to(dev),
                               sc.to(dev, dt), None if ranks is None else ranks,
                               c.out_slices).reshape(y.shape)
    check("y", y, y64, yc, dt, dev, c)
    # Rows of -1 tokens are the base linear alone.
    base = ids == -1
    if base.any():
        lin64 = torch.nn.functional.linear(x64.reshape(-1, K), f64(W), f64(b))
        lin = torch.nn.functional.linear(x.detach().reshape(-1, K), W, b)
        check("y[-1 rows]", y.reshape(-1, c.N)[base.to(dev)], lin64[base].detach(),
              lin[base.to(dev)], dt, dev, c)
    if not c.grad:
        return
    dy = make(tuple(y.shape), g, dt, dev)
    opts = dict(allow_unused=True, materialize_grads=True)
    with plan_override(c.plan):
        got = torch.autograd.grad(y, ins, dy, **opts)
    want = torch.autograd.grad(y64, [x64, A64, B64], dy.to("cpu", torch.float64), **opts)
    comp = torch.autograd.grad(yc, [xc, Ac, Bc], dy, **opts)
    for name, gg, w, cc, t in zip(("x", "lora_a", "lora_b"), got, want, comp, ins):
        assert gg.dtype == t.dtype
        check(f"grad[{name}]", gg, w, cc, dt, dev, c)


@pytest.mark.parametrize("be", BACKENDS)
def test_multi_lora_linear_matches_reference(be):
    run_property(be, multi_cases(be), prop_multi_lora_linear)


def prop_shrink_expand(be: Backend, c: MultiCase):
    g, x, W, b, A, B, ids, sc, ranks = multi_inputs(be, c)
    dev, dt = be.device, c.dtype
    x = x.reshape(-1, c.K)  # the Punica pair takes 2-D x
    n_sl = 1 if c.out_slices is None else len(c.out_slices)
    batch = lk.LoRABatch.from_adapter_ids(ids.to(dev), c.S)
    rk = None if ranks is None else ranks.to(dev)
    use_sc = c.scaled_shrink
    with plan_override(c.plan):
        xa = lk.lora_shrink(x, A, batch, sc.to(dev) if use_sc else None, ranks=rk,
                            n_slices=n_sl, backend=be.name)
    assert xa.dtype == torch.float32 and xa.shape == (c.T, n_sl * c.R)
    xa64 = ref.lora_shrink(f64(x), f64(A), ids, sc.double() if use_sc else None, ranks, n_sl)
    xac = ref.lora_shrink(x, A.to(dt), ids.to(dev), sc.to(dev) if use_sc else None, ranks, n_sl)
    check("xa", xa, xa64, xac, dt, dev, c)
    base = (ids == -1).to(dev)
    assert (xa[base] == 0).all(), "shrink wrote into rows of -1 tokens"

    y0 = make((c.T, c.N), g, dt, dev)
    y = y0.clone()
    with plan_override(c.plan):
        out = lk.lora_expand(y, xa, B, batch, ranks=rk, out_slices=c.out_slices, backend=be.name)
    assert out is y
    y64 = ref.lora_expand(f64(y0), xa.double().cpu(), f64(B), ids, ranks, c.out_slices)
    yc = ref.lora_expand(y0.clone(), xa, B.to(dt), ids.to(dev), ranks, c.out_slices)
    check("y", y, y64, yc, dt, dev, c)
    assert torch.equal(y[base], y0[base]), "expand touched rows of -1 tokens"


@pytest.mark.parametrize("be", BACKENDS)
def test_shrink_expand_match_reference(be):
    run_property(be, multi_cases(be, for_grad=False), prop_shrink_expand, scale=0.7)


# ------------------------------------------------------------------------------------------
# PackedLoRALinear: random slices and enable flags through the fused op
# ------------------------------------------------------------------------------------------
@st.composite
def packed_cases(draw, be: Backend):
    lim = LIMITS[be.key]
    n_sl = draw(st.integers(1, 3))
    widths = tuple(draw(st.lists(dim(max(1, lim.n // 3)), min_size=n_sl, max_size=n_sl)))
    flags = draw(st.lists(st.booleans(), min_size=n_sl, max_size=n_sl).filter(any))
    return dict(M=draw(dim(lim.rows, lo=0)), K=draw(dim(lim.k)), widths=widths, flags=flags,
                r=draw(dim(min(lim.r, 32))), alpha=draw(st.floats(0.5, 32)),
                dtype=draw(st.sampled_from(be.dtypes)), seed=draw(st.integers(0, 2**31 - 1)))


def prop_packed(be: Backend, c: dict):
    torch.manual_seed(c["seed"])
    dt, dev = c["dtype"], be.device
    layer = lk.PackedLoRALinear(c["K"], c["widths"], c["r"], enable_lora=c["flags"],
                                lora_alpha=c["alpha"], backend=be.name, device=dev, dtype=dt)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = make((c["M"], c["K"]), gen(c["seed"]), dt, dev)
    y = layer(x)
    args64 = [f64(t) for t in (x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)]
    y64 = ref.packed_lora_linear(*args64, c["widths"], c["flags"], layer.scaling)
    yc = ref.packed_lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight,
                                layer.lora_B.weight, c["widths"], c["flags"], layer.scaling)
    check("y", y, y64.detach(), yc.detach(), dt, dev, c)


@pytest.mark.parametrize("be", BACKENDS)
def test_packed_lora_linear_matches_reference(be):
    run_property(be, packed_cases(be), prop_packed, scale=0.5)


# ------------------------------------------------------------------------------------------
# LoRABatch invariants (host-side metadata; backend-independent)
# ------------------------------------------------------------------------------------------
@settings(max_examples=60 * _SCALE)
@given(S=st.integers(0, 9), data=st.data())
def test_lora_batch_invariants(S, data):
    T = data.draw(dim(200, lo=0))
    ids = data.draw(id_layouts(T, S, 0) if S else st.just([-1] * T))
    t = torch.tensor(ids, dtype=torch.int64).reshape(-1)
    b = lk.LoRABatch.from_adapter_ids(t, S)
    order = b.sorted_token_ids.long()
    assert sorted(order.tolist()) == list(range(T))                    # a permutation
    assert (t[order].diff() >= 0).all()                                # sorted by slot
    off = b.seg_offsets.tolist()
    assert len(off) == S + 2 and off[0] == 0 and off[-1] == T
    counts = [(t == s).sum().item() for s in range(-1, S)]
    assert [off[i + 1] - off[i] for i in range(S + 1)] == counts
    for s in range(S):  # each segment is stable (token order kept)
        seg = order[off[s + 1]:off[s + 2]].tolist()
        assert seg == sorted(seg) and all(ids[i] == s for i in seg)
    active = [s for s in range(S) if counts[s + 1]]
    assert b.active_slots.tolist() == active and b.num_active == len(active)
    assert b.has_lora == bool(active) and b.max_seg_len == max(counts[1:], default=0)
    assert sorted(i for _, rows in b.groups() for i in rows.tolist()) == \
        [i for i in range(T) if ids[i] >= 0]
    runs = b.contiguous_runs(max_runs=T + 1)
    assert runs is not None
    assert sorted(i for s, a, e in runs for i in range(a, e) if ids[i] == s) == \
        [i for i in range(T) if ids[i] >= 0]
    c = lk.LoRABatch.from_parts(*b.tensors(), b.host_ints())
    assert c.host_offsets() == b.host_offsets() and c.num_active == b.num_active


# ------------------------------------------------------------------------------------------
# Regressions the fuzzer found, pinned as plain tests (they run in every profile)
# ------------------------------------------------------------------------------------------
def _multi_plans(be: Backend):
    if be.name != "triton":
        return [pytest.param(None, id="default")]
    return [pytest.param((("path", "unfused"),), id="unfused"),
            # the fused GEMM once read W through stride_wn only (fixed); found by the fuzzer
            pytest.param((("path", "fused"),), id="fused")]


@pytest.mark.parametrize("w_layout", ["transposed", "strided"])
@pytest.mark.parametrize("be,plan", [pytest.param(b.values[0], p.values[0], id=f"{b.id}-{p.id}",
                                                   marks=[*b.marks, *p.marks])
                                      for b in BACKENDS for p in _multi_plans(b.values[0])])
def test_multi_lora_linear_reads_weight_through_strides(be, plan, w_layout):
    """GPT-2's Conv1D hands MultiLoRALinear a transposed weight view."""
    c = MultiCase(T=20, lead=(20,), K=37, N=19, S=2, R=4, ids=[0] * 12 + [-1] * 3 + [1] * 5,
                  out_slices=None, ranks=None, scalings=[1.0, 0.5], bias=True,
                  x_layout="contiguous", w_layout=w_layout, fp32_adapters=False,
                  dtype=torch.float32, grad=True, scaled_shrink=False, data_seed=3,
                  plan=plan or ())
    prop_multi_lora_linear(be, c)
