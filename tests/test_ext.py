"""The CUDA extension ``lora_kernels._C`` and its backend module ``lora_kernels._ext``.

CPU (CI): the extension is built and loads wherever nvcc is installed (a missing build then
*fails*), every ``cuda_*`` op has a CUDA kernel and a fake with its schema's arguments, the fake
kernels give the right shapes under FakeTensorMode, ``backend="cuda"`` on CPU tensors raises a
clear error, and the dispatch-table builder never picks an unvalidated kernel.

GPU (``@pytest.mark.gpu``): every CUDA kernel against the float64 reference and against the
Triton backend, on odd shapes, fp32/fp16/bf16, ``-1`` ids, mixed per-slot and per-slice ranks,
packed slices, each kernel path forced; the dropout mask bit-for-bit equal to the reference;
bad input raising instead of faulting. bench/sanitize.sh runs this subset under
compute-sanitizer; bench/dispatch_table.py lets ``auto`` pick CUDA only where these passed.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import lora_kernels as lk
from lora_kernels import _ext, reference as ref
from lora_kernels._ext import fakes
from lora_kernels.ops import backend as B
from lora_kernels.ops.batch import LoRABatch
from helpers import f64, load_bench_tool, randn, rel_err, tol

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
_DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dt_id(d):  # readable ids for `-k` (bench/sanitize.sh selects by them)
    return _DT_ID[d]


def _nvcc() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.fixture(scope="module")
def C():
    """torch.ops.lora_kernels once the extension is loaded. Where nvcc and a CUDA torch exist
    the build must have happened (`make ext`): a missing extension is a failure, not a skip."""
    why = _ext.why_unavailable()
    if why is None:
        return torch.ops.lora_kernels
    if _nvcc() and torch.version.cuda:
        pytest.fail(f"nvcc is installed but the extension is missing: {why}")
    pytest.skip(why)


# =============================================================================================
# CPU: build, registration, schemas, fake kernels, errors
# =============================================================================================
def test_extension_loads(C):
    import lora_kernels._C as ext
    assert ext.__file__.endswith(".so")
    assert _ext.why_unavailable() is None


def _registered_cuda_ops() -> list[str]:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("lora_kernels::cuda_"))


def test_every_schema_has_a_fake_with_its_argument_names(C):
    """The schemas live in csrc/ only; the fakes (lora_kernels/_ext/fakes.py) must follow them."""
    import inspect
    names = _registered_cuda_ops()
    assert names and set(names) == set(fakes.FAKES)
    for name in names:
        schema = getattr(C, name).default._schema
        assert [a.name for a in schema.arguments] == list(inspect.signature(fakes.FAKES[name]).parameters), name
        assert not schema.returns, f"{name}: the cuda_* ops write into preallocated outputs"


@pytest.mark.parametrize("name", sorted(fakes.FAKES))
def test_every_op_has_a_cuda_kernel(C, name):
    if name.startswith("cuda_cutlass_") and _ext.why_no_cutlass() is not None:
        pytest.skip(_ext.why_no_cutlass())  # optional kernels; tests/test_cutlass.py requires them
    qual = f"lora_kernels::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), f"{qual} has no CUDA kernel"


def test_backend_module_implements_the_api():
    for fn in B.KERNEL_API:
        # documented fallbacks along cuda -> triton -> torch (DoRA: no CUTLASS GEMM yet)
        if fn in ("multi_lora_bwd", "dora_weight_a", "dora_linear_fwd", "dora_scale_grad"):
            assert not hasattr(_ext, fn)
            assert callable(B.kernel("cuda", fn))
        else:
            assert callable(getattr(_ext, fn)), fn


def test_seed_travels_as_int64():
    assert _ext._i64(5) == 5
    assert _ext._i64(2**64 - 1) == -1
    assert _ext._i64(2**63) == -(2**63)
    assert _ext._i64(-3) == -3


def _single(M=5, K=12, N=9, r=4, dtype=torch.float32, device="cpu"):
    return (randn(M, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device),
            randn(N, dtype=dtype, device=device), randn(r, K, dtype=dtype, device=device),
            randn(N, r, dtype=dtype, device=device))


def test_cuda_backend_on_cpu_tensors_raises_clearly():
    x, W, b, A, Bm = _single()
    with pytest.raises(lk.BackendUnavailableError, match="needs CUDA tensors"):
        lk.lora_linear(x, W, b, A, Bm, backend="cuda")
    batch = LoRABatch.from_adapter_ids([0, -1, 1, 0, 1], 2)
    with pytest.raises(lk.BackendUnavailableError, match="needs CUDA tensors"):
        lk.multi_lora_linear(x, W, b, randn(2, 4, 12), randn(2, 9, 4), batch, scalings=[1.0, 2.0],
                             backend="cuda")
    with pytest.raises(lk.BackendUnavailableError, match="needs CUDA tensors"):
        lk.lora_shrink(x, randn(2, 4, 12), batch, backend="cuda")


def test_why_unavailable_says_how_to_build():
    assert "make ext" in _ext._BUILD_HINT
    why = _ext.why_unavailable()
    assert why is None or "make ext" in why


def _fake_batch(T, S, num_active, max_seg_len):
    dev = "cuda"
    i32 = dict(dtype=torch.int32, device=dev)
    return LoRABatch(torch.empty(T, **i32), torch.empty(T, **i32), torch.empty(S + 2, **i32),
                     torch.empty(num_active, **i32), S, num_active, max_seg_len)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fake_kernels_give_shapes_and_dtypes(C, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    T, K, N, S, R = 40, 24, 20, 3, 8
    with FakeTensorMode():
        def t(*shape, dt=dtype):
            return torch.empty(*shape, device="cuda", dtype=dt)
        batch = _fake_batch(T, S, 2, 30)
        xa = _ext.lora_shrink(t(T, K), t(S, 2 * R, K), batch, t(S, dt=torch.float32), None, 2)
        assert xa.shape == (T, 2 * R) and xa.dtype == torch.float32 and xa.device.type == "cuda"
        y = t(T, N)
        assert _ext.lora_expand(y, xa, t(S, N, R), batch, None, [5, 15]) is y
        for rows in (7, T):  # fused decode launch, then shrink + expand
            bt = _fake_batch(rows, S, 2, rows)
            y, xa = _ext.multi_lora_fwd(t(rows, K), t(N, K), t(N), t(S, R, K), t(S, N, R),
                                        t(S, dt=torch.float32), None, bt, None, True)
            assert y.shape == (rows, N) and y.dtype == dtype
            assert xa.shape == (rows, R) and xa.dtype == torch.float32
        y, xa = _ext.lora_linear_fwd(t(T, K), t(N, K), t(N), t(R, K), t(N, R), 2.0, 0.1, 7)
        assert y.shape == (T, N) and y.dtype == dtype and xa.shape == (T, R) and xa.dtype == dtype
        grads = _ext.lora_linear_bwd(t(T, N), t(T, K), t(N, K), t(R, K), t(N, R), xa, 2.0, 0.1, 7,
                                     (True,) * 5)
        assert [g.shape for g in grads] == [(T, K), (N, K), (N,), (R, K), (N, R)]
        assert all(g.dtype == dtype for g in grads)
        m = _ext.dropout_keep_mask(3, 6, 10, 0.5, device="cuda")
        assert m.shape == (6, 10) and m.dtype == torch.bool


def test_fake_kernels_reject_bad_shapes(C):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a = torch.empty(8, 16, device="cuda", dtype=torch.float16)
        w = torch.empty(32, 16, device="cuda", dtype=torch.float16)
        u = torch.empty(8, 4, device="cuda", dtype=torch.float16)
        v = torch.empty(32, 4, device="cuda", dtype=torch.float16)
        with pytest.raises(RuntimeError, match="out must be"):
            C.cuda_fused_lora_gemm(a, w, None, u, v, 1.0, 0.0, 0, False,
                                   torch.empty(8, 31, device="cuda", dtype=torch.float16))


def test_dispatch_table_only_names_validated_winners(tmp_path):
    tool = load_bench_tool("dispatch_table")
    rows = [tool.timing_row("lora_linear", 4, {"triton": 2.0, "cuda": 1.0}),
            tool.timing_row("lora_linear", 8, {"triton": 2.0, "cuda": 1.5}),
            tool.timing_row("lora_linear", 4096, {"triton": 1.0, "cuda": 3.0}),
            tool.timing_row("multi_lora_linear", 8, {"triton": 2.0, "cuda": 1.0}),
            tool.timing_row("lora_shrink", 8, {"triton": 2.0, "cuda": None})]
    validated = {"lora_linear", "lora_shrink"}  # multi_lora_linear's GPU tests did not pass
    table = tool.build_table(rows, validated)
    assert table["lora_linear"] == {"decode": "cuda", "large": "triton"}
    assert table["multi_lora_linear"] == {"decode": "triton"}  # faster but unvalidated
    assert table["lora_shrink"] == {"decode": "triton"}        # no CUDA timing
    junit = tmp_path / "gpu.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_ext" name="test_gpu_shrink[a]"/>'
        '<testcase classname="tests.test_ext" name="test_gpu_empty_batches"/>'
        '<testcase classname="tests.test_ext" name="test_gpu_bad_input_raises_instead_of_faulting"/>'
        '<testcase classname="tests.test_ext" name="test_gpu_expand[b]"><failure/></testcase>'
        '<testcase classname="tests.test_ext" name="test_gpu_dropout_mask[c]"><skipped/></testcase>'
        '</testsuite></testsuites>')
    ok = tool.validated_ops(junit)
    assert "lora_shrink" in ok and "lora_expand" not in ok and "lora_linear" not in ok
    san = tmp_path / "san"
    san.mkdir()
    assert tool.validated_ops(junit, sanitizer_dir=san) == set()  # no logs: nothing vouches
    (san / "sanitize-memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    assert tool.validated_ops(junit, sanitizer_dir=san) == ok     # complete and clean
    (san / "sanitize-racecheck.log").write_text("========= Program hit an error\n")
    assert tool.validated_ops(junit, sanitizer_dir=san) == set()  # cut off (timeout): no summary
    (san / "sanitize-racecheck.log").write_text("========= ERROR SUMMARY: 2 errors\n")
    assert tool.validated_ops(junit, sanitizer_dir=san) == set()  # sanitizer findings veto all


# =============================================================================================
# GPU: every kernel vs the float64 reference and vs Triton
# =============================================================================================
gpu = pytest.mark.gpu
DEV = "cuda"


def _d(t):
    """float64 CPU copy for the reference, never requiring grad (the GPU tests set that)."""
    return f64(t, grad=False)


def _triton(fn):
    """The Triton backend's function, or None when LORA_KERNELS_TEST_NO_TRITON=1 (the sanitizer
    runs check our kernels only)."""
    if os.environ.get("LORA_KERNELS_TEST_NO_TRITON") == "1":
        return None
    return B.kernel("triton", fn)


def _ids(kind, T, S, seed=0):
    g = torch.Generator().manual_seed(100 * T + seed)
    if kind == "with_base":
        ids = torch.randint(-1, S, (T,), generator=g)
        ids[0] = -1
        return ids
    if kind == "one":
        return torch.full((T,), S - 1)
    if kind == "all_base":
        return torch.full((T,), -1)
    return torch.randint(0, S, (T,), generator=g)


def _ranks(kind, S, R, n_slices):
    g = torch.Generator().manual_seed(S * R + n_slices)
    if kind is None:
        return None
    if kind == "slot":
        rk = torch.randint(0, R + 1, (S,), generator=g)
        rk[0] = R
        return rk.to(torch.int32)
    rk = torch.randint(0, R + 1, (S, n_slices), generator=g)  # "slice": per slot and slice
    rk[0, 0] = R
    return rk.to(torch.int32)


# (T, K, N, S, R, slices, ids kind, ranks kind)
MULTI_CASES = [
    (1, 64, 48, 3, 8, None, "random", None),
    (7, 13, 45, 4, 13, None, "with_base", "slot"),
    (33, 136, 77, 5, 16, (20, 40, 17), "with_base", "slice"),
    (130, 64, 256, 3, 64, None, "random", "slot"),
    (300, 200, 130, 4, 8, (30, 100), "with_base", "slice"),
    (257, 40, 96, 2, 1, None, "one", None),
    (9, 64, 64, 2, 16, None, "all_base", None),
]


def _multi_inputs(case, dtype):
    T, K, N, S, R, slices, ids_kind, ranks_kind = case
    n_sl = 1 if slices is None else len(slices)
    ids = _ids(ids_kind, T, S)
    x = randn(T, K, dtype=dtype, device=DEV)
    A = randn(S, n_sl * R, K, dtype=dtype, device=DEV, scale=K ** -0.5)
    Bm = randn(S, N, R, dtype=dtype, device=DEV)
    sc = (torch.rand(S) + 0.5).to(DEV)
    rk = _ranks(ranks_kind, S, R, n_sl)
    batch = LoRABatch.from_adapter_ids(ids.to(DEV), S)
    return ids, x, A, Bm, sc, (None if rk is None else rk.to(DEV)), batch, n_sl


@gpu
@pytest.mark.parametrize("path", [_ext.PATH_DECODE, _ext.PATH_PREFILL, _ext.PATH_AUTO])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("case", MULTI_CASES)
def test_gpu_shrink(C, case, dtype, path):
    ids, x, A, Bm, sc, rk, batch, n_sl = _multi_inputs(case, dtype)
    out = _ext.lora_shrink(x, A, batch, sc, rk, n_sl, path=path)
    want = ref.lora_shrink(_d(x), _d(A), ids, _d(sc), _d(rk), n_sl)
    assert out.dtype == torch.float32
    assert rel_err(out, want) <= tol(dtype, DEV)
    assert torch.equal(out.cpu()[want == 0], torch.zeros_like(want[want == 0], dtype=torch.float32)), \
        "-1 tokens and rank rows past the rank must be exactly zero"
    if dtype != torch.float32 and _triton("lora_shrink"):  # fp32 Triton may use tf32
        tri = _triton("lora_shrink")(x, A, batch, sc, rk, n_sl)
        assert rel_err(out, tri.float()) <= 2 * tol(dtype, DEV)


@gpu
@pytest.mark.parametrize("path", [_ext.PATH_DECODE, _ext.PATH_PREFILL])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("case", MULTI_CASES)
def test_gpu_expand(C, case, dtype, path):
    ids, x, A, Bm, sc, rk, batch, n_sl = _multi_inputs(case, dtype)
    T, N, R = x.shape[0], Bm.shape[1], Bm.shape[2]
    slices = case[5]
    xa = torch.randn(T, n_sl * R, device=DEV)
    y0 = randn(T, N, dtype=dtype, device=DEV)
    y = y0.clone()
    assert _ext.lora_expand(y, xa, Bm, batch, rk, slices, path=path) is y
    want = ref.lora_expand(_d(y0), _d(xa), _d(Bm), ids, _d(rk), slices)
    assert rel_err(y, want) <= tol(dtype, DEV)
    base = ids < 0
    assert torch.equal(y.cpu()[base], y0.cpu()[base]), "-1 rows must stay bit-identical"
    if _triton("lora_expand"):
        tri = y0.clone()
        _triton("lora_expand")(tri, xa, Bm, batch, rk, slices)
        assert rel_err(y, tri) <= 2 * tol(dtype, DEV)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("case", [c for c in MULTI_CASES if c[0] <= 33])
def test_gpu_shrink_expand_fused(C, case, dtype):
    ids, x, A, Bm, sc, rk, batch, n_sl = _multi_inputs(case, dtype)
    T, N, R = x.shape[0], Bm.shape[1], Bm.shape[2]
    slices = case[5]
    y0 = randn(T, N, dtype=dtype, device=DEV)
    y = y0.clone()
    xa = torch.full((T, n_sl * R), float("nan"), device=DEV)  # every entry must be written
    C.cuda_lora_shrink_expand(y, x, A, Bm, sc, rk, batch.adapter_ids, list(slices or []), xa)
    want_xa = ref.lora_shrink(_d(x), _d(A), ids, _d(sc), _d(rk), n_sl)
    want_y = ref.lora_expand(_d(y0), want_xa.clone(), _d(Bm), ids, _d(rk), slices)
    assert rel_err(xa, want_xa) <= tol(dtype, DEV)
    assert rel_err(y, want_y) <= tol(dtype, DEV)
    assert torch.equal(y.cpu()[ids < 0], y0.cpu()[ids < 0])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("case", MULTI_CASES)
def test_gpu_multi_lora_fwd(C, case, dtype):
    ids, x, A, Bm, sc, rk, batch, n_sl = _multi_inputs(case, dtype)
    N, K = Bm.shape[1], x.shape[1]
    W = randn(N, K, dtype=dtype, device=DEV, scale=K ** -0.5)
    b = randn(N, dtype=dtype, device=DEV)
    y, xa = _ext.multi_lora_fwd(x, W, b, A, Bm, sc, rk, batch, case[5], True)
    want = ref.multi_lora_linear(_d(x), _d(W), _d(b), _d(A), _d(Bm), ids, _d(sc), _d(rk), case[5])
    assert rel_err(y, want) <= tol(dtype, DEV)
    if batch.has_lora:
        assert rel_err(xa, ref.lora_shrink(_d(x), _d(A), ids, _d(sc), _d(rk), n_sl)) <= tol(dtype, DEV)
    if _triton("multi_lora_fwd"):
        tri, _ = _triton("multi_lora_fwd")(x, W, b, A, Bm, sc, rk, batch, case[5], False)
        assert rel_err(y, tri) <= 2 * tol(dtype, DEV) + (tol(dtype, DEV) if dtype == torch.float32 else 0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_gpu_public_multi_lora_cuda_backend(C, dtype):
    T, K, N, S, R = 37, 72, 90, 4, 8
    ids = _ids("with_base", T, S)
    x = randn(T, K, dtype=dtype, device=DEV, requires_grad=True)
    W = randn(N, K, dtype=dtype, device=DEV, scale=K ** -0.5)
    A = randn(S, R, K, dtype=dtype, device=DEV, scale=K ** -0.5, requires_grad=True)
    Bm = randn(S, N, R, dtype=dtype, device=DEV, requires_grad=True)
    sc = torch.rand(S) + 0.5
    batch = LoRABatch.from_adapter_ids(ids.to(DEV), S)
    y = lk.multi_lora_linear(x, W, None, A, Bm, batch, scalings=sc, backend="cuda")
    leaves = [_d(t).requires_grad_() for t in (x, A, Bm)]
    want = ref.multi_lora_linear(leaves[0], _d(W), None, leaves[1], leaves[2], ids, sc.to(F64))
    assert rel_err(y, want) <= tol(dtype, DEV)
    g = torch.randn_like(want)
    y.backward(g.to(DEV, dtype))  # backward: Triton (the cuda backend has no multi_lora_bwd)
    want.backward(g)
    for t, leaf in zip((x, A, Bm), leaves):
        assert rel_err(t.grad, leaf.grad) <= 2 * tol(dtype, DEV)


# ---- fused single-adapter GEMM ----------------------------------------------------------------
# (M, N, K, r): decode/small tiles, medium and large tiles, odd K/r (element-wise loads), r = 0
GEMM_CASES = [(1, 13, 64, 8), (7, 77, 136, 13), (33, 256, 64, 1), (200, 259, 13, 64),
              (130, 1024, 520, 16), (2048, 1536, 256, 16), (64, 64, 64, 0), (5, 40, 0, 8)]


def _gemm_ref(a, w, bias, u, v, s, p, seed, trans_b):
    a, w, u, v = _d(a), _d(w), _d(u), _d(v)
    if trans_b:
        w, v = w.t(), v.t()
    low = (u @ v.t()) * s
    if p > 0:
        low = torch.where(ref.dropout_keep_mask(seed, low.shape[0], low.shape[1], p), low / (1 - p),
                          torch.zeros((), dtype=F64))
    out = a @ w.t() + low
    return out if bias is None else out + _d(bias)


@gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gpu_fused_gemm(C, case, dtype, trans_b, p):
    M, N, K, r = case
    a = randn(M, K, dtype=dtype, device=DEV)
    w = randn(*((K, N) if trans_b else (N, K)), dtype=dtype, device=DEV, scale=max(K, 1) ** -0.5)
    u = randn(M, r, dtype=dtype, device=DEV)
    v = randn(*((r, N) if trans_b else (N, r)), dtype=dtype, device=DEV, scale=0.3)
    bias = None if trans_b else randn(N, dtype=dtype, device=DEV)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    C.cuda_fused_lora_gemm(a, w, bias, u, v, 0.7, p, 1234, trans_b, out)
    want = _gemm_ref(a, w, bias, u, v, 0.7, p, 1234, trans_b)
    assert not out.isnan().any()
    assert rel_err(out, want) <= tol(dtype, DEV)
    # no worse than 2x the same-dtype torch composition
    wt = w if trans_b else w.t()
    vt = v if trans_b else v.t()
    low = (u @ vt) * 0.7
    if p > 0:
        low = torch.where(_ext.dropout_keep_mask(1234, M, N, p, DEV), low / (1 - p), 0)
    comp = a @ wt + low + (0 if bias is None else bias)
    assert rel_err(out, want) <= 2 * rel_err(comp, want) + 1e-6


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
def test_gpu_fused_gemm_strided_views(C, dtype):
    M, N, K, r = 45, 70, 96, 8
    a = randn(M, K, dtype=dtype, device=DEV)
    w_big = randn(N, K + 40, dtype=dtype, device=DEV, scale=K ** -0.5)
    w = w_big[:, 8:8 + K]  # row stride K + 40, 16-byte aligned start
    u = randn(M, r, dtype=dtype, device=DEV)
    v = randn(N, r, dtype=dtype, device=DEV)
    big = torch.zeros(M, N + 10, dtype=dtype, device=DEV)
    out = big[:, 3:3 + N]  # strided, odd start: element-wise epilogue stores
    C.cuda_fused_lora_gemm(a, w, None, u, v, 1.5, 0.0, 0, False, out)
    assert rel_err(out, _gemm_ref(a, w, None, u, v, 1.5, 0.0, 0, False)) <= tol(dtype, DEV)
    assert torch.equal(big[:, :3].cpu(), torch.zeros(M, 3, dtype=dtype))
    assert torch.equal(big[:, 3 + N:].cpu(), torch.zeros(M, 7, dtype=dtype))


@gpu
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("shape", [(1, 16, 24, 4), (33, 45, 72, 13), (300, 128, 200, 16)])
def test_gpu_lora_linear_backend(C, shape, dtype, p):
    M, K, N, r = shape
    x, W, b, A, Bm = _single(M, K, N, r, dtype, DEV)
    seed = 2**40 + 17
    y, xa = _ext.lora_linear_fwd(x, W, b, A, Bm, 0.5, p, seed)
    y64, xa64 = ref.lora_linear_forward(_d(x), _d(W), _d(b), _d(A), _d(Bm), 0.5, p, seed)
    assert rel_err(y, y64) <= tol(dtype, DEV) and rel_err(xa, xa64) <= tol(dtype, DEV)
    dy = randn(M, N, dtype=dtype, device=DEV)
    got = _ext.lora_linear_bwd(dy, x, W, A, Bm, xa, 0.5, p, seed, (True,) * 5)
    want = ref.lora_linear_backward(_d(dy), _d(x), _d(W), _d(A), _d(Bm), xa64, 0.5, p, seed, (True,) * 5)
    for g, w_ in zip(got, want):
        assert rel_err(g, w_) <= 2 * tol(dtype, DEV)
    if _triton("lora_linear_fwd"):
        tri_y, _ = _triton("lora_linear_fwd")(x, W, b, A, Bm, 0.5, p, seed, None)
        assert rel_err(y, tri_y) <= 2 * tol(dtype, DEV) + (tol(dtype, DEV) if dtype == torch.float32 else 0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_gpu_public_lora_linear_cuda_backend(C, dtype):
    x, W, b, A, Bm = _single(19, 40, 56, 8, dtype, DEV)
    for t in (x, A, Bm):
        t.requires_grad_()
    y = lk.lora_linear(x, W, b, A, Bm, scaling=2.0, dropout_p=0.2, dropout_seed=99, backend="cuda")
    leaves = [_d(t).requires_grad_() for t in (x, A, Bm)]
    want = ref.lora_linear(leaves[0], _d(W), _d(b), leaves[1], leaves[2], 2.0, 0.2, 99)
    assert rel_err(y, want) <= tol(dtype, DEV)
    g = torch.randn_like(want)
    y.backward(g.to(DEV, dtype))
    want.backward(g)
    for t, leaf in zip((x, A, Bm), leaves):
        assert rel_err(t.grad, leaf.grad) <= 2 * tol(dtype, DEV)


@gpu
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**63 + 5, 123456789])
@pytest.mark.parametrize("p", [1e-7, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 1000)])
def test_gpu_dropout_mask(C, shape, p, seed):
    rows, cols = shape
    got = _ext.dropout_keep_mask(seed, rows, cols, p, DEV)
    assert torch.equal(got.cpu(), ref.dropout_keep_mask(seed, rows, cols, p))
    shifted = _ext.dropout_keep_mask(seed, rows, cols, p, DEV, row_offset=5)
    assert torch.equal(shifted.cpu(), ref.dropout_keep_mask(seed, rows, cols, p, row_offset=5))
    if p < 1.0 and _triton("dropout_keep_mask"):
        assert torch.equal(got, _triton("dropout_keep_mask")(seed, rows, cols, p, DEV))


# ---- edges and misuse --------------------------------------------------------------------------
@gpu
def test_gpu_empty_batches(C):
    x = torch.empty(0, 16, device=DEV, dtype=torch.float16)
    batch = LoRABatch.from_adapter_ids(torch.empty(0, dtype=torch.int64, device=DEV), 2)
    A = randn(2, 8, 16, dtype=torch.float16, device=DEV)
    assert _ext.lora_shrink(x, A, batch, None, None, 1).shape == (0, 8)
    y = torch.empty(0, 24, device=DEV, dtype=torch.float16)
    _ext.lora_expand(y, torch.empty(0, 8, device=DEV), randn(2, 24, 8, dtype=torch.float16, device=DEV),
                     batch, None, None)
    out = torch.empty(0, 24, device=DEV, dtype=torch.float16)
    C.cuda_fused_lora_gemm(x, randn(24, 16, dtype=torch.float16, device=DEV), None,
                           torch.empty(0, 8, device=DEV, dtype=torch.float16),
                           randn(24, 8, dtype=torch.float16, device=DEV), 1.0, 0.0, 0, False, out)
    torch.cuda.synchronize()


@gpu
def test_gpu_nan_propagates(C):
    ids, x, A, Bm, sc, rk, batch, n_sl = _multi_inputs(MULTI_CASES[3], torch.float16)
    x[5, 3] = float("nan")
    for path in (_ext.PATH_DECODE, _ext.PATH_PREFILL):
        xa = _ext.lora_shrink(x, A, batch, sc, rk, n_sl, path=path)
        live = rk.cpu()[ids[5]] > 0
        assert xa[5].isnan().any() == live
        assert not xa[torch.arange(x.shape[0]) != 5].isnan().any()


@gpu
def test_gpu_bad_input_raises_instead_of_faulting(C):
    h = dict(dtype=torch.float16, device=DEV)
    a, w, u, v = randn(8, 16, **h), randn(32, 16, **h), randn(8, 4, **h), randn(32, 4, **h)
    out = torch.empty(8, 32, **h)
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        C.cuda_fused_lora_gemm(a.float(), w.float(), None, u.float(), v.float(), 1.0, 0.0, 0, False,
                               out.float())
    with pytest.raises(RuntimeError, match="w must be"):
        C.cuda_fused_lora_gemm(a, w[:, :15], None, u, v, 1.0, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="unit stride"):
        C.cuda_fused_lora_gemm(a.t().contiguous().t(), w, None, u, v, 1.0, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        C.cuda_fused_lora_gemm(a, w.cpu(), None, u, v, 1.0, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="dropout_p"):
        C.cuda_fused_lora_gemm(a, w, None, u, v, 1.0, 1.0, 0, False, out)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, 1, -1, 0, 1, 1, 0, 0], device=DEV), 2)
    A = randn(2, 4, 16, **h)
    xa = torch.empty(8, 4, device=DEV)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        C.cuda_lora_shrink(randn(16, 8, **h).t(), A, None, None, *batch.tensors(), batch.num_active,
                           batch.max_seg_len, 1, 0.0, 0, 0, xa)
    with pytest.raises(RuntimeError, match="out must be"):
        C.cuda_lora_shrink(a, A, None, None, *batch.tensors(), batch.num_active, batch.max_seg_len, 1,
                           0.0, 0, 0, xa.half())
    with pytest.raises(RuntimeError, match="out_slices must sum"):
        C.cuda_lora_expand(torch.empty(8, 32, **h), xa, randn(2, 32, 4, **h), None, *batch.tensors(),
                           batch.num_active, batch.max_seg_len, [10, 10], 0)
    with pytest.raises(RuntimeError, match="ranks must have shape"):
        C.cuda_lora_shrink(a, A, None, torch.ones(3, dtype=torch.int32, device=DEV), *batch.tensors(),
                           batch.num_active, batch.max_seg_len, 1, 0.0, 0, 0, xa)
    torch.cuda.synchronize()  # nothing above reached a kernel


@gpu
@pytest.mark.slow
def test_gpu_offsets_past_2_31_elements(C):
    """x has > 2^31 elements: every row offset must be computed in int64."""
    M, K, N, r = 65_600, 32_768, 8, 8
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB")
    h = dict(dtype=torch.float16, device=DEV)
    a = torch.empty(M, K, **h).normal_(0, 1)
    w, u, v = randn(N, K, **h, scale=K ** -0.5), randn(M, r, **h), randn(N, r, **h)
    out = torch.empty(M, N, **h)
    C.cuda_fused_lora_gemm(a, w, None, u, v, 1.0, 0.0, 0, False, out)
    tail = slice(M - 3, M)
    assert rel_err(out[tail], _gemm_ref(a[tail], w, None, u[tail], v, 1.0, 0.0, 0, False)) <= 2e-3
    batch = LoRABatch.from_adapter_ids(torch.zeros(M, dtype=torch.int64, device=DEV), 1)
    A = randn(1, r, K, **h, scale=K ** -0.5)
    for path in (_ext.PATH_DECODE, _ext.PATH_PREFILL):
        xa = _ext.lora_shrink(a, A, batch, None, None, 1, path=path)
        want = _d(a[tail]) @ _d(A[0]).t()
        assert rel_err(xa[tail], want) <= 2e-3
