"""Triton multi-adapter kernels through the public ops (``backend="triton"``) against the float64
oracle: adapter distributions, each kernel path forced (decode split-K, decode one-launch,
prefill, fused GEMM), mixed ranks, packed slices, gradients of x / W / b and of every slot.

On CPU this runs the real kernels under TRITON_INTERPRET=1 (fp32/fp16, tiny shapes);
``@pytest.mark.gpu`` tests add bf16, realistic sizes, CUDA-graph capture and a no-sync check.
"""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from helpers import (SM90_FAKE_DRIVER, capture_cuda_graph, f64, randn, rel_err, run_sm90_compile,
                     tol, triton_device, triton_dtypes)

DEV = triton_device()
if DEV is None:
    pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)", allow_module_level=True)

from lora_kernels.triton import multi_lora as tml  # noqa: E402  (after the skip: imports triton)
from lora_kernels.triton import segments  # noqa: E402

F64 = torch.float64
PATHS = {
    "decode": dict(path="unfused", shape="decode", inline=False),   # split-K planes, 2 launches
    "decode1": dict(path="unfused", shape="decode", inline=True),   # shrink inside the expand
    "prefill": dict(path="unfused", shape="prefill", inline=False),
    "fused": dict(path="fused", shape="decode", inline=False),      # GEMM + LoRA epilogue
    "auto": {},                                                     # the planner's own choice
}
FORCED = [p for p in PATHS if p != "auto"]


def _ids(kind, T, S):
    g = torch.Generator().manual_seed(1000 + T)
    if kind == "identical":
        return torch.full((T,), S - 1)
    if kind == "distinct":  # every token its own adapter (needs S ≥ T)
        return torch.randperm(S, generator=g)[:T]
    if kind == "uniform":
        return torch.randint(0, 3, (T,), generator=g)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=F64) ** 1.2
        return torch.multinomial(p / p.sum(), T, replacement=True, generator=g)
    if kind == "with_base":
        ids = torch.randint(-1, S, (T,), generator=g)
        ids[0] = -1
        return ids
    raise AssertionError(kind)


def _batch(ids, S, static):
    """An exact batch, or (``static``) a bounded one: static buffers with room for the ids
    plus padding tokens, refreshed in place; the padding rows are base-only."""
    if not static:
        return lk.LoRABatch.from_adapter_ids(ids.to(DEV), S)
    pad = torch.full((3,), -1, dtype=ids.dtype)
    return lk.LoRABatch.static(ids.shape[0] + 3, S, DEV).refresh_(torch.cat([ids[:1], pad,
                                                                            ids[1:]]).to(DEV))


def _check(ids, *, S, K=37, N=45, R=8, dtype=torch.float32, path="decode", slices=None,
           ranks=None, bias=True, grad_w=False, scale_grad=True, static=False):
    """Forward + backward on the Triton backend vs float64 autograd of the oracle."""
    batch = _batch(ids, S, static)
    ids = batch.adapter_ids.cpu().long()
    T = ids.shape[0]
    n_sl = 1 if slices is None else len(slices)
    x = randn(T, K, dtype=dtype, device=DEV, requires_grad=True)
    W = randn(N, K, dtype=dtype, device=DEV, scale=K ** -0.5, requires_grad=grad_w)
    b = randn(N, dtype=dtype, device=DEV, requires_grad=grad_w) if bias else None
    A = randn(S, n_sl * R, K, dtype=dtype, device=DEV, scale=K ** -0.5, requires_grad=True)
    B = randn(S, N, R, dtype=dtype, device=DEV, requires_grad=True)
    sc = torch.rand(S) + 0.5
    with tml.override(**PATHS[path]):
        y = lk.multi_lora_linear(x, W, b, A, B, batch, scalings=sc, ranks=ranks,
                                 out_slices=slices, backend="triton")
        dy = randn(T, N, dtype=dtype, device=DEV)
        leaves = [t for t in (x, W, b, A, B) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, dy) if T else [torch.zeros_like(t) for t in leaves]

    x64, W64, b64, A64, B64 = f64(x), f64(W), f64(b), f64(A), f64(B)
    y64 = ref.multi_lora_linear(x64, W64, b64, A64, B64, ids, sc.double(), ranks, slices)
    tl_ = tol(dtype, DEV)
    assert y.dtype == dtype and y.shape == (T, N)
    assert rel_err(y, y64) <= tl_, f"y: {rel_err(y, y64):.2e}"
    leaves64 = [t for t in (x64, W64, b64, A64, B64) if t is not None and t.requires_grad]
    if T:
        want = torch.autograd.grad(y64, leaves64, dy.cpu().double(), allow_unused=True,
                                   materialize_grads=True)
        for name, got, ref_g in zip("xWbAB" if grad_w else "xAB", grads, want):
            assert got.dtype == dtype
            assert rel_err(got, ref_g) <= tl_, f"d{name}: {rel_err(got, ref_g):.2e}"
    return y, grads


# ----------------------------------------------------------------------- distributions × paths
@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("kind", ["identical", "uniform", "zipf", "with_base"])
def test_distributions(kind, path):
    _check(_ids(kind, 33, 5), S=5, path=path)


@pytest.mark.parametrize("path", FORCED)
def test_all_distinct_many_slots(path):
    # 20 active slots: the in-kernel tile scan runs over a 32-wide block.
    _check(_ids("distinct", 20, 24), S=24, path=path)


@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("T", [1, 7])
def test_small_batches(T, path):
    _check(_ids("with_base", T, 5) if T > 1 else torch.tensor([3]), S=5, path=path)


@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("kind", ["zipf", "with_base"])
def test_fp16(kind, path):
    if torch.float16 not in triton_dtypes(DEV):
        pytest.skip("fp16 not run here")
    _check(_ids(kind, 33, 5), S=5, dtype=torch.float16, path=path)


@pytest.mark.parametrize("path", ["decode", "fused"])
def test_weight_and_bias_grads(path):
    _check(_ids("with_base", 7, 5), S=5, path=path, grad_w=True)


# ------------------------------------------------- bounded (static, CUDA-graph) batches
@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("kind", ["zipf", "with_base", "distinct"])
def test_static_batch_matches_float64(kind, path):
    # Static buffers refreshed in place: host ints are upper bounds, active_slots and tile_map
    # carry -1 padding, three padding tokens are base-only; grads of x, A and B included.
    S = 24 if kind == "distinct" else 5
    _check(_ids(kind, 20, S), S=S, path=path, static=True)


@pytest.mark.parametrize("path", ["decode", "prefill", "fused"])
def test_static_batch_mixed_ranks_and_slices(path):
    _check(_ids("with_base", 21, 5), S=5, path=path, slices=(24, 8, 13),
           ranks=RANKS_2D.to(DEV), static=True)


def test_static_batch_refreshed_with_another_mix():
    # One static batch, two mixes: the second refresh fully replaces the first.
    S, K, N, R, T = 5, 33, 19, 8, 21
    x, W = randn(T, K, device=DEV), randn(N, K, device=DEV, scale=K ** -0.5)
    A = randn(S, R, K, device=DEV, scale=K ** -0.5)
    B = randn(S, N, R, device=DEV)
    sc = torch.rand(S) + 0.5
    batch = lk.LoRABatch.static(T, S, DEV)
    for kind in ("identical", "zipf", "with_base"):
        ids = _ids(kind, T, S)
        batch.refresh_(ids.to(DEV)).check()
        for path in ("decode", "prefill"):
            with tml.override(**PATHS[path]):
                y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, backend="triton")
            y64 = ref.multi_lora_linear(x.double(), W.double(), None, A.double(), B.double(),
                                        ids, sc.double())
            assert rel_err(y, y64) <= tol(torch.float32, DEV), (kind, path)


# ------------------------------------------------------------------------ ranks and slices
RANKS_1D = torch.tensor([8, 1, 0, 5, 3], dtype=torch.int32)          # 0 and r_max included
RANKS_2D = torch.tensor([[8, 0, 8], [1, 2, 3], [0, 0, 0], [5, 5, 0], [3, 8, 1]], dtype=torch.int32)


@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("layout", ["ranks", "slices_odd", "slices_gqa"])
def test_mixed_ranks_and_packed_slices(layout, path):
    ids = _ids("with_base", 33, 5)
    if layout == "ranks":
        y, (dx, dA, dB) = _check(ids, S=5, path=path, ranks=RANKS_1D.to(DEV))
        assert (dA[1, 1:] == 0).all() and (dA[2] == 0).all() and (dB[2] == 0).all()
    elif layout == "slices_odd":  # widths not multiples of any block, per-slice ranks
        y, (dx, dA, dB) = _check(ids, S=5, N=45, path=path, slices=(24, 8, 13),
                                 ranks=RANKS_2D.to(DEV))
        assert (dA[0, 8:16] == 0).all()  # slot 0 does not adapt slice 1
        assert (dB[0, 24:32] == 0).all()
    else:  # qkv-like, 16-aligned widths (q wider than k/v), one rank per slot
        _check(ids, S=5, K=40, N=64, path=path, slices=(32, 16, 16), ranks=RANKS_1D.to(DEV))


@pytest.mark.parametrize("R,path", [(1, "decode"), (13, "prefill"), (13, "fused"),
                                    (64, "decode1"), (64, "decode")])
def test_rank_sizes(R, path):
    ranks = torch.tensor([R, R // 2, 0, 1, R], dtype=torch.int32).to(DEV) if R > 1 else None
    _check(_ids("uniform", 21, 5), S=5, R=R, K=33, N=19, path=path, ranks=ranks)


SKEWED = torch.tensor([0] * 70 + [1, 2, 2, 3, 4, 4, 4, 5, 6, 7, -1, 7, 6])  # one long segment


@pytest.mark.parametrize("path", ["prefill", "fused"])
def test_tile_map_scan(path):
    # Skewed segments: the dense tile numbering (in-kernel prefix scan) beats a fixed number
    # of tiles per segment, so the kernels take the scan path.
    batch = lk.LoRABatch.from_adapter_ids(SKEWED, 8)
    assert segments.token_tiles(batch, 32)[1] == segments.TILES_BY_SCAN.value
    _check(SKEWED, S=8, path=path)


def test_tile_map_without_scan(monkeypatch):
    # With more active slots than SCAN_MAX_ACTIVE: a fixed tile range per slot, extras exit.
    monkeypatch.setattr(segments, "SCAN_MAX_ACTIVE", 0)
    mode = segments.token_tiles(lk.LoRABatch.from_adapter_ids(SKEWED, 8), 32)[1]
    assert mode == segments.TILES_PER_SLOT.value
    _check(SKEWED, S=8, path="prefill")


@pytest.mark.parametrize("path", ["decode", "fused"])
def test_transposed_weight(path):
    # transformers' Conv1D stores the weight [in, out]: the kernels take W's strides as given.
    S, K, N, T = 5, 37, 45, 33
    ids = _ids("with_base", T, S)
    x = randn(T, K, device=DEV, requires_grad=True)
    W = randn(K, N, device=DEV, scale=K ** -0.5).t()
    A = randn(S, 8, K, device=DEV, scale=K ** -0.5, requires_grad=True)
    B = randn(S, N, 8, device=DEV, requires_grad=True)
    sc = torch.rand(S) + 0.5
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), S)
    with tml.override(**PATHS[path]):
        y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, backend="triton")
        dx = torch.autograd.grad(y, x, torch.ones_like(y))[0]
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = ref.multi_lora_linear(x64, W.cpu().double(), None, A.detach().cpu().double(),
                                B.detach().cpu().double(), ids, sc.double())
    assert rel_err(y, y64) <= tol(torch.float32, DEV)
    dx64 = torch.autograd.grad(y64, x64, torch.ones_like(y64))[0]
    assert rel_err(dx, dx64) <= tol(torch.float32, DEV)


@pytest.mark.parametrize("K,N", [(0, 12), (12, 0)])
@pytest.mark.parametrize("path", ["decode", "fused"])
def test_zero_width(K, N, path):
    S, T = 4, 9
    ids = _ids("with_base", T, S)
    x = randn(T, K, device=DEV, requires_grad=True)
    W = randn(N, K, device=DEV)
    A = randn(S, 8, K, device=DEV, requires_grad=True)
    B = randn(S, N, 8, device=DEV, requires_grad=True)
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), S)
    with tml.override(**PATHS[path]):
        y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=torch.ones(S),
                                 backend="triton")
        grads = torch.autograd.grad(y.sum(), (x, A, B), allow_unused=True, materialize_grads=True)
    assert y.shape == (T, N) and not y.any()
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (x, A, B)))


# ------------------------------------------------------------------- base-only and empty
@pytest.mark.parametrize("T", [0, 5])
def test_base_only_and_empty(T):
    S, K, N = 4, 12, 10
    x = randn(T, K, device=DEV)
    W, b = randn(N, K, device=DEV), randn(N, device=DEV)
    A, B = randn(S, 8, K, device=DEV), randn(S, N, 8, device=DEV)
    batch = lk.LoRABatch.from_adapter_ids(torch.full((T,), -1, device=DEV), S)
    assert not batch.has_lora
    y = lk.multi_lora_linear(x, W, b, A, B, batch, scalings=torch.ones(S), backend="triton")
    assert y.shape == (T, N)
    assert rel_err(y, ref.multi_lora_linear(x.double(), W.double(), b.double(), A.double(),
                                            B.double(), batch.adapter_ids, torch.ones(S,
                                            dtype=F64))) <= tol(torch.float32, DEV)
    xa = lk.lora_shrink(x, A, batch, backend="triton")
    assert xa.shape == (T, 8) and not xa.any()
    y0 = randn(T, N, device=DEV)
    assert torch.equal(lk.lora_expand(y0.clone(), xa, B, batch, backend="triton"), y0)
    # the kernel-level entry skips LoRA work too
    y1, xa1 = tml.multi_lora_fwd(x, W, None, A, B, torch.ones(S, device=DEV), None, batch, None,
                                 True)
    assert torch.allclose(y1, x @ W.T) and not xa1.any()


# ------------------------------------------------------------ low-level shrink / expand
@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("slices", [None, (24, 8, 13)])
def test_shrink_expand(slices, shape):
    S, K, N, R, T = 5, 37, 45, 8, 33
    n_sl = 1 if slices is None else len(slices)
    ids = _ids("with_base", T, S)
    x, y0 = randn(T, K, device=DEV), randn(T, N, device=DEV)
    A = randn(S, n_sl * R, K, device=DEV, scale=K ** -0.5)
    B = randn(S, N, R, device=DEV)
    ranks = (RANKS_1D if slices is None else RANKS_2D).to(DEV)
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), S)
    for sc in (None, torch.rand(S) + 0.5):
        with tml.override(shape=shape):
            xa = lk.lora_shrink(x, A, batch, sc, ranks=ranks, n_slices=n_sl, backend="triton")
        assert xa.dtype == torch.float32 and xa.shape == (T, n_sl * R)
        xa64 = ref.lora_shrink(x.cpu().double(), A.cpu().double(), ids,
                               None if sc is None else sc.double(), ranks.cpu(), n_sl)
        assert rel_err(xa, xa64) <= tol(torch.float32, DEV)
        assert torch.equal(xa.cpu() == 0, xa64 == 0)  # exact zeros: -1 rows, ranks past rank
    y = y0.clone()
    with tml.override(shape=shape):
        out = lk.lora_expand(y, xa, B, batch, ranks=ranks, out_slices=slices, backend="triton")
    assert out is y
    y64 = ref.lora_expand(y0.cpu().double(), xa.cpu().double(), B.cpu().double(), ids,
                          ranks.cpu(), slices)
    assert rel_err(y, y64) <= tol(torch.float32, DEV)
    assert torch.equal(y[ids.to(DEV) == -1], y0[ids.to(DEV) == -1])  # -1 rows untouched


# ------------------------------------------------------------------- robustness, contract
def test_bad_ids_raise_naming_adapter_ids():
    for ids in (torch.tensor([0, 5, 1]), torch.tensor([0, -2, 1])):
        with pytest.raises(ValueError, match="adapter_ids"):
            lk.LoRABatch.from_adapter_ids(ids.to(DEV), 5)


def test_nan_stays_in_its_rows():
    S, K, N = 4, 16, 12
    W = randn(N, K, device=DEV)
    A, B = randn(S, 8, K, device=DEV), randn(S, N, 8, device=DEV)
    A[3, 0, 0] = float("nan")  # slot 3's adapter is poisoned
    x = randn(6, K, device=DEV)
    x[1, 2] = float("nan")     # a base-only token's input is NaN
    ids = torch.tensor([3, -1, 0, 3, 2, -1])
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), S)
    for path in ("decode", "fused"):
        with tml.override(**PATHS[path]):
            y = lk.multi_lora_linear(x, W, None, A, B, batch, scalings=torch.ones(S),
                                     backend="triton")
        nan_rows = torch.isnan(y).any(1).cpu()
        assert nan_rows.tolist() == [True, True, False, True, False, False], path


@pytest.mark.parametrize("slices", [None, (24, 8, 13)])
def test_grad_token_splits(slices):
    # dA/dB reduced through per-chunk fp32 planes (what long single-adapter segments get on GPU)
    ranks = torch.cat([RANKS_1D, RANKS_1D[:3]]) if slices is None else \
        torch.cat([RANKS_2D, RANKS_2D[:3]])
    with tml.override(grad_splits=3):
        _check(SKEWED, S=8, path="prefill", slices=slices, ranks=ranks.to(DEV))


def test_opcheck_on_triton():
    # Schema, fake kernels, autograd registration and dynamic-shape tracing with the Triton
    # backend behind the custom ops (the kernels' outputs must match the fake shapes/dtypes).
    S, T, K, N, R = 5, 6, 9, 7, 8
    x = randn(T, K, device=DEV, requires_grad=True)
    W = randn(N, K, device=DEV)
    A = randn(S, R, K, device=DEV, requires_grad=True)
    B = randn(S, N, R, device=DEV, requires_grad=True)
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, -1, 4, 4, 1, 0], device=DEV), S)
    sc = torch.rand(S, device=DEV)
    ranks = torch.tensor([3, 8, 0, 2, 5], dtype=torch.int32, device=DEV)
    meta = (*batch.tensors(), batch.host_ints())
    ops = torch.ops.lora_kernels
    torch.library.opcheck(ops.multi_lora_linear.default,
                          (x, W, None, A, B, sc, ranks, *meta, None, True, "triton"))
    xa = randn(T, R, device=DEV)
    torch.library.opcheck(ops.lora_shrink.default, (x.detach(), A.detach(), sc, ranks, *meta, 1,
                                                     "triton"))
    torch.library.opcheck(ops.lora_expand.default, (randn(T, N, device=DEV), xa, B.detach(), ranks,
                                                     *meta, None, "triton"))


def test_backward_is_deterministic():
    ids = _ids("zipf", 33, 5)
    torch.manual_seed(3)
    _, g1 = _check(ids, S=5, path="prefill")
    torch.manual_seed(3)
    _, g2 = _check(ids, S=5, path="prefill")
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind,T", [("distinct", 64), ("uniform", 256), ("zipf", 2048),
                                    ("with_base", 300), ("identical", 1)])
def test_gpu_realistic(kind, T, path, dtype):
    S = 300 if kind == "distinct" else 16
    _check(_ids(kind, T, S), S=S, K=512, N=384, R=16, dtype=dtype, path=path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "fused", "prefill"])
def test_gpu_qkv_mixed_ranks_bf16(path):
    S, R = 8, 64
    ranks = torch.tensor([[8, 64, 0], [64, 8, 8], [16, 16, 16], [0, 0, 0],
                          [64, 64, 64], [8, 8, 8], [1, 2, 3], [33, 0, 17]], dtype=torch.int32)
    _check(_ids("zipf", 1024, S), S=S, K=512, N=768, R=R, dtype=torch.bfloat16, path=path,
           slices=(512, 128, 128), ranks=ranks.cuda())


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    S, K, N, R, T = 32, 1024, 768, 16, 64
    x = randn(T, K, dtype=torch.bfloat16, device="cuda")
    W = randn(N, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    A = randn(S, R, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    B = randn(S, N, R, dtype=torch.bfloat16, device="cuda")
    ranks = torch.randint(0, R + 1, (S,), dtype=torch.int32, device="cuda")
    sc = torch.rand(S, device="cuda")
    batch = lk.LoRABatch.from_adapter_ids(torch.randint(-1, S, (T,), device="cuda"), S)

    def fwd():
        return lk.multi_lora_linear(x, W, None, A, B, batch, scalings=sc, ranks=ranks,
                                    backend="triton")

    want = fwd()  # warm-up: compiles kernels, caches slice tables, checks ranks once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd()  # any host sync inside the layer raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g, out = capture_cuda_graph(fwd)
    x.copy_(randn(T, K, dtype=torch.bfloat16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, fwd()) <= 1e-6  # the replay used the new x
    assert rel_err(want, out) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 256])
def test_gpu_cuda_graph_serves_any_mix_after_refresh(T):
    """Capture one decode graph over a static batch, then replay it after refreshing the batch
    with three different adapter mixes (mixed ranks, -1 tokens): each replay equals eager."""
    S, K, N, R = 32, 1024, 768, 64
    dt = torch.bfloat16
    x = randn(T, K, dtype=dt, device="cuda")
    W = randn(N, K, dtype=dt, device="cuda", scale=K ** -0.5)
    A = randn(S, R, K, dtype=dt, device="cuda", scale=K ** -0.5)
    B = randn(S, N, R, dtype=dt, device="cuda")
    ranks = torch.tensor([(8, 16, 64)[i % 3] for i in range(S)], dtype=torch.int32,
                         device="cuda")
    sc = torch.rand(S, device="cuda")
    batch = lk.LoRABatch.static(T, S, "cuda")
    g = torch.Generator().manual_seed(T)
    mixes = [torch.randint(-1, S, (T,), generator=g), torch.full((T,), 5),
             torch.randperm(max(S, T), generator=g)[:T] % S]
    mixes[2][::3] = -1

    def fwd(b):
        return lk.multi_lora_linear(x, W, None, A, B, b, scalings=sc, ranks=ranks,
                                    backend="triton")

    batch.refresh_(mixes[0].cuda())
    fwd(batch)  # warm-up: compiles, checks ranks once
    graph, out = capture_cuda_graph(lambda: fwd(batch))
    for ids in mixes:
        ids_dev = ids.cuda()  # (the upload itself is the scheduler's business)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch.refresh_(ids_dev)  # in place, no host sync
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        eager = fwd(batch)  # the same plan and kernels, launched eagerly: bit-identical
        exact = fwd(lk.LoRABatch.from_adapter_ids(ids.cuda(), S))  # exact host ints
        torch.cuda.synchronize()
        batch.check()
        assert torch.equal(out, eager), ids[:8]
        assert rel_err(out, exact) <= tol(dt, "cuda")
        y64 = ref.multi_lora_linear(x.cpu().double(), W.cpu().double(), None, A.cpu().double(),
                                    B.cpu().double(), ids, sc.cpu().double(), ranks.cpu())
        assert rel_err(out, y64) <= tol(dt, "cuda")


# ------------------------------------------------- CPU: the GPU code paths compile for sm_90
_SM90_SCRIPT = SM90_FAKE_DRIVER + r'''
from triton.runtime.jit import JITFunction
_run = JITFunction.run
compiled, kernels = [], []
def _compile_only(self, *args, grid, warmup, **kw):
    kernel = _run(self, *args, grid=grid, warmup=True, **kw)
    compiled.append((self.fn.__name__, kernel.metadata.shared))
    kernels.append((self.fn.__name__, kernel))
JITFunction.run = _compile_only

import lora_kernels as lk
from lora_kernels.triton import configs, multi_lora as ml, multi_plan as mp

class _H100:  # the planner's GPU branch (132 SMs) for CPU tensors
    type, index = "cuda", 0
configs.num_sms = lambda device: 132
_plan, _splits = mp.plan, mp.grad_splits
ml.plan = lambda *a, **k: _plan(*a[:5], _H100(), *a[6:], **k)
ml.grad_splits = lambda *a: _splits(*a[:-1], _H100())
ml.use_fused = lambda batch, dtype, device: mp.TUNING["path"] == "fused"
ml.use_pdl = lambda device: True  # compile the PDL variants (gdc_wait / launch_dependents)
_fused = ml.launch_fused
ml.launch_fused = lambda *a, **k: _fused(*a, **{**k, "interpret": False, "config": dict(
    BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)})

def case(T, ids, K, N, R, slices, dtype, ranks, path, S=64, bounded=False):
    n = 1 if slices is None else len(slices)
    x, W = torch.empty(T, K, dtype=dtype), torch.empty(N, K, dtype=dtype)
    A, B = torch.empty(S, n * R, K, dtype=dtype), torch.empty(S, N, R, dtype=dtype)
    sc = torch.ones(S)
    batch = lk.LoRABatch.static(T, S).refresh_(ids) if bounded else \
        lk.LoRABatch.from_adapter_ids(ids, S)
    with mp.override(path=path):
        y, xa = ml.multi_lora_fwd(x, W, None, A, B, sc, ranks, batch, slices, True)
        ml.multi_lora_bwd(y, x, W, A, B, xa, sc, ranks, batch, slices, (True, False, False, True, True))

bf = torch.bfloat16
case(64, torch.arange(64), 4096, 4096, 16, None, bf, None, "unfused")           # decode, split-K
case(64, torch.arange(64), 4096, 4096, 16, None, bf, None, "unfused", bounded=True)  # graph batch
case(2048, torch.arange(2048) % 64, 4096, 4096, 16, None, bf, None, "unfused", bounded=True)
case(4, torch.arange(4), 4096, 4096, 16, None, bf, None, "unfused")             # one launch
case(1024, torch.arange(1024) % 8, 4096, 6144, 16, (4096, 1024, 1024), bf,     # packed prefill
     torch.full((64, 3), 16, dtype=torch.int32), "fused")
case(600, torch.cat([torch.zeros(500, dtype=torch.long), torch.arange(100) % 50 + 1]),  # skewed:
     1024, 1024, 16, None, torch.float16, None, "unfused")                          # tile scan
# PDL: the expand is launched as a dependent, prefetches B (and y) with 16-byte loads before
# griddepcontrol.wait, and touches the shrink's planes (cp.async / loads) only after it.
pdl = [k for n, k in kernels if n == "_expand_kernel" and k.metadata.launch_pdl]
assert pdl, "no PDL expand was compiled"
for k in pdl:
    ptx = k.asm["ptx"]
    w = ptx.index("griddepcontrol.wait")
    assert "ld.global.v4" in ptx[:w] and "cp.async" not in ptx[:w], "plane read before the wait"
assert any("griddepcontrol.launch_dependents" in k.asm["ptx"] for n, k in kernels
           if n == "_shrink_kernel")
print("compiled", len(compiled), "kernels; max smem", max(s for _, s in compiled))
'''


def test_kernels_compile_for_sm90():
    """The interpreter never compiles: constexpr branches, layouts, int64 offsets and the fused
    GEMM's epilogue loop only meet Triton's compiler and ptxas on a GPU. Compile the GPU configs
    for sm_90 here, without one (a fake driver + warmup-only launches), in a process without
    the interpreter."""
    run_sm90_compile(_SM90_SCRIPT)
