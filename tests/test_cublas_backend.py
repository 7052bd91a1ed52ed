"""The cuBLAS composition floor (``lora_kernels/ops/cublas_backend.py``): correct against the
float64 reference, selectable by the dispatch table (and only there), and chosen by
bench/dispatch_table.py only when validated and faster.

CPU tests run the composition on CPU tensors (it is pure torch); the GPU tests are the
validation bench/dispatch_table.py requires (``FLOOR_TESTS``) before the table may name it.
"""

import pytest
import torch

from helpers import load_bench_tool
import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops import backend, cublas_backend

def _rel(out, want):
    return float((out.double() - want).norm() / want.norm())


def _inputs(M, K, N, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)
    return (mk(M, K), mk(N, K, sc=K ** -0.5), mk(N), mk(r, K, sc=K ** -0.5), mk(N, r, sc=r ** -0.5),
            mk(M, N))


@pytest.mark.parametrize("M,K,N,r,p", [(7, 33, 19, 5, 0.0), (33, 19, 41, 13, 0.3), (1, 17, 9, 1, 0.5)])
def test_cublas_composition_matches_float64_reference(M, K, N, r, p):
    x, w, b, a, bb, dy = _inputs(M, K, N, r, torch.float64, seed=M + K)
    s, seed = 1.7, 4242
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    want = ref.lora_linear(leaves[0], w, b, leaves[1], leaves[2], s, p, seed)
    want_grads = torch.autograd.grad(want, leaves, dy)
    f32 = lambda t: t.to(torch.float32)
    y, xa = cublas_backend.lora_linear_fwd(f32(x), f32(w), f32(b), f32(a), f32(bb), s, p, seed)
    assert y.dtype == torch.float32 and _rel(y, want.detach()) <= 1e-5
    keep = ref.dropout_keep_mask(seed, M, K, p)
    assert _rel(xa, ref.apply_keep(x, keep if p > 0 else None, p) @ a.t()) <= 1e-5
    dx, dw, db, da, dbb = cublas_backend.lora_linear_bwd(f32(dy), f32(x), f32(w), f32(a), f32(bb),
                                                         xa, s, p, seed, (True, True, True, True, True))
    for got, exp in zip((dx, da, dbb), want_grads):
        assert _rel(got, exp) <= 1e-5
    assert _rel(dw, dy.t() @ x) <= 1e-5 and _rel(db, dy.sum(0)) <= 1e-5


def test_cublas_mask_is_the_reference_mask_on_cpu():
    got = cublas_backend.dropout_keep_mask(11, 300, 301, 0.2, "cpu")  # > MIN_ELEMENTS: compiled path
    assert torch.equal(got, ref.dropout_keep_mask(11, 300, 301, 0.2))


def test_dispatch_table_can_select_cublas_and_only_for_lora_linear():
    table = {"lora_linear": {"large": "cublas"}, "multi_lora_linear": {"large": "cublas"}}
    with backend.dispatch_override(table):
        assert backend._auto_cuda("lora_linear", "large") == "cublas"
        assert backend._auto_cuda("lora_linear", "decode") != "cublas"       # not in the table
        assert backend._auto_cuda("multi_lora_linear", "large") != "cublas"  # not its op
    assert not backend._TABLE_OVERRIDES  # the override ends with the block
    assert backend.kernel("cublas", "lora_linear_fwd") is cublas_backend.lora_linear_fwd
    assert backend.kernel("cublas", "lora_linear_bwd") is cublas_backend.lora_linear_bwd
    assert backend.kernel("cublas", "multi_lora_fwd") is backend.kernel("torch", "multi_lora_fwd")


def test_cublas_is_not_a_user_backend():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.lora_linear(x, torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), backend="cublas")


def test_dispatch_tool_picks_the_floor_only_when_validated_and_faster(tmp_path):
    tool = load_bench_tool("dispatch_table")
    rows = [tool.timing_row("lora_linear", 8192, {"triton": 1.30, "cublas": 1.10, "cuda": 1.20}),
            tool.timing_row("lora_linear", 4096, {"triton": 1.00, "cublas": 0.80, "cuda": None}),
            tool.timing_row("lora_linear", 1, {"triton": 0.020, "cublas": 0.0199}),   # within margin
            tool.timing_row("lora_linear", 128, {"triton": 0.30, "cublas": 0.20, "cuda": 0.10}),
            tool.timing_row("multi_lora_linear", 8192, {"triton": 2.0, "cublas": 1.0})]
    assert tool.build_table(rows, set()) == {"lora_linear": {"decode": "triton", "large": "triton",
                                                             "medium": "triton"},
                                             "multi_lora_linear": {"large": "triton"}}
    table = tool.build_table(rows, {"lora_linear"}, {"lora_linear", "multi_lora_linear"})
    # large: cuda untimed on one shape, so only the floor is eligible, and it is faster
    assert table["lora_linear"] == {"large": "cublas", "decode": "triton", "medium": "cuda"}
    assert table["multi_lora_linear"] == {"large": "triton"}  # the floor serves lora_linear only
    junit = tmp_path / "gpu.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_cublas_backend" name="test_gpu_cublas_lora_linear[a]"/>'
        '<testcase classname="tests.test_cublas_backend" name="test_gpu_cublas_selected_by_auto"/>'
        '</testsuite></testsuites>')
    assert tool.floor_validated_ops(junit) == {"lora_linear"}
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_cublas_backend" name="test_gpu_cublas_lora_linear[a]"/>'
        '<testcase classname="tests.test_cublas_backend" name="test_gpu_cublas_selected_by_auto">'
        '<skipped/></testcase></testsuite></testsuites>')
    assert tool.floor_validated_ops(junit) == set()  # skipped is not validated


# ---- GPU: the validation the dispatch tool requires ------------------------------------------
gpu = pytest.mark.gpu
FLOOR = {"lora_linear": {c: "cublas" for c in ("decode", "medium", "large")}}


@gpu
@pytest.mark.parametrize("M,K,N,r,p", [(1, 4096, 1100, 16, 0.0), (777, 1000, 1100, 16, 0.0),
                                       (513, 1000, 1100, 16, 0.1), (300, 333, 257, 13, 0.05)])
def test_gpu_cublas_lora_linear(M, K, N, r, p):
    x, w, b, a, bb, dy = _inputs(M, K, N, r, torch.float64, seed=M)
    s, seed = 2.0, 99
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    want = ref.lora_linear(leaves[0], w, b, leaves[1], leaves[2], s, p, seed)
    want_grads = torch.autograd.grad(want, leaves, dy)
    bf = lambda t: t.to("cuda", torch.bfloat16)
    got_leaves = [bf(t).requires_grad_(True) for t in (x, a, bb)]
    with backend.dispatch_override(FLOOR):
        y = lk.lora_linear(got_leaves[0], bf(w), bf(b), got_leaves[1], got_leaves[2], scaling=s,
                           dropout_p=p, dropout_seed=seed)
    assert _rel(y.cpu(), want.detach()) <= 1e-2
    for got, exp in zip(torch.autograd.grad(y, got_leaves, bf(dy)), want_grads):
        assert torch.isfinite(got).all() and _rel(got.cpu(), exp) <= 1e-2
    if p > 0:  # the mask the floor drew on the GPU is the reference's, bit for bit
        assert torch.equal(cublas_backend.dropout_keep_mask(seed, M, K, p, "cuda").cpu(),
                           ref.dropout_keep_mask(seed, M, K, p))


@gpu
def test_gpu_cublas_selected_by_auto(monkeypatch):
    calls = []
    real = cublas_backend.lora_linear_fwd
    monkeypatch.setattr(cublas_backend, "lora_linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, a, bb, _ = _inputs(64, 128, 96, 8, torch.float64)
    bf = lambda t: t.to("cuda", torch.bfloat16)
    with backend.dispatch_override(FLOOR):
        y = lk.lora_linear(bf(x), bf(w), bf(b), bf(a), bf(bb), scaling=0.5)
    assert calls == [1]
    assert _rel(y.cpu(), ref.lora_linear(x, w, b, a, bb, 0.5)) <= 1e-2
