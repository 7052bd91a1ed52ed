"""Heterogeneous multi-adapter ops through their public entries on the torch backend (CPU):
numerics vs the float64 oracle over adapter distributions, autograd, bad input. Triton kernels
are tested in test_triton_multi_lora.py; opcheck of every registered op in test_compile.py."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import TOL, f64, randn, rel_err

F64 = torch.float64
S, R = 5, 8


def _ids(kind, T):
    g = torch.Generator().manual_seed(T)
    if kind == "identical":
        return torch.full((T,), 2)
    if kind == "distinct":
        return torch.arange(T) % S
    if kind == "uniform":
        return torch.randint(0, 3, (T,), generator=g)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=F64)
        return torch.multinomial(p / p.sum(), T, replacement=True, generator=g)
    if kind == "with_base":
        ids = torch.randint(-1, S, (T,), generator=g)
        ids[0] = -1
        return ids
    if kind == "only_base":
        return torch.full((T,), -1)
    raise AssertionError(kind)


def _stack(K, N, n_slices=1, dtype=torch.float32, grad=False):
    A = randn(S, n_slices * R, K, dtype=dtype, scale=K ** -0.5, requires_grad=grad)
    B = randn(S, N, R, dtype=dtype, requires_grad=grad)
    return A, B


@pytest.mark.parametrize("kind", ["identical", "distinct", "uniform", "zipf", "with_base", "only_base"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_forward_and_grads_over_distributions(kind, T):
    K, N = 37, 45
    x = randn(T, K, requires_grad=True)
    W, b = randn(N, K, scale=K ** -0.5), randn(N)
    A, B = _stack(K, N, grad=True)
    ids = _ids(kind, T)
    sc = torch.rand(S) + 0.5
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    y = lk.multi_lora_linear(x, W, b, A, B, batch, scalings=sc, backend="torch")
    x64, A64, B64 = f64(x), f64(A), f64(B)
    y64 = ref.multi_lora_linear(x64, W.double(), b.double(), A64, B64, ids, sc.double())
    assert rel_err(y, y64) <= TOL[torch.float32]
    dy = randn(T, N)
    if not (ids >= 0).any():  # base-only batch: no LoRA work at all, no graph into A/B
        assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    opts = dict(allow_unused=True, materialize_grads=True)
    g = torch.autograd.grad(y, (x, A, B), dy, **opts)
    g64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double(), **opts)
    for got, want in zip(g, g64):
        assert rel_err(got, want) <= TOL[torch.float32]


@pytest.mark.parametrize("slices", [None, (24, 8, 13)])
def test_mixed_ranks_and_packed_slices(slices):
    K, N = 29, 45
    n_sl = 1 if slices is None else len(slices)
    T = 21
    x = randn(T, K, requires_grad=True)
    W = randn(N, K)
    A, B = _stack(K, N, n_sl, grad=True)
    ranks = torch.tensor([8, 1, 0, 5, 3]) if slices is None else torch.tensor(
        [[8, 0, 8], [1, 2, 3], [0, 0, 0], [5, 5, 0], [3, 8, 1]])
    ids = _ids("with_base", T)
    sc = torch.rand(S) + 0.5
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, ranks=ranks, out_slices=slices,
                             backend="torch")
    x64, A64, B64 = f64(x), f64(A), f64(B)
    y64 = ref.multi_lora_linear(x64, W.double(), None, A64, B64, ids, sc.double(), ranks, slices)
    assert rel_err(y, y64) <= TOL[torch.float32]
    dy = randn(T, N)
    g = torch.autograd.grad(y, (x, A, B), dy)
    g64 = torch.autograd.grad(y64, (x64, A64, B64), dy.double())
    for got, want in zip(g, g64):
        assert rel_err(got, want) <= TOL[torch.float32]
    # rank rows past each slot's rank get exactly zero gradient
    assert (g[1][1, 1:R] == 0).all() and (g[1][2] == 0).all()


def test_gradcheck_float64():
    T, K, N = 6, 5, 7
    x = randn(T, K, dtype=F64, requires_grad=True)
    W = randn(N, K, dtype=F64, requires_grad=True)
    b = randn(N, dtype=F64, requires_grad=True)
    A, B = _stack(K, N, dtype=F64, grad=True)
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, -1, 4, 4, 1, 0]), S)
    sc = torch.rand(S, dtype=F64)
    ranks = torch.tensor([3, 8, 0, 2, 5])
    fn = lambda x, W, b, A, B: lk.multi_lora_linear(x, W, b, A, B, batch, scalings=sc,
                                                     ranks=ranks, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))


def test_shrink_expand_match_reference():
    T, K, N = 17, 33, 19
    x, y0 = randn(T, K), randn(T, N)
    A, B = _stack(K, N)
    ids = _ids("with_base", T)
    sc = torch.rand(S)
    ranks = torch.tensor([8, 3, 0, 1, 6])
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    xa = lk.lora_shrink(x, A, batch, sc, ranks=ranks, backend="torch")
    assert xa.dtype == torch.float32 and xa.shape == (T, R)
    xa64 = ref.lora_shrink(x.double(), A.double(), ids, sc.double(), ranks)
    assert rel_err(xa, xa64) <= TOL[torch.float32]
    y = y0.clone()
    out = lk.lora_expand(y, xa, B, batch, ranks=ranks, backend="torch")
    assert out is y
    y64 = ref.lora_expand(y0.double(), xa64, B.double(), ids, ranks)
    assert rel_err(y, y64) <= TOL[torch.float32]
    assert torch.equal(y[ids == -1], y0[ids == -1])


def test_base_only_and_empty_batches_skip_lora():
    K, N = 8, 6
    W = randn(N, K)
    A, B = _stack(K, N)
    x = randn(4, K)
    batch = lk.LoRABatch.from_adapter_ids(torch.full((4,), -1), S)
    assert not batch.has_lora
    y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=torch.ones(S))
    assert torch.equal(y, x @ W.T)
    empty = lk.LoRABatch.from_adapter_ids(torch.empty(0, dtype=torch.int64), S)
    y0 = lk.multi_lora_linear(torch.empty(0, K), W, None, A, B, empty, scalings=torch.ones(S))
    assert y0.shape == (0, N)


def test_nan_in_one_adapter_does_not_leak():
    K, N = 8, 6
    W = randn(N, K)
    A, B = _stack(K, N)
    A[3, 0, 0] = float("nan")
    ids = torch.tensor([3, -1, 0, 3])
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    y = lk.multi_lora_linear(randn(4, K), W, None, A, B, batch, scalings=torch.ones(S))
    assert torch.isnan(y[[0, 3]]).all() and not torch.isnan(y[[1, 2]]).any()


# ---------------------------------------------------------------------------- bad input
def _good():
    K, N = 8, 6
    A, B = _stack(K, N)
    ids = torch.tensor([0, -1, 2])
    return dict(x=randn(3, K), weight=randn(N, K), bias=None, lora_a=A, lora_b=B,
                batch=lk.LoRABatch.from_adapter_ids(ids, S), scalings=torch.ones(S))


@pytest.mark.parametrize("field,value,exc,needle", [
    ("x", randn(4, 8), ValueError, "T=4"),
    ("x", randn(3, 9), ValueError, "x"),
    ("lora_a", randn(S, R, 9), ValueError, "lora_a"),
    ("lora_a", randn(S, R, 8, 1), ValueError, "lora_a"),
    ("lora_b", randn(S, 7, R), ValueError, "lora_b"),
    ("lora_b", randn(S + 1, 6, R), ValueError, "lora_a|num_slots"),
    ("batch", torch.tensor([0, 1, 2]), TypeError, "batch"),
    ("scalings", torch.ones(S + 1), ValueError, "scalings"),
    ("scalings", "fast", TypeError, "scalings"),
    ("ranks", torch.tensor([8, 8, 9, 1, 1]), ValueError, "ranks"),
    ("ranks", torch.tensor([1.0, 2, 3, 4, 5]), TypeError, "ranks"),
    ("ranks", torch.tensor([1, 2]), ValueError, "ranks"),
    ("out_slices", (3, 4), ValueError, "out_slices"),
])
def test_bad_input_raises_naming_the_argument(field, value, exc, needle):
    kw = _good()
    kw[field] = value
    with pytest.raises(exc, match=needle):
        lk.multi_lora_linear(**kw, backend="torch")


@pytest.mark.parametrize("ids,exc", [
    (torch.tensor([0, 5, 1]), ValueError),
    (torch.tensor([0, -2, 1]), ValueError),
    (torch.tensor([0.0, 1.0]), TypeError),
    (torch.tensor([[0, 1]]), ValueError),
    ("abc", TypeError),
])
def test_bad_adapter_ids(ids, exc):
    with pytest.raises(exc, match="adapter_ids"):
        lk.LoRABatch.from_adapter_ids(ids, S)


@pytest.mark.parametrize("per_sample", [True, False])
def test_contiguous_runs_and_gathered_groups_agree(per_sample):
    """Per-sample ids (PEFT adapter_names=) take the views path, interleaved ids the gather path."""
    K, N, T = 16, 12, 40
    ids = torch.tensor([3, -1, 0, 3, 1]).repeat_interleave(8) if per_sample else torch.arange(T) % S - 1
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    runs = batch.contiguous_runs(max_runs=2 * batch.num_active + 8)
    assert (runs is not None) == per_sample
    x = randn(T, K, requires_grad=True)
    W = randn(N, K)
    A, B = _stack(K, N, grad=True)
    sc = torch.rand(S) + 0.5
    y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, backend="torch")
    x64, A64, B64 = f64(x), f64(A), f64(B)
    y64 = ref.multi_lora_linear(x64, W.double(), None, A64, B64, ids, sc.double())
    assert rel_err(y, y64) <= TOL[torch.float32]
    dy = randn(T, N)
    for got, want in zip(torch.autograd.grad(y, (x, A, B), dy),
                         torch.autograd.grad(y64, (x64, A64, B64), dy.double())):
        assert rel_err(got, want) <= TOL[torch.float32]


def test_padded_bmm_path_isolates_nan_adapters_and_matches_reference():
    """Interleaved, balanced segments take the torch backend's padded-bmm path; its padding rows
    must not leak an adapter's NaN into other tokens, and xa (for the backward) must match."""
    K, N = 12, 10
    ids = torch.tensor([3, 0, 1, 4] * 6 + [-1])  # 24 runs, four segments of 6
    batch = lk.LoRABatch.from_adapter_ids(ids, S)
    assert batch.contiguous_runs(max_runs=2 * batch.num_active + 8) is None
    x = randn(25, K, requires_grad=True)
    W = randn(N, K)
    A, B = _stack(K, N, grad=True)
    sc = torch.rand(S) + 0.5
    ranks = torch.tensor([8, 3, 8, 5, 8])
    y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, ranks=ranks, backend="torch")
    x64, A64, B64 = f64(x), f64(A), f64(B)
    y64 = ref.multi_lora_linear(x64, W.double(), None, A64, B64, ids, sc.double(), ranks)
    assert rel_err(y, y64) <= TOL[torch.float32]
    dy = randn(25, N)
    for got, want in zip(torch.autograd.grad(y, (x, A, B), dy),
                         torch.autograd.grad(y64, (x64, A64, B64), dy.double())):
        assert rel_err(got, want) <= TOL[torch.float32]
    with torch.no_grad():
        A[3, 0, 0] = float("nan")
        y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, backend="torch")
    assert torch.isnan(y[ids == 3]).all() and not torch.isnan(y[ids != 3]).any()
