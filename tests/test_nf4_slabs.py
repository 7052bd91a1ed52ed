"""The NF4 slab route (lora_kernels/triton/nf4_slabs.py): W decoded once per bounded slab,
then the dense fused GEMM per slab. Interpreter runs (fp32 / fp16) against float64 of
``bitsandbytes.functional.dequantize_4bit``: the slabs themselves (bit-exact), the op's
forward and gradients through the route on odd shapes (several slabs, ragged last one), the
plan's bounds (never an N×K workspace), and the M threshold."""

import pytest
import torch

from helpers import (DecodeSpy, check_slab_dx_first_slab, check_slab_probe, check_slab_route_op,
                     interpreting, nf4_linear, rel_err, slab_inputs, triton_dtypes)
from lora_kernels import reference
from lora_kernels.ops import nf4
from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

needs_interpreter = pytest.mark.skipif(not interpreting(),
                                       reason="the interpreter runs the Triton kernels on CPU")



def _dequantized(layer):
    return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@needs_interpreter
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape", [(21, 65), (19, 66), (70, 192)])
def test_decoded_slab_is_dequantize(nested, dtype, shape):
    """Row slabs and 64-aligned column slabs of every decode branch (odd K: per element;
    even K: nibble pairs; K % 64 == 0: one scale per (row, block); fp16: the two elements of
    a byte stored as one word) equal bitsandbytes' ``dequantize_4bit`` bit for bit, in the
    storage dtype."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton.quant_lora import packed
    n, k = shape
    layer = nf4_linear(n, k, dtype, nested, seed=k)
    W = _dequantized(layer)
    pw = packed(nf4.from_params4bit(layer.weight))
    ws = torch.full((n, k), float("nan"), dtype=dtype)
    # (0, 16, 0, 64): whole interpreter tiles (the unmasked EVEN form of the word store)
    for n0, n1, c0, c1 in ((0, n, 0, k), (3, n - 2, 0, k), (0, n, 64, k), (5, 17, 0, 64),
                           (0, 16, 0, 64)):
        got = S.decode_slab(pw, ws, n0, n1, c0, c1)[: n1 - n0, : c1 - c0]
        assert torch.equal(got, W[n0:n1, c0:c1]), (n0, n1, c0, c1)


@needs_interpreter
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", triton_dtypes("cpu"))
@pytest.mark.parametrize("shape,p,bias", [((150, 200), 0.0, True), ((130, 65), 0.3, False),
                                          ((70, 192), 0.25, True)])
def test_slab_route_op_against_float64(nested, dtype, shape, p, bias, monkeypatch):
    """The public op with the route threshold at 1 and a small workspace budget (3 row slabs
    of 64 / 56 rows and 2–4 column slabs, the last ragged): y and the grads of x, bias,
    lora_a, lora_b against float64 of the dequantized W, dropout in training included (dX's
    mask from the packed bits, sliced per column slab)."""
    n, k = shape
    layer = nf4_linear(n, k, dtype, nested, seed=n)
    check_slab_route_op(monkeypatch, lora_linear_nf4, layer.weight, _dequantized(layer).double(),
                        dtype, p, bias, 1e-5 if dtype == torch.float32 else 2e-3)


@needs_interpreter
@pytest.mark.parametrize("mode", [1, 2])
def test_slab_route_both_first_slab_modes(mode, monkeypatch):
    """xa made by the shrink (SEEDED) or by the first slab's in-loop K loop (IN_LOOP; PANEL
    on a GPU) and reused by every later slab: the same y and xa as the float64 reference."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton import quant_lora as T
    monkeypatch.setattr(S, "SLAB_BYTES", 32 * 128 * 4)
    # (K = 96 is avoided: bitsandbytes 0.50.2's CPU dequantize_4bit disagrees with its flat
    # block layout there, for our torch path and every Triton kernel alike; notes/nf4big.md)
    n, k = 100, 128
    layer = nf4_linear(n, k, torch.float32, True, seed=2)
    W = _dequantized(layer).double()
    x, b, a, bb, _ = slab_inputs(20, n, k, 7, torch.float32, seed=3)
    y, xa = T.quant_lora_fwd(x, nf4.from_params4bit(layer.weight), b, a, bb, 2.0, 0.0, 0,
                             mode=mode, route="slabs")
    xa64 = x.double() @ a.double().t()
    assert rel_err(xa, xa64) <= 1e-5
    assert rel_err(y, x.double() @ W.t() + b.double() + 2.0 * xa64 @ bb.double().t()) <= 1e-5


def test_slab_plan_is_bounded():
    """Slabs are never the whole W (≤ half, so the workspace < N·K), fit the budget unless
    the SMs would idle, keep the granules; W too small to cut gives None."""
    from lora_kernels.triton import nf4_slabs as S
    MiB = 1 << 20
    # the shape, bf16, 132 SMs: 2048-row slabs = the 16 MiB budget = half of W
    assert S.plan(8192, 4096, 4096, 2, 132, 128, 8) == 2048
    assert S.plan(8192, 4096, 4096, 2, 132, 64, 64) == 2048   # dX columns
    # a wider W: the budget, not the half, cuts it (1024 rows of 8192 columns)
    assert S.plan(8192, 4096, 8192, 2, 132, 128, 8) == 1024
    # M = 1024: widened to fill the SMs (8 row tiles x 17 column tiles), capped at half of W
    assert S.plan(1024, 4096, 4096, 2, 132, 128, 8) == 2048
    for M in (1, 100, 1024, 3000, 8192):
        for rows, cols in ((4096, 4096), (11008, 4096), (4096, 11008), (1000, 4032), (37, 65)):
            for g, gmin, sms in ((128, 8, 132), (128, 8, 0), (64, 64, 132), (64, 64, 0)):
                width = S.plan(M, rows, cols, 2, sms, g, gmin)
                if width is None:
                    assert rows <= 2 * gmin
                    continue
                assert width < rows and width % gmin == 0 and width <= -(-rows // 2) + gmin
                if not sms and width * cols * 2 > S.SLAB_BYTES:
                    assert width == gmin  # one granule is the least a slab can be
                assert width * cols * 2 <= max(S.SLAB_BYTES, rows * cols)
    assert S.SLAB_BYTES <= 16 * MiB
    assert S.plan(8192, 8, 4096, 2, 132, 128, 8) is None


@needs_interpreter
def test_route_threshold_and_route_argument(monkeypatch):
    """Below ``min_rows()`` the in-mainloop kernels run (no slab decode), at or above it the
    slabs; the env var moves the threshold; ``route=`` forces either and rejects others."""
    from lora_kernels.triton import nf4_slabs as S
    from lora_kernels.triton import quant_lora as T
    n, k = 40, 128
    layer = nf4_linear(n, k, torch.float32, False)
    w = nf4.from_params4bit(layer.weight)
    x, b, a, bb, dy = slab_inputs(9, n, k, 3, torch.float32)
    monkeypatch.setattr(S, "SLAB_BYTES", 16 * k * 4)
    assert S.min_rows() == S.SLAB_MIN_ROWS
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "many")
    with pytest.raises(ValueError, match="LORA_KERNELS_NF4_SLAB_MIN_M"):
        S.min_rows()
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "10")
    assert S.min_rows() == 10
    outs = {}
    for m, want_slabs in ((9, False), (10, True)):
        spy = DecodeSpy(monkeypatch, n)
        xm = x.new_ones(m, k) if m != 9 else x
        y, xa = T.quant_lora_fwd(xm, w, b, a, bb, 0.5, 0.0, 0)
        assert (spy.fwd > 0) == want_slabs
        outs[m] = y
    spy = DecodeSpy(monkeypatch, n)
    y_slab, _ = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, route="slabs")
    assert spy.fwd > 0 and rel_err(y_slab, outs[9].double()) <= 1e-5
    with pytest.raises(ValueError, match="route"):
        T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.0, 0, route="fast")


@needs_interpreter
def test_slab_step_makes_no_whole_weight(monkeypatch):
    """The structure probe of test_peft_qlora on the slab route: a training step (forward
    and backward of the Triton backend functions, dropout on) never makes a tensor as big as
    N×K. (The public op is a custom op, whose body a dispatch mode cannot see: probed at the
    backend functions, floating tensors only: the interpreter copies kernel arguments as
    bytes; the probe must see the slab workspace.)"""
    n, k = 129, 130  # N·K = 16770, larger than x [33, 130] and y [33, 129]
    w = nf4.from_params4bit(nf4_linear(n, k, torch.float32, True).weight)
    check_slab_probe(monkeypatch, w, n, k)


@needs_interpreter
def test_slab_route_under_torch_compile(monkeypatch):
    """torch.compile(fullgraph=True) of the custom op ``lora_kernels::lora_linear_nf4`` on the
    Triton backend with the slab route: one opaque op in the graph (the slab loop and its
    workspace live inside it, shapes only decide the plan), the same output and gradients
    as eager. (The public entry with an explicit ``backend="triton"`` resolves its backend by
    an import, which fullgraph refuses: called at the op here.)"""
    from lora_kernels.ops.lora_linear_nf4 import op_args
    from lora_kernels.triton import nf4_slabs as S
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "1")
    monkeypatch.setattr(S, "SLAB_BYTES", 16 * 130 * 4)
    w = nf4.from_params4bit(nf4_linear(70, 130, torch.float32, False).weight)
    spy = DecodeSpy(monkeypatch, 70)
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(3, 130, generator=g) * 0.3).requires_grad_(True)
    b = (torch.randn(70, 3, generator=g) * 0.3).requires_grad_(True)
    x = torch.randn(9, 130, generator=g).requires_grad_(True)

    def f(x, a, b):
        y, _ = torch.ops.lora_kernels.lora_linear_nf4(*op_args(x, w, None, a, b, 0.5, 0.0, None,
                                                              "triton"))
        return y.square().sum()
    torch.compile(f, fullgraph=True)(x, a, b).backward()
    got = [t.grad.clone() for t in (x, a, b)]
    assert spy.fwd >= 2 and spy.dx >= 2
    for t in (x, a, b):
        t.grad = None
    f(x, a, b).backward()
    for gr, t in zip(got, (x, a, b)):
        assert rel_err(gr, t.grad) <= 1e-6


@needs_interpreter
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_slab_dx_first_slab_makes_dyb_and_db(p, monkeypatch):
    """The first NF4 dX slab's GEMM makes dyb and dB itself (helpers.check_slab_dx_first_slab)."""
    layer = nf4_linear(130, 150, torch.float32, True, seed=7)
    check_slab_dx_first_slab(monkeypatch, nf4.from_params4bit(layer.weight),
                             _dequantized(layer).double(), p)
