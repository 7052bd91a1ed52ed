"""The eager training path of lora_linear (an autograd.Function around the backend kernels,
skipping the custom op's dispatch) gives exactly the custom op's outputs and gradients, and
everything that must see the custom op (dispatch modes, torch.compile, functorch) still does."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels as lk
from lora_kernels.ops import backend as B

M, K, N, R = 7, 33, 19, 5


def operands(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    a = torch.randn(R, K, generator=g, requires_grad=True)
    bb = torch.randn(N, R, generator=g, requires_grad=True)
    return x, w, b, a, bb


def grads(y, dy, *ts):
    y.backward(dy)
    out = [None if t is None else t.grad.clone() for t in ts]
    for t in ts:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("dropout_p, bias", [(0.0, True), (0.3, False)])
def test_eager_function_equals_the_custom_op_bit_for_bit(dropout_p, bias):
    x, w, b, a, bb = operands(bias=bias)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9))
    y = lk.lora_linear(x, w, b, a, bb, scaling=1.5, dropout_p=dropout_p, dropout_seed=11,
                       backend="torch")
    assert type(y.grad_fn).__name__ == "_EagerLoRALinearBackward"
    eager = grads(y, dy, x, b, a, bb)
    seed = torch.tensor(11) if dropout_p > 0 else None
    ref, _, _ = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 1.5, dropout_p, seed, "torch")
    assert torch.equal(y, ref)
    for g_eager, g_op in zip(eager, grads(ref, dy, x, b, a, bb)):
        assert (g_eager is None and g_op is None) or torch.equal(g_eager, g_op)


def test_grad_only_where_asked_and_empty_batch():
    x, w, b, a, bb = operands()
    x.requires_grad_(False)
    y = lk.lora_linear(x, w, None, a, bb)
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is None
    empty = torch.zeros(0, K, requires_grad=True)
    y0 = lk.lora_linear(empty, w, b, a, bb)
    y0.sum().backward()
    assert y0.shape == (0, N) and empty.grad.shape == (0, K)


def test_double_backward_is_refused_like_the_custom_op():
    x, w, b, a, bb = operands()
    y = lk.lora_linear(x, w, b, a, bb)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_transforms_still_see_the_custom_op():
    x, w, b, a, bb = operands()
    assert B.eager_mode(x, w, b, a, bb) == B.EAGER_GRAD
    with torch.no_grad():
        assert B.eager_mode(x, w, b, a, bb) == B.EAGER_NO_GRAD
    with _Count() as mode:
        assert B.eager_mode(x, w, b, a, bb) == B.CUSTOM_OP
        lk.lora_linear(x, w, b, a, bb)
    assert any("lora_kernels.lora_linear" in op for op in mode.ops)
    seen = []

    def f(xx):
        seen.append(B.eager_mode(xx, w, b, a, bb))
        return xx.sum()
    torch.func.grad(f)(x.detach())
    assert seen == [B.CUSTOM_OP]


def test_single_and_multi_adapter_paths_round_alike_on_tiny_batches():
    # PEFT's TestMixedAdapterBatches compares a token's output through one active adapter with
    # the same token in a mixed batch at allclose's *default* tolerance (a few fp32 ulps). A
    # BLAS call's rounding depends on its row count, so tiny mixed batches compute each slot's
    # term over all rows, like the single-adapter op: the same bits.
    x, w, b, a, bb = operands()
    with torch.no_grad():
        single = lk.lora_linear(x, w, b, a, bb, scaling=1.7, backend="torch")
        ids = torch.tensor([0, -1, 1, 0, -1, 1, 0])  # token-interleaved, like PEFT's test
        batch = lk.LoRABatch.from_adapter_ids(ids, 2)
        mixed = lk.multi_lora_linear(x, w, b, torch.stack([a, a * 0.5]), torch.stack([bb, bb]),
                                     batch, scalings=torch.tensor([1.7, 1.0]), backend="torch")
        base = torch.nn.functional.linear(x, w, b)
    assert torch.equal(mixed[ids == 0], single[ids == 0])
    assert torch.equal(mixed[ids == -1], base[ids == -1])
