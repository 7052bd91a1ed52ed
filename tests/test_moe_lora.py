"""MoE-LoRA op (ops/moe_lora.py) against the float64 oracle: torch backend and Triton (the
interpreter on CPU), odd shapes, an odd expert count with empty experts, top-2 with an expert
repeated within a token, per-token and per-pair x, gate weights; validation."""

from __future__ import annotations

import pytest
import torch

from helpers import SM90_FAKE_DRIVER, TOL, interpreting, rel_err, run_sm90_compile, triton_device
from lora_kernels import moe_lora_linear
from lora_kernels.ops.moe_lora import moe_plan
from lora_kernels.reference import moe_lora_linear_reference

E, T, TOPK, K, N, R = 5, 9, 2, 33, 19, 4
BACKENDS = ["torch"] + (["triton"] if triton_device() is not None else [])


def _case(seed=0, per_pair=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, TOPK), generator=g)
    ids[ids == 2] = 4      # expert 2 gets no token
    ids[0] = 3             # token 0 routes to expert 3 twice (repeated expert)
    x = torch.randn(*((T, TOPK, K) if per_pair else (T, K)), generator=g)
    w = torch.randn(E, N, K, generator=g) / K ** 0.5
    a = torch.randn(E, R, K, generator=g) / K ** 0.5
    b = torch.randn(E, N, R, generator=g)
    gw = torch.rand(T, TOPK, generator=g)
    dev = triton_device() or "cpu"
    return [t.to(dev, dtype) for t in (x, w, a, b, gw)] + [ids.to(dev)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_forward_and_grads_match_float64(backend, per_pair, gated):
    x, w, a, b, gw, ids = _case(per_pair=per_pair)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, gw)]
    xr, ar, br, gr = (t.detach().double().requires_grad_() for t in (x, a, b, gw))
    y = moe_lora_linear(leaves[0], w, ids, leaves[1], leaves[2], scaling=0.75,
                        topk_weights=leaves[3] if gated else None, backend=backend)
    yr = moe_lora_linear_reference(xr, w, ids, ar, br, 0.75, gr if gated else None)
    assert y.shape == yr.shape == ((T, N) if gated else (T, TOPK, N))
    assert rel_err(y, yr) <= TOL[torch.float32]
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * dy.to(y)).sum().backward()
    (yr * dy).sum().backward()
    for got, want, name in zip(leaves, (xr, ar, br, gr), ("x", "lora_a", "lora_b", "gate")):
        if name == "gate" and not gated:
            continue
        assert rel_err(got.grad, want.grad) <= 5 * TOL[torch.float32], name
    # The empty expert's factors get exactly zero gradient.
    assert not leaves[1].grad[2].any() and not leaves[2].grad[2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic_and_half_close(backend):
    # The Triton interpreter's bf16 is unreliable (numpy has none): fp16 on CPU, bf16 on GPUs.
    half = torch.bfloat16 if torch.cuda.is_available() and not interpreting() else torch.float16
    x, w, a, b, _, ids = _case(seed=3, dtype=half)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        moe_lora_linear(leaves[0], w, ids, leaves[1], leaves[2], scaling=2.0,
                        backend=backend).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)
    ref = moe_lora_linear_reference(x, w, ids, a, b, 2.0)
    assert rel_err(moe_lora_linear(x, w, ids, a, b, scaling=2.0, backend=backend), ref) \
        <= TOL[half]


def test_plan_sorts_pairs_by_expert_stably():
    ids = torch.tensor([[3, 0], [0, 3], [4, 4]])
    pairs, offs = moe_plan(ids, 6)
    assert pairs.tolist() == [1, 2, 0, 3, 4, 5]
    assert offs.tolist() == [0, 2, 2, 2, 4, 6, 6]


def test_no_tokens():
    x, w, a, b, _, ids = _case()
    y = moe_lora_linear(x[:0], w, ids[:0], a, b)
    assert y.shape == (0, TOPK, N)


@pytest.mark.parametrize("change, err, match", [
    (dict(ids=torch.tensor([[0, 5]] * T)), ValueError, r"topk_ids must lie in \[0, 5\)"),
    (dict(ids=torch.zeros(T, TOPK)), TypeError, "topk_ids must be an integer"),
    (dict(x=torch.randn(T, K + 1)), ValueError, "x must have shape"),
    (dict(a=torch.randn(E, R, K + 1)), ValueError, "lora_a must have shape"),
    (dict(b=torch.randn(E, N, R + 1)), ValueError, "lora_b must have shape"),
    (dict(gw=torch.rand(T, TOPK + 1)), ValueError, "topk_weights must have shape"),
    (dict(w=torch.randn(E, N, K, requires_grad=True)), ValueError, "expert_weight must be frozen"),
])
def test_bad_input(change, err, match):
    x, w, a, b, gw, ids = (t.cpu() for t in _case())
    args = dict(x=x, w=w, a=a, b=b, gw=gw, ids=ids, **{})
    args.update(change)
    with pytest.raises(err, match=match):
        moe_lora_linear(args["x"], args["w"], args["ids"], args["a"], args["b"],
                        topk_weights=args["gw"], backend="torch")


def test_torch_compile_fullgraph():
    x, w, a, b, gw, ids = (t.cpu() for t in _case())
    a.requires_grad_()

    def f(x, a, gw):
        return moe_lora_linear(x, w, ids, a, b, scaling=0.5, topk_weights=gw, backend="torch")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, a, gw)
    want = f(x, a, gw)
    assert rel_err(got, want) <= 1e-6
    got.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    torch._dynamo.reset()


_SM90_SCRIPT = SM90_FAKE_DRIVER + r'''
from triton.runtime.jit import JITFunction
from sass_report import _ptxas_usage
_run = JITFunction.run
compiled = []
def _compile_only(self, *args, grid, warmup, **kw):
    kernel = _run(self, *args, grid=grid, warmup=True, **kw)
    regs, spills = _ptxas_usage(kernel)
    compiled.append((self.fn.__name__, regs, spills, "mma.sync" in kernel.asm["ptx"] or
                     "wgmma" in kernel.asm["ptx"]))
JITFunction.run = _compile_only

from lora_kernels.ops.moe_lora import moe_plan
from lora_kernels.triton import moe_lora as M
E, T, k, K, N, R = 64, 512, 8, 4096, 3072, 16   # the #18 benchmark layer's gate_up
ids = torch.randint(0, E, (T, k))
sp, offs = moe_plan(ids, E)
bf = torch.bfloat16
x, W = torch.empty(T, K, dtype=bf), torch.empty(E, N, K, dtype=bf)
A, B = torch.empty(E, R, K, dtype=bf), torch.empty(E, N, R, dtype=bf)
y, u = M.moe_lora_fwd(x, W, A, B, sp, offs, k, 1.0)
M.moe_lora_bwd(torch.empty(T * k, N, dtype=bf), x, W, A, B, u, sp, offs, k, 1.0,
               (True, True, True))
for name, regs, spills, mma in compiled:
    assert spills == 0, (name, regs, spills)
    assert mma, name
print("compiled", len(compiled), "kernels", compiled)
'''


def test_moe_kernels_compile_for_sm90_without_spills():
    out = run_sm90_compile(_SM90_SCRIPT)
    assert "moe_gemm_kernel" in out and "moe_rank_grad_kernel" in out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_pair", [False, True])
def test_multi_adapter_forward_matches_float64(backend, per_pair):
    from lora_kernels import moe_multi_lora_linear
    from lora_kernels.reference import moe_multi_lora_linear_reference
    x, w, _, _, gw, ids = _case(seed=4, per_pair=per_pair)
    S = 3
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(S, E, R, K, generator=g) / K ** 0.5).to(x.device)
    b = torch.randn(S, E, N, R, generator=g).to(x.device)
    slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 2, -1]).to(x.device)  # -1: base only
    sc = torch.tensor([0.5, 1.0, 2.0])
    y = moe_multi_lora_linear(x, w, ids, a, b, slots, scalings=sc, topk_weights=gw,
                              backend=backend)
    want = moe_multi_lora_linear_reference(x, w, ids, a, b, slots, sc, gw)
    assert rel_err(y, want) <= TOL[torch.float32]
    # A token on slot -1 is exactly the base experts.
    base = moe_lora_linear(x, w, ids, a[0], b[0] * 0, backend=backend)
    y_pairs = moe_multi_lora_linear(x, w, ids, a, b, slots, scalings=sc, backend=backend)
    assert rel_err(y_pairs[slots == -1], base[slots == -1]) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="adapter_ids must lie in"):
        moe_multi_lora_linear(x, w, ids, a, b, slots + 5, scalings=sc, backend=backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (GPU or interpreter)")
@pytest.mark.parametrize("mode", ["in_loop", "seeded"])
def test_triton_low_rank_modes(monkeypatch, mode):
    """Both low-rank modes of the Triton kernels (in-loop u, or the seeded accumulator after
    the shrink-as-grouped-GEMM), forward and every gradient."""
    from lora_kernels.triton import moe_lora as M
    monkeypatch.setattr(M, "FORCE_MODE", mode)
    x, w, a, b, gw, ids = _case(seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, a, b))
    y = moe_lora_linear(leaves[0], w, ids, leaves[1], leaves[2], scaling=1.5, topk_weights=gw,
                        backend="triton")
    yr = moe_lora_linear_reference(xr, w, ids, ar, br, 1.5, gw)
    assert rel_err(y, yr) <= TOL[torch.float32]
    y.square().sum().backward()
    yr.square().sum().backward()
    for got, want in zip(leaves, (xr, ar, br)):
        assert rel_err(got.grad, want.grad) <= 5 * TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["in_loop", "seeded"])
def test_gpu_moe_bf16_ragged_segments(monkeypatch, mode):
    """GPU configs (BLOCK 16-64 × 128 × 64, GROUP_M 16): 16 experts with ragged segments (one
    empty), K and N not multiples of the blocks, bf16, forward and every gradient."""
    from lora_kernels.triton import moe_lora as M
    monkeypatch.setattr(M, "FORCE_MODE", mode)
    g = torch.Generator().manual_seed(11)
    E_, T_, k_, K_, N_, R_ = 16, 300, 4, 520, 392, 16
    ids = torch.randint(0, E_, (T_, k_), generator=g)
    ids[ids == 7] = 0
    x = torch.randn(T_, K_, generator=g)
    w = torch.randn(E_, N_, K_, generator=g) / K_ ** 0.5
    a = torch.randn(E_, R_, K_, generator=g) / K_ ** 0.5
    b = torch.randn(E_, N_, R_, generator=g) * 0.3
    gw = torch.rand(T_, k_, generator=g)
    dev = [t.cuda().to(torch.bfloat16) for t in (x, w, a, b, gw)]
    leaves = [dev[0].requires_grad_(), dev[2].requires_grad_(), dev[3].requires_grad_()]
    y = moe_lora_linear(leaves[0], dev[1], ids.cuda(), leaves[1], leaves[2], scaling=2.0,
                        topk_weights=dev[4], backend="triton")
    xr, ar, br = (t.detach().cpu().double().requires_grad_() for t in leaves)
    yr = moe_lora_linear_reference(xr, dev[1].cpu(), ids, ar, br, 2.0, dev[4].cpu())
    assert rel_err(y, yr) <= TOL[torch.bfloat16]
    dy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    (y.float() * dy.cuda().float()).sum().backward()
    (yr * dy).sum().backward()
    for got, want in zip(leaves, (xr, ar, br)):
        assert rel_err(got.grad, want.grad) <= 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_loop", "seeded"])
def test_rank_zero_is_the_base_experts(monkeypatch, backend, mode):
    """r = 0 (what patch_peft_model passes for an untargeted projection)."""
    from lora_kernels.triton import moe_lora as M
    monkeypatch.setattr(M, "FORCE_MODE", mode)
    x, w, _, _, _, ids = _case(seed=8)
    a, b = w.new_zeros(E, 0, K), w.new_zeros(E, N, 0)
    xl = x.clone().requires_grad_()
    y = moe_lora_linear(xl, w, ids, a, b, backend=backend)
    xr = x.double().requires_grad_()
    yr = moe_lora_linear_reference(xr, w, ids, a, b, 1.0)
    assert rel_err(y, yr) <= TOL[torch.float32]
    y.sum().backward()
    yr.sum().backward()
    assert rel_err(xl.grad, xr.grad) <= TOL[torch.float32]
