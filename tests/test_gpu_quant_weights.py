"""GPU checks of the quantized-weight paths (skipped without an NVIDIA GPU): NF4 from
bitsandbytes' CUDA storage through the Triton GEMM core (forward, dX, decode M = 1) against
float64 of ``dequantize_4bit``, the patched PEFT QLoRA layer (PEFT's lora.bnb.Linear4bit on
CUDA) against PEFT, and the FP8 e4m3 path on real float8 tensors."""

import pytest
import torch

from helpers import TOL_GPU_FP32, rel_err
from lora_kernels import reference

pytestmark = pytest.mark.gpu

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

# bf16: the product is rounded once to bf16 per K block of the fp32 accumulator (1e-2 is the
# project's bf16 contract); fp16 2e-3; fp32 through tf32 tensor cores.
TOLS = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: TOL_GPU_FP32}


def _cuda_nf4(n, k, dtype, nested):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=nested).to(dtype).to("cuda")
    return layer


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,p", [(1, 4096, 4096, 0.0), (16, 4096, 4096, 0.0),
                                     (300, 1003, 1000, 0.1), (2048, 1024, 1024, 0.1),
                                     (33, 257, 1001, 0.1)])
def test_gpu_nf4_op_matches_dequantized_float64(nested, dtype, M, N, K, p):
    from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4
    layer = _cuda_nf4(N, K, dtype, nested)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    g = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device="cuda") * sc).to(dtype)
    x, b, a, bb, dy = rnd(M, K), rnd(N), rnd(16, K, sc=0.05), rnd(N, 16, sc=0.05), rnd(M, N)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, a, bb)]
    y = lora_linear_nf4(leaves[0], layer.weight, leaves[1], leaves[2], leaves[3], scaling=2.0,
                        dropout_p=p, backend="triton", dropout_seed=7)
    y.backward(dy)
    d = lambda t: t.detach().double().cpu().requires_grad_(True)
    x64, b64, a64, bb64 = d(x), d(b), d(a), d(bb)
    want = reference.lora_linear(x64, W.cpu(), b64, a64, bb64, 2.0, p, 7)
    want.backward(dy.double().cpu())
    tol = TOLS[dtype]
    assert rel_err(y, want) <= tol
    for t, w64 in zip(leaves, (x64, b64, a64, bb64)):
        assert rel_err(t.grad, w64.grad) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_patched_peft_qlora_layer_matches_peft(dtype):
    peft = pytest.importorskip("peft")
    from lora_kernels import patch_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = bnb.nn.Linear4bit(512, 768, compute_dtype=dtype, quant_type="nf4",
                                       compress_statistics=True)

        def forward(self, x):
            return self.q(x)
    torch.manual_seed(0)
    model = Tiny().to(dtype).to("cuda")
    model.is_loaded_in_4bit = True  # PEFT builds its lora.bnb.Linear4bit
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q"],
                                                       init_lora_weights=False))
    x = torch.randn(4, 33, 512, device="cuda", dtype=dtype)

    def step():
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.float().square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}
    want_y, want_g = step()
    with patch_peft_model(model, backend="triton") as handle:
        assert handle.patched and not handle.skipped
        y, g = step()
    assert rel_err(y, want_y) <= 2e-2
    for n in want_g:
        assert rel_err(g[n], want_g[n]) <= 2e-2, n


@pytest.mark.parametrize("M", [1, 16, 2048])
def test_gpu_fp8_forward_and_dx(M):
    from lora_kernels.ops import fp8
    from lora_kernels.triton.quant_lora import quant_lora_bwd, quant_lora_fwd
    N, K = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    w = fp8.quantize_fp8(torch.randn(N, K, generator=g, device="cuda") * 0.02)
    assert w.codes.dtype == torch.float8_e4m3fn
    Wr = fp8.dequantize(w, torch.bfloat16).double()
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device="cuda") * sc).bfloat16()
    x, b, a, bb, dy = rnd(M, K), rnd(N), rnd(16, K, sc=0.05), rnd(N, 16, sc=0.05), rnd(M, N)
    y, xa = quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    low = 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
    want = x.double() @ Wr.t() + b.double() + low
    assert rel_err(y, want) <= 1e-2
    dx, _, _, _ = quant_lora_bwd(dy, x, w, a, bb, xa, 0.5, 0.0, 0, (True, False, False, False))
    want_dx = dy.double() @ Wr + 0.5 * (dy.double() @ bb.double()) @ a.double()
    assert rel_err(dx, want_dx) <= 1e-2


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,p", [(4096, 4096, 4096, 0.0), (2048, 4096, 4096, 0.1),
                                     (1100, 1000, 4032, 0.1), (1536, 4100, 1088, 0.0)])
def test_gpu_nf4_slab_route_matches_dequantized_float64(nested, dtype, M, N, K, p):
    """The slab route (lora_kernels/triton/nf4_slabs.py: W decoded once per bounded slab, the
    dense persistent TMA GEMM per slab) and the in-mainloop route, both forced, against
    float64 of ``dequantize_4bit``: y, dX (mask from the packed bits per column slab), dA,
    dB; the 4096-size shapes cut W into 16 MiB slabs (N = 4100: a ragged third one), the
    default threshold sends M ≥ 1024 to the slabs on its own, and the workspace stays below
    half of W."""
    from lora_kernels.triton import nf4_slabs
    from lora_kernels.triton.quant_lora import packed, quant_lora_bwd, quant_lora_fwd
    from lora_kernels.ops import nf4
    layer = _cuda_nf4(N, K, dtype, nested)
    w = nf4.from_params4bit(layer.weight)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    assert nf4_slabs.use_slabs(M, packed(w))
    g = torch.Generator(device="cuda").manual_seed(2)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device="cuda") * sc).to(dtype)
    x, b, a, bb, dy = rnd(M, K), rnd(N), rnd(16, K, sc=0.05), rnd(N, 16, sc=0.05), rnd(M, N)
    xd = reference.apply_dropout(x.double(), 7, p)
    xa64 = xd @ a.double().t()
    want_y = x.double() @ W.t() + b.double() + 2.0 * xa64 @ bb.double().t()
    dyb = dy.double() @ bb.double()
    want_dx = dy.double() @ W + reference.apply_dropout(2.0 * dyb @ a.double(), 7, p)
    want_da = 2.0 * dyb.t() @ xd
    tol = TOLS[dtype]
    for route in ("slabs", "mainloop"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y, xa = quant_lora_fwd(x, w, b, a, bb, 2.0, p, 7, route=route)
        assert rel_err(y, want_y) <= tol, route
        assert rel_err(xa, xa64) <= tol, route
        dx, _, da, dbb = quant_lora_bwd(dy, x, w, a, bb, xa, 2.0, p, 7, (True, False, True, True),
                                        route=route)
        assert rel_err(dx, want_dx) <= tol, route
        assert rel_err(da, want_da) <= tol, route
        assert rel_err(dbb, 2.0 * dy.double().t() @ xa.double()) <= tol, route
        if route == "slabs":  # outputs + one workspace < half of W in the compute dtype
            extra = torch.cuda.max_memory_allocated() - base
            outputs = (M * N + 2 * M * K + M * 16) * x.element_size()
            assert extra < outputs + N * K * x.element_size() // 2 + (64 << 20)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 16])
def test_gpu_nf4_decode_gemv(nested, M):
    """The decode rows over NF4 (bf16, K = N = 4096): M ≤ 2 (plain) / 4 (nested) runs
    triton/nf4_gemv.py, larger M the GEMM core's 16-row tile; both against float64 of
    dequantize_4bit, equal bits on a repeat (the split-K tickets are reset), and under a CUDA
    graph."""
    from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4
    from lora_kernels.ops import nf4
    from lora_kernels.triton import nf4_gemv as G
    from lora_kernels.triton.quant_lora import packed
    dtype, N, K = torch.bfloat16, 4096, 4096
    layer = _cuda_nf4(N, K, dtype, nested)
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    g = torch.Generator(device="cuda").manual_seed(M)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device="cuda") * sc).to(dtype)
    x, b, a, bb = rnd(M, K), rnd(N), rnd(16, K, sc=0.05), rnd(N, 16, sc=0.05)
    run = lambda: lora_linear_nf4(x, layer.weight, b, a, bb, scaling=2.0, training=False,
                                  backend="triton")
    y = run()
    want = reference.lora_linear(x.double(), W, b.double(), a.double(), bb.double(), 2.0)
    assert rel_err(y, want) <= TOLS[dtype]
    assert torch.equal(run(), y)
    pw = packed(nf4.from_params4bit(layer.weight))
    assert G.gemv_supported(pw, M) == (M <= G.gemv_max_rows(pw))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)
