"""FP8 paths on a CUDA device (skipped without one): lora_linear_fp8 on the Triton backend in
bf16 / fp16 at decode, medium and large M against float64 of the dequantized weight (output and
every gradient), dropout agreement with the torch backend, FP8Linear on CUDA, the
activation quantizer bit for bit against torch's float8_e4m3fn on the device, and the fp8 x fp8
path (act_quant="e4m3_per_token": bf16 / fp16, M = 1 .. 8192, persistent odd tile counts)."""

import pytest
import torch

from helpers import rel_err
from lora_kernels.nn import FP8Linear
from lora_kernels.ops import fp8, lora_linear_fp8

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _case(m, n, k, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = fp8.quantize_fp8(torch.randn(n, k, generator=g) * k ** -0.5)
    w = fp8.FP8Weight(codes=w.codes.to(DEV), scale=w.scale.to(DEV))
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(DEV, dtype)
    return w, mk(m, k), mk(n), mk(r, k, sc=k ** -0.5), mk(n, r, sc=r ** -0.5), mk(m, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 300, 2048])
def test_triton_forward_and_grads(dtype, m):
    n, k, r = 1536, 1024, 16
    w, x, b, a, bb, dy = _case(m, n, k, r, dtype)
    x, b, a, bb = (t.clone().requires_grad_(True) for t in (x, b, a, bb))
    y = lora_linear_fp8(x, w, b, a, bb, scaling=2.0, backend="triton")
    y.backward(dy)
    W = fp8.dequantize(w, dtype).double()
    X, A, B, D = x.double(), a.double(), bb.double(), dy.double()
    assert rel_err(y, X @ W.t() + b.double() + 2.0 * (X @ A.t()) @ B.t()) <= TOL[dtype]
    assert rel_err(x.grad, D @ W + 2.0 * (D @ B) @ A) <= TOL[dtype]
    assert rel_err(a.grad, 2.0 * (D @ B).t() @ X) <= TOL[dtype]
    assert rel_err(bb.grad, 2.0 * D.t() @ (X @ A.t())) <= TOL[dtype]
    assert rel_err(b.grad, D.sum(0)) <= TOL[dtype]


def test_dropout_same_mask_as_torch_backend():
    w, x, b, a, bb, dy = _case(64, 256, 192, 8, torch.float16, seed=3)
    got = {}
    for be in ("triton", "torch"):
        xs = x.clone().requires_grad_(True)
        y = lora_linear_fp8(xs, w, b, a, bb, scaling=1.5, dropout_p=0.3, dropout_seed=5,
                            backend=be)
        y.backward(dy)
        got[be] = (y, xs.grad)
    for t, ref in zip(got["triton"], got["torch"]):
        assert rel_err(t, ref.double()) <= 2e-3


def test_fp8_linear_on_cuda():
    lin = torch.nn.Linear(512, 384).to(DEV, torch.bfloat16)
    q = FP8Linear.from_linear(lin)
    x = torch.randn(33, 512, device=DEV, dtype=torch.bfloat16)
    want = x.double() @ fp8.dequantize(q.fp8_weight, torch.bfloat16).double().t() + lin.bias.double()
    assert rel_err(q(x), want) <= 1e-2


def test_activation_quantizer_bit_exact_on_device():
    from lora_kernels.triton.fp8_act_quant import quantize_rows_e4m3
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 4096, generator=g) * 3).to(DEV, torch.bfloat16)
    a = (torch.randn(16, 4096, generator=g) * 0.02).to(DEV, torch.bfloat16)
    codes, scale, xa = quantize_rows_e4m3(x, a)
    xf = x.float()
    want_scale = xf.abs().amax(1) / 448.0
    assert torch.equal(scale, want_scale)
    want = (xf / want_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes, want)
    assert rel_err(xa, x.double() @ a.double().t()) <= 1e-2


# ---- the fp8 x fp8 path (act_quant="e4m3_per_token") ------------------------------------------
def _same_numerics(w, x, b, a, bb, s):
    """float64 of the base term on per-token e4m3 x (fp8.quantize_rows_e4m3: the quantizer's
    codes bit for bit) plus the LoRA term on the unquantized x."""
    codes, rs = fp8.quantize_rows_e4m3(x)
    xq = codes.double() * rs.double()[:, None]
    X = x.double()
    return (xq @ fp8.dequantize(w).double().t() + b.double()
            + s * (X @ a.double().t()) @ bb.double().t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 300, 2048, 8192])
def test_fp8_act_forward_and_grads(dtype, m):
    """Decode (tiles, mma.sync e4m3), medium (64-row tiles) and large M (persistent TMA,
    wgmma e4m3): the output against the same quantized numerics (only the output rounding and
    wgmma's fp8 accumulation differ) and against the unquantized x (fp8 tolerance); the
    gradients are the weight-only path's."""
    n, k, r = 1536, 1024, 16
    w, x, b, a, bb, dy = _case(m, n, k, r, dtype)
    x, b, a, bb = (t.clone().requires_grad_(True) for t in (x, b, a, bb))
    y = lora_linear_fp8(x, w, b, a, bb, scaling=2.0, backend="triton",
                        act_quant="e4m3_per_token")
    X, A, B, D = x.double(), a.double(), bb.double(), dy.double()
    W = fp8.dequantize(w, dtype).double()
    assert rel_err(y, _same_numerics(w, x.detach(), b.detach(), a, bb, 2.0)) <= TOL[dtype]
    assert rel_err(y, X @ W.t() + b.double() + 2.0 * (X @ A.t()) @ B.t()) <= 5e-2
    y.backward(dy)
    assert rel_err(x.grad, D @ W + 2.0 * (D @ B) @ A) <= TOL[dtype]
    assert rel_err(a.grad, 2.0 * (D @ B).t() @ X) <= TOL[dtype]
    assert rel_err(bb.grad, 2.0 * D.t() @ (X @ A.t())) <= TOL[dtype]


@pytest.mark.parametrize("store", ["pointer", "tma"])
@pytest.mark.parametrize("m,n,k", [(1000, 1000, 1024), (8192, 4096, 4096), (333, 4104, 528)])
def test_fp8_act_persistent_odd_tile_counts(store, m, n, k):
    """The persistent fp8 x fp8 GEMM when tiles do not divide the grid evenly (and ragged
    edges), both memory paths, against float64 of the codes and scales."""
    from lora_kernels.triton.fused_gemm import fused_gemm
    from lora_kernels.triton.gemm.modes import LoraMode
    g = torch.Generator().manual_seed(m)
    f8 = torch.float8_e4m3fn
    a = torch.randn(m, k, generator=g).to(DEV, f8)
    wt = (torch.randn(n, k, generator=g) * 4).to(DEV, f8)
    rs = (torch.rand(m, generator=g) + 0.1).to(DEV)
    cs = (torch.rand(n, generator=g) * 0.01 + 0.001).to(DEV)
    u = torch.randn(m, 16, generator=g).to(DEV, torch.bfloat16)
    lb = torch.randn(n, 16, generator=g).to(DEV, torch.bfloat16)
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    fused_gemm(a, wt, out, lora=LoraMode.SEEDED, u=u, lb=lb, scaling=0.5, a_scale=rs,
               w_scale=cs, schedule="persistent", store=store)
    want = (a.double() @ wt.double().t()) * rs.double()[:, None] * cs.double()[None, :]
    want = want + 0.5 * u.double() @ lb.double().t()
    assert rel_err(out, want) <= 1e-2


def test_fp8_act_backends_agree_on_device():
    w, x, b, a, bb, _ = _case(300, 512, 384, 8, torch.bfloat16, seed=2)
    got = [lora_linear_fp8(x, w, b, a, bb, scaling=1.5, backend=be,
                           act_quant="e4m3_per_token") for be in ("triton", "torch")]
    assert rel_err(got[0], got[1].double()) <= 1e-2


# ---- the slab route (nf4_slabs.py) for weight-only FP8 at M ≥ min_rows() ----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hw_cvt", [None, False])
def test_fp8_slab_decode_on_gpu(dtype, hw_cvt):
    """Every one of the 256 codes (NaN, subnormals, ±0), row and column slabs, masked and
    whole tiles, through the hardware conversion (None: hw_cvt_ok's choice) and the integer
    one: bit for bit ``dequantize_rows`` in the compute dtype (NaN where NaN)."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton.quant_lora import packed
    n, k = 300, 1100
    g = torch.Generator().manual_seed(11)
    codes = (torch.randperm(n * k, generator=g) % 256).to(torch.uint8).reshape(n, k)
    w = fp8.FP8Weight(codes=codes.to(DEV), scale=(torch.rand(n, generator=g) * 3 + 1e-3).to(DEV))
    W = fp8.dequantize_rows(w, 0, n, dtype)
    ws = torch.empty(n, k, dtype=dtype, device=DEV)
    for n0, n1, c0, c1 in ((0, n, 0, k), (0, 128, 0, 1024), (7, 200, 64, 1088), (0, n, 512, k)):
        got = S.decode_slab(packed(w), ws, n0, n1, c0, c1, hw_cvt=hw_cvt)[: n1 - n0, : c1 - c0]
        want = W[n0:n1, c0:c1]
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("m,n,k,p", [(4096, 4096, 4096, 0.0), (1100, 1000, 1096, 0.1),
                                     (2048, 4104, 528, 0.0)])
def test_fp8_slab_route_forward_and_grads(m, n, k, p, monkeypatch):
    """bf16 at M ≥ min_rows() (the default route: slabs, checked by the spy) against float64
    of the dequantized W, output and every gradient, dropout in training; the in-mainloop
    route (route="mainloop") agrees with it to bf16 rounding."""
    from helpers import DecodeSpy
    from lora_kernels import reference
    from lora_kernels.triton import quant_lora as T
    dtype = torch.bfloat16
    w, x, b, a, bb, dy = _case(m, n, k, 16, dtype, seed=m)
    spy = DecodeSpy(monkeypatch, n)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, a, bb)]
    y = lora_linear_fp8(leaves[0], w, leaves[1], leaves[2], leaves[3], scaling=2.0,
                        dropout_p=p, dropout_seed=5, backend="triton")
    y.backward(dy)
    assert spy.fwd >= 2 and spy.dx >= 2, "both passes took the slab route"
    assert spy.biggest < n * k
    d = lambda t: t.detach().double().requires_grad_(True)
    x64, b64, a64, bb64 = d(x), d(b), d(a), d(bb)
    want = reference.lora_linear(x64, fp8.dequantize(w, dtype).double(), b64, a64, bb64, 2.0,
                                 p, 5)
    want.backward(dy.double())
    assert rel_err(y, want) <= TOL[dtype]
    for t, t64 in zip(leaves, (x64, b64, a64, bb64)):
        assert rel_err(t.grad, t64.grad) <= TOL[dtype]
    y_main, _ = T.quant_lora_fwd(x, w, b, a, bb, 2.0, 0.0, 0, route="mainloop")
    y_slab, _ = T.quant_lora_fwd(x, w, b, a, bb, 2.0, 0.0, 0, route="slabs")
    assert rel_err(y_slab, y_main.double()) <= TOL[dtype]


@pytest.mark.parametrize("m", [1, 16, 300])
def test_in_loop_decode_hw_and_integer_give_the_same_bits(m, monkeypatch):
    """The K loop's e4m3 decode (gemm/formats.fp8_tile): the sm_89+ hardware conversion
    (QFLAG_HW_CVT, what this device launches) and the integer one (pre-sm_89) make the same
    fp32 products code·scale, so the forward and dX are bit-identical; K ragged (1000)."""
    from lora_kernels.triton import fused_gemm
    from lora_kernels.triton import quant_lora as Q
    w, x, b, a, bb, dy = _case(m, 520, 1000, 16, torch.bfloat16, seed=m)
    outs = []
    for hw in (True, False):
        monkeypatch.setattr(fused_gemm, "hw_cvt_ok", lambda t, hw=hw: hw)
        y, xa = Q.quant_lora_fwd(x, w, b, a, bb, 2.0, 0.0, 0, route="mainloop")
        dx = Q.quant_lora_bwd(dy, x, w, a, bb, xa, 2.0, 0.0, 0, (True, False, False, False),
                              route="mainloop")[0]
        outs.append((y, dx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
