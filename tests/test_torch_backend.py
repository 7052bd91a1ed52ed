"""The torch backend's own paths (padded bmm forward, grouped loops) against the float64 oracle."""

import pytest
import torch

from lora_kernels import reference as ref
from lora_kernels.ops import multi_lora as ml
from lora_kernels.ops import torch_backend
from lora_kernels.ops.batch import LoRABatch
from helpers import randn, rel_err

F64 = torch.float64


def _interleaved_ids(T, S):
    # Token-interleaved slots with a few base-only tokens: equal-length segments, so the
    # torch backend takes its padded (bmm) forward when there is one output slice.
    ids = torch.arange(T) % S
    ids[::7] = -1
    return ids


def _assert_matches_oracle(y, y_ref, inputs, N):
    """Output and the gradients w.r.t. ``inputs`` agree with the float64 oracle."""
    assert rel_err(y, y_ref) < 1e-12
    dy = randn(y.shape[0], N, dtype=F64)
    for g, w in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("ranks_shape", ["S", "S,1"])
def test_padded_forward_accepts_both_rank_shapes(ranks_shape, monkeypatch):
    """Regression: the padded path indexed ranks as 1-D, so ranks [S, 1] (which the op accepts
    for one slice) raised a shape error instead of matching the oracle."""
    T, K, N, S, R = 32, 16, 12, 4, 4
    x = randn(T, K, dtype=F64, requires_grad=True)
    W, b = randn(N, K, dtype=F64), randn(N, dtype=F64)
    A = randn(S, R, K, dtype=F64, requires_grad=True)
    B = randn(S, N, R, dtype=F64, requires_grad=True)
    ids = _interleaved_ids(T, S)
    s = torch.tensor([1.0, 0.5, 2.0, 0.75], dtype=F64)
    rk = torch.tensor([4, 2, 0, 3])
    ranks = rk if ranks_shape == "S" else rk[:, None]

    calls = []
    padded = torch_backend._padded_forward
    monkeypatch.setattr(torch_backend, "_padded_forward",
                        lambda *a, **k: calls.append(1) or padded(*a, **k))
    batch = LoRABatch.from_adapter_ids(ids, S)
    y = ml.multi_lora_linear(x, W, b, A, B, batch, scalings=s, ranks=ranks, backend="torch")
    assert calls, "the padded forward did not run"

    _assert_matches_oracle(y, ref.multi_lora_linear(x, W, b, A, B, ids, s, rk), (x, A, B), N)


def test_interleaved_forward_with_per_slice_ranks():
    """ranks [S, n_slices] with n_slices > 1 (needs out_slices, so the grouped loop rather than
    the padded forward runs) on the same interleaved batch."""
    T, K, S, R = 32, 16, 4, 4
    slices = [5, 4, 3]
    N = sum(slices)
    x = randn(T, K, dtype=F64, requires_grad=True)
    W = randn(N, K, dtype=F64)
    A = randn(S, len(slices) * R, K, dtype=F64, requires_grad=True)
    B = randn(S, N, R, dtype=F64, requires_grad=True)
    ids = _interleaved_ids(T, S)
    s = torch.tensor([1.0, 0.5, 2.0, 0.75], dtype=F64)
    rk = torch.tensor([[4, 1, 0], [2, 2, 2], [0, 0, 0], [3, 4, 1]])
    batch = LoRABatch.from_adapter_ids(ids, S)
    y = ml.multi_lora_linear(x, W, None, A, B, batch, scalings=s, ranks=rk, out_slices=slices,
                             backend="torch")
    _assert_matches_oracle(y, ref.multi_lora_linear(x, W, None, A, B, ids, s, rk, slices),
                           (x, A, B), N)


@pytest.mark.parametrize("layout", ["runs", "interleaved"])
def test_grouped_backward_matches_oracle(layout):
    """The grouped backward accumulates dx in place: into dx's rows for a contiguous run of
    tokens (a view), through one index_add_ for gathered tokens; both, with several slices, match
    the float64 oracle."""
    T, K, S, R = 24, 10, 3, 4
    slices = [6, 5]
    N = sum(slices)
    x = randn(T, K, dtype=F64, requires_grad=True)
    W = randn(N, K, dtype=F64, requires_grad=True)
    A = randn(S, len(slices) * R, K, dtype=F64, requires_grad=True)
    B = randn(S, N, R, dtype=F64, requires_grad=True)
    ids = torch.arange(T) * S // T if layout == "runs" else _interleaved_ids(T, S)
    s = torch.tensor([0.5, 2.0, 1.25], dtype=F64)
    rk = torch.tensor([[4, 2], [1, 4], [3, 0]])
    batch = LoRABatch.from_adapter_ids(ids, S)
    y = ml.multi_lora_linear(x, W, None, A, B, batch, scalings=s, ranks=rk, out_slices=slices,
                             backend="torch")
    _assert_matches_oracle(y, ref.multi_lora_linear(x, W, None, A, B, ids, s, rk, slices),
                           (x, W, A, B), N)
