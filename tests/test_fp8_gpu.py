"""FP8 paths on a CUDA device (skipped without one): lora_linear_fp8 on the Triton backend in
bf16 / fp16 at decode, medium and large M against float64 of the dequantized weight (output and
every gradient), dropout agreement with the torch backend, FP8Linear on CUDA, and the
activation quantizer bit for bit against torch's float8_e4m3fn on the device."""

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
