"""The fp8 x fp8 path (``lora_linear_fp8(..., act_quant="e4m3_per_token")``, issue #16): the
GEMM core's ``fp8_act`` weight form run by the Triton interpreter (which executes tl.dot on
float8e4nv operands: Triton 3.8) against float64 of the *same* quantized numerics (tight:
fp32 1e-5, fp16 2e-3) and against float64 of the unquantized x (the fp8 tolerance, 5e-2), on
every schedule / memory path, odd shapes, M = 1 and ranks past one rank chunk; the op on both
backends (agreeing with each other), straight-through gradients, dropout, NaN propagation,
the spec list, validation of ``act_quant`` and its pass-through in the FP8 modules."""

import pytest
import torch
from torch import nn

from helpers import interpreting, rel_err
from lora_kernels.nn import FP8Linear, FP8LoRALinear, inject_lora_fp8, quantize_linears_fp8
from lora_kernels.ops import fp8, lora_linear_fp8

ACT = "e4m3_per_token"
SAME = {torch.float32: 1e-5, torch.float16: 2e-3}  # the same quantized numerics
# per-token e4m3 x: ≈ 2⁻⁴ relative error per element, ≈ 2 % on y (measured 1.8-2.1 % here)
FP8_TOL = 5e-2
needs_interp = pytest.mark.skipif(not interpreting(), reason="Triton kernels: interpreter")


def _case(dtype, m, n, k, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = fp8.quantize_fp8(torch.randn(n, k, generator=g) * k ** -0.5)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype)
    return w, rnd(m, k), rnd(n), rnd(r, k, sc=k ** -0.5), rnd(n, r, sc=0.5)


def _want(w, x, b, a, bb, s, quantized):
    """float64 of ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``; ``quantized``: x replaced by its per-token e4m3
    value (``code·row_scale``) in the base term only (the LoRA term keeps x)."""
    X = x.double()
    if quantized:
        codes, rs = fp8.quantize_rows_e4m3(x)
        xb = codes.double() * rs.double()[:, None]
    else:
        xb = X
    out = xb @ fp8.dequantize(w).double().t() + s * (X @ a.double().t()) @ bb.double().t()
    return out + b.double() if b is not None else out


# ---- the spec list ---------------------------------------------------------------------------
def test_fp8_act_specs():
    from lora_kernels.triton.gemm import spec as SP
    got = {s for s in SP.legal_specs() if s.weight == "fp8_act"}
    want = {SP.GemmSpec(weight="fp8_act", lowrank=lr, schedule=sc, store=st)
            for lr in ("none", "seeded")
            for sc, st in (("tiles", "pointer"), ("persistent", "pointer"),
                           ("persistent", "tma"))}
    assert got == want
    assert SP.GemmSpec(weight="fp8_act").constexprs()["WEIGHT"] == 4
    for bad in (dict(lowrank="in_loop"), dict(lowrank="panel", schedule="persistent"),
                dict(schedule="split_k"), dict(col_scale="vector"),
                dict(rows="gathered", lowrank="per_slot")):
        with pytest.raises(ValueError, match="fp8_act"):
            SP.GemmSpec(weight="fp8_act", **bad)
    with pytest.raises(ValueError, match="persistent schedule only"):
        SP.GemmSpec(weight="fp8_act", store="tma")


def test_fp8_act_config_pruning():
    from lora_kernels.triton import configs as C
    out = torch.empty(1, 1, dtype=torch.bfloat16)
    for M, kw in ((8192, dict(SCHEDULE=2, STORE=1)), (8192, dict(SCHEDULE=2, STORE=0)),
                  (8192, dict(SCHEDULE=0, STORE=0)), (100, dict(SCHEDULE=0)), (1, {})):
        kept = C.prune_fp8_act(C.GEMM_FP8_ACT, {"M": M, "out_ptr": out}, **kw)
        assert kept
        tma, pers = kw.get("STORE") == 1, kw.get("SCHEDULE") == 2
        for c in kept:
            assert C.fp8_stage_bytes(c, 2, tma) <= C.SMEM_BYTES
            assert C.acc_per_thread(c) <= (64 if pers and not tma else 128)
            bm = c.kwargs["BLOCK_M"]
            assert bm == 16 if M == 1 else (bm <= 64 if M == 100 else bm >= 64)
            assert tma or not c.kwargs["WARP_SPEC"]


# ---- the GEMM core in the interpreter --------------------------------------------------------
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,r,schedule,store", [
    (37, 45, 70, 5, None, None),          # tiles, ragged K (EVEN_K false), odd N
    (1, 33, 64, 3, None, None),           # decode M: tiles, never split-K
    (70, 50, 96, 13, "persistent", "pointer"),
    (70, 48, 96, 70, "persistent", "tma"),  # two rank chunks (BLOCK_R 64)
    (33, 64, 64, 0, "persistent", "tma"),   # no low-rank term
])
def test_gemm_core_fp8_act(dtype, m, n, k, r, schedule, store):
    from lora_kernels.triton.fused_gemm import fused_gemm
    from lora_kernels.triton.gemm.modes import LoraMode
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn)
    rs, cs = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    u = torch.randn(m, r, generator=g).to(dtype)
    lb = torch.randn(n, r, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    fused_gemm(a, w, out, bias=b, lora=LoraMode.SEEDED if r else LoraMode.NONE,
               u=u if r else None, lb=lb if r else None, scaling=0.5, a_scale=rs, w_scale=cs,
               schedule=schedule, store=store)
    want = (a.double() @ w.double().t()) * rs.double()[:, None] * cs.double()[None, :]
    want = want + 0.5 * u.double() @ lb.double().t() + b.double()
    assert rel_err(out, want) <= SAME[dtype]


# ---- the op ---------------------------------------------------------------------------------
def _backends():
    return ["torch"] + (["triton"] if interpreting() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,r", [(7, 19, 33, 5), (1, 45, 70, 13), (40, 21, 130, 70)])
def test_forward_and_straight_through_grads(backend, dtype, m, n, k, r):
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("CPU fp16 matmul: covered on the Triton backend")
    w, x, b, a, bb = _case(dtype, m, n, k, r)
    x, b, a, bb = (t.clone().requires_grad_(True) for t in (x, b, a, bb))
    y = lora_linear_fp8(x, w, b, a, bb, scaling=0.5, backend=backend, act_quant=ACT)
    assert y.dtype == dtype and y.shape == (m, n)
    same = _want(w, x.detach(), b.detach(), a.detach(), bb.detach(), 0.5, True)
    plain = _want(w, x.detach(), b.detach(), a.detach(), bb.detach(), 0.5, False)
    assert rel_err(y, same) <= SAME[dtype]
    # the quantization is real (not a bf16 GEMM in disguise) and within the fp8 tolerance
    assert 1e-3 < rel_err(y, plain) <= FP8_TOL
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    W = fp8.dequantize(w).double()
    d, X, A, B = dy.double(), x.double(), a.double(), bb.double()
    tol = SAME[dtype]  # the weight-only backward, untouched by the activation rounding
    assert rel_err(x.grad, d @ W + 0.5 * (d @ B) @ A) <= tol
    assert rel_err(b.grad, d.sum(0)) <= tol
    assert rel_err(a.grad, 0.5 * (d @ B).t() @ X) <= tol
    assert rel_err(bb.grad, 0.5 * d.t() @ (X @ A.t())) <= tol


@needs_interp
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backends_agree(p):
    """Triton (quantizer + fp8 GEMM) and torch (fp32 composition) give the same output: the
    codes are bit-identical, so only fp32 summation order differs; with dropout the xa of both
    carries the same mask (the Triton side then takes xa from the shrink kernel)."""
    w, x, b, a, bb = _case(torch.float32, 23, 37, 50, 6, seed=3)
    got = [lora_linear_fp8(x, w, b, a, bb, scaling=1.5, dropout_p=p, dropout_seed=11,
                           backend=be, act_quant=ACT) for be in ("triton", "torch")]
    assert rel_err(got[0], got[1].double()) <= 1e-5


def test_quantizer_matches_its_torch_definition():
    """fp8.quantize_rows_e4m3 (the torch backend's and the tests' oracle) is the Triton
    quantizer bit for bit (codes and scales; an all-zero row gets scale 1)."""
    from lora_kernels.triton.fp8_act_quant import quantize_rows_e4m3
    if not interpreting():
        pytest.skip("Triton kernels: interpreter")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(19, 77, generator=g) * 3
    x[4] = 0
    codes, scale, _ = quantize_rows_e4m3(x)
    want_codes, want_scale = fp8.quantize_rows_e4m3(x)
    assert torch.equal(codes, want_codes.view(torch.uint8)) and torch.equal(scale, want_scale)
    assert scale[4] == 1


@pytest.mark.parametrize("backend", _backends())
def test_nan_propagates(backend):
    w, x, b, a, bb = _case(torch.float32, 5, 9, 20, 3, seed=4)
    x[2, 7] = float("nan")
    y = lora_linear_fp8(x, w, b, a, bb, backend=backend, act_quant=ACT)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4]]).any()


@pytest.mark.parametrize("bad", ["e4m3", "E4M3_PER_TOKEN", "none", 1, True])
def test_bad_act_quant(bad):
    w, x, b, a, bb = _case(torch.float32, 3, 5, 8, 2)
    with pytest.raises(ValueError, match="act_quant"):
        lora_linear_fp8(x, w, b, a, bb, act_quant=bad)
    with pytest.raises(ValueError, match="act_quant"):
        FP8Linear(w, act_quant=bad)
    model = nn.Sequential(nn.Linear(8, 5))
    with pytest.raises(ValueError, match="act_quant"):
        quantize_linears_fp8(model, act_quant=bad)
    assert type(model[0]) is nn.Linear  # a rejected call changes nothing
    q = quantize_linears_fp8(nn.Sequential(nn.Linear(8, 5)))
    with pytest.raises(ValueError, match="act_quant"):
        inject_lora_fp8(q, ["0"], r=2, act_quant=bad)
    assert type(q[0]) is FP8Linear


def test_modules_pass_act_quant_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(5, 24)
    quantize_linears_fp8(model, act_quant=ACT, backend="torch")
    assert all(m.act_quant == ACT for m in model if isinstance(m, FP8Linear))
    inject_lora_fp8(model, ["0"], r=4)  # inherits the base's act_quant
    lora = model[0]
    assert isinstance(lora, FP8LoRALinear) and lora.act_quant == ACT
    nn.init.normal_(lora.lora_B.weight)
    b = lora.base_layer
    want = lora_linear_fp8(x, b.fp8_weight, b.bias, lora.lora_A.weight, lora.lora_B.weight,
                           scaling=lora.scaling, backend="torch", act_quant=ACT)
    assert torch.equal(lora(x), want)
    assert torch.equal(model[2](torch.relu(want)),
                       lora_linear_fp8(torch.relu(want), model[2].fp8_weight, model[2].bias,
                                       torch.empty(0, 16), torch.empty(8, 0), backend="torch",
                                       act_quant=ACT))
    own = FP8LoRALinear(FP8Linear.from_linear(nn.Linear(24, 16)), r=2, act_quant=None)
    assert own.act_quant is None and "act_quant" not in repr(own.base_layer)
    assert "act_quant=e4m3_per_token" in repr(b)


def test_compile_fullgraph():
    w, x, b, a, bb = _case(torch.float32, 6, 10, 12, 3, seed=6)
    x = x.requires_grad_(True)

    def f(x):
        return lora_linear_fp8(x, w, b, a, bb, scaling=2.0, backend="torch", act_quant=ACT)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, f(x))
    got.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
