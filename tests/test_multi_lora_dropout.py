"""``multi_lora_linear(..., dropout_p=...)``: per-slot LoRA dropout in a heterogeneous batch,
against the float64 oracle (``reference.multi_lora_linear(dropout_p=, seed=)``) with the same
seed, on the torch backend (native grouped kernels), the composed path every other backend runs,
and the Triton kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops import multi_lora_dropout as MD
from lora_kernels.ops.batch import LoRABatch
from helpers import rel_err, triton_device

T, K, N, R, S = 9, 13, 11, 5, 3
IDS = torch.tensor([0, -1, 2, 2, 0, 1, 1, 2, -1])
SC = torch.tensor([0.5, 1.0, 2.0])
RANKS = torch.tensor([5, 3, 2], dtype=torch.int32)
P = [0.3, 0.0, 0.5]
SEED = 1234


def _inputs(n_slices=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, K), (N, K), (N,), (S, n_slices * R, K), (S, N, R)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes], \
        torch.randn(T, N, generator=g, dtype=torch.float64)


def _oracle(inputs, dy, ranks=RANKS, out_slices=None, p=P, seed=SEED):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = ref.multi_lora_linear(*leaves, IDS, SC.double(), ranks, out_slices, p, seed)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def _ours(inputs, dy, dtype, backend, ranks=RANKS, out_slices=None, p=P, seed=SEED, device="cpu"):
    leaves = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for t in inputs]
    batch = LoRABatch.from_adapter_ids(IDS.to(device), S)
    y = lk.multi_lora_linear(*leaves, batch, scalings=SC, ranks=ranks, out_slices=out_slices,
                             dropout_p=p, dropout_seed=seed, backend=backend)
    y.backward(dy.to(device=device, dtype=dtype))
    return y.detach(), [t.grad for t in leaves]


def _assert_close(got, want, tol):
    (y, grads), (y_ref, grads_ref) = got, want
    assert rel_err(y, y_ref) <= tol
    for name, g, r in zip(("x", "weight", "bias", "lora_a", "lora_b"), grads, grads_ref):
        assert rel_err(g, r) <= tol, name


def test_token_keep_mask_is_the_v2_mask_per_row():
    keep = ref.token_keep_mask(SEED, IDS, K, P)
    for slot, p in enumerate(P):
        rows = IDS == slot
        assert torch.equal(keep[rows], ref.dropout_keep_mask(SEED, T, K, p)[rows])
    assert keep[IDS < 0].all()
    # some elements of the p = 0.5 slot are really dropped, none of the p = 0 slot
    assert not keep[IDS == 2].all() and keep[IDS == 1].all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_torch_backend_matches_oracle(dtype, tol):
    inputs, dy = _inputs()
    _assert_close(_ours(inputs, dy, dtype, "torch"), _oracle(inputs, dy), tol)


def test_packed_slices_and_per_slice_ranks():
    inputs, dy = _inputs(n_slices=2)
    ranks = torch.tensor([[5, 1], [0, 0], [2, 3]], dtype=torch.int32)
    want = _oracle(inputs, dy, ranks=ranks, out_slices=[5, 6])
    _assert_close(_ours(inputs, dy, torch.float64, "torch", ranks=ranks, out_slices=[5, 6]),
                  want, 1e-12)


@pytest.mark.parametrize("n_slices", [1, 2])
def test_composed_path_matches_oracle(n_slices):
    # The path the Triton/CUDA backends take, run here on the torch backend's shrink/expand.
    inputs, dy = _inputs(n_slices=n_slices)
    out_slices = None if n_slices == 1 else [5, 6]
    ranks = RANKS if n_slices == 1 else torch.tensor([[5, 1], [0, 0], [2, 3]], dtype=torch.int32)
    y_ref, grads_ref = _oracle(inputs, dy, ranks=ranks, out_slices=out_slices)
    x, w, b, a, bb = inputs
    batch = LoRABatch.from_adapter_ids(IDS, S)
    keep = MD.token_keep_mask("torch", SEED, batch.adapter_ids, K, P)
    y, xa = MD.composed_forward("torch", x, w, b, a, bb, SC, ranks, batch, out_slices, True,
                                keep, tuple(P))
    grads = MD.composed_backward("torch", dy, x, w, a, bb, xa, SC, ranks, batch, out_slices,
                                 (True,) * 5, keep, tuple(P))
    _assert_close((y, grads), (y_ref, grads_ref), 1e-12)


def test_backward_masks_dx_where_the_forward_dropped():
    # The low-rank part of dx is exactly zero where the forward's mask dropped an element of x
    # (and the gradient equality above says it is right everywhere else): the backward
    # regenerated the forward's bits from the seed.
    inputs, dy = _inputs()
    _, grads = _ours(inputs, dy, torch.float64, "torch")
    dropped = ~ref.token_keep_mask(SEED, IDS, K, P)
    low = grads[0] - dy @ inputs[1]
    assert dropped.any() and torch.all(low[dropped] == 0)
    assert torch.all(low[~dropped][IDS.repeat_interleave(K).view(T, K)[~dropped] >= 0] != 0)


def test_no_dropout_cases_take_the_plain_op():
    inputs, dy = _inputs()
    x, w, b, a, bb = inputs
    batch = LoRABatch.from_adapter_ids(IDS, S)
    plain = lk.multi_lora_linear(x, w, b, a, bb, batch, scalings=SC, ranks=RANKS)
    for kw in ({"dropout_p": 0.0}, {"dropout_p": [0.0] * S}, {"dropout_p": P, "training": False}):
        assert torch.equal(lk.multi_lora_linear(x, w, b, a, bb, batch, scalings=SC, ranks=RANKS,
                                                **kw), plain)


def test_seed_from_torch_generator_reproduces():
    inputs, _ = _inputs()
    batch = LoRABatch.from_adapter_ids(IDS, S)

    def run():
        torch.manual_seed(7)
        return lk.multi_lora_linear(*inputs, batch, scalings=SC, ranks=RANKS, dropout_p=0.5)
    assert torch.equal(run(), run())


@pytest.mark.parametrize("bad,err", [
    ([0.1, 0.2], ValueError), ([0.1, 1.0, 0.0], ValueError), ([0.1, float("nan"), 0.0], ValueError),
    ("0.1", TypeError), ([0.1, "x", 0.0], TypeError), (torch.tensor([1, 0, 0]), TypeError),
    (-0.1, ValueError),
])
def test_bad_dropout_p_is_refused(bad, err):
    inputs, _ = _inputs()
    batch = LoRABatch.from_adapter_ids(IDS, S)
    with pytest.raises(err, match="dropout_p"):
        lk.multi_lora_linear(*inputs, batch, scalings=SC, dropout_p=bad)


@pytest.mark.skipif(triton_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_composed_path(monkeypatch):
    # The composition over Triton's own shrink/expand/dA/dB kernels, given the mask: Triton's
    # dropout_keep_mask is the definition in force for the Triton backend (the cross-backend
    # bit equality of that mask is tests/test_reference.py's and the Triton tests' job), so
    # here the oracle's bits are fed to both sides.
    import lora_kernels.triton as lt
    monkeypatch.setattr(lt, "dropout_keep_mask", lambda seed, rows, cols, p, device=None:
                        ref.dropout_keep_mask(seed, rows, cols, p, device))
    dev = triton_device()
    inputs, dy = _inputs()
    _assert_close(_ours(inputs, dy, torch.float32, "triton", device=dev), _oracle(inputs, dy),
                  1e-5 if dev == "cpu" else 5e-4)


def test_compiles_fullgraph_with_the_same_mask():
    inputs, dy = _inputs()
    batch = LoRABatch.from_adapter_ids(IDS, S)

    def f(x, w, b, a, bb):
        return lk.multi_lora_linear(x, w, b, a, bb, batch, scalings=SC, ranks=RANKS,
                                    dropout_p=P, dropout_seed=SEED)
    leaves = [t.float().requires_grad_() for t in inputs]
    y = f(*leaves)
    y.backward(dy.float())
    want = [y.detach()] + [t.grad for t in leaves]
    torch._dynamo.reset()
    leaves = [t.float().requires_grad_() for t in inputs]
    y = torch.compile(f, fullgraph=True)(*leaves)
    y.backward(dy.float())
    torch._dynamo.reset()
    for g, w in zip([y.detach()] + [t.grad for t in leaves], want):
        assert rel_err(g, w) <= 1e-6
