"""StaticLoRABatch: refreshed in place, valid for every padded size (engines' CUDA graphs)."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels.integrations.static_batch import StaticLoRABatch


def _segments(batch):
    off = batch.seg_offsets.tolist()
    order = batch.sorted_token_ids.tolist()
    return {s: sorted(order[off[s + 1]:off[s + 2]]) for s in range(batch.num_slots)}, \
        sorted(order[:off[1]])


@pytest.mark.parametrize("T", [0, 1, 5, 9])
def test_every_padded_size_sees_the_same_batch(T):
    S, C = 4, 9
    gen = torch.Generator().manual_seed(T)
    static = StaticLoRABatch(C, S, "cpu")
    static.refresh(torch.randint(-1, S, (C,), generator=gen, dtype=torch.int32))  # stale batch
    ids = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
    static.refresh(ids)
    views = {Tc: static.batch_for(Tc) for Tc in range(T, C + 1)}
    for Tc, b in views.items():
        padded = torch.cat([ids, torch.full((Tc - T,), -1, dtype=torch.int32)])
        want = lk.LoRABatch.from_adapter_ids(padded, S)
        assert torch.equal(b.adapter_ids, padded)
        assert sorted(b.sorted_token_ids.tolist()) == list(range(Tc))   # a permutation
        assert _segments(b) == _segments(want)
        assert b.num_tokens == Tc and b.max_seg_len == Tc
    assert static.batch_for(C) is views[C]       # cached views: fixed tensors for a graph
    with pytest.raises(ValueError, match="capacity"):
        static.refresh(torch.zeros(C + 1, dtype=torch.int32))
    if T:
        with pytest.raises(ValueError, match="real"):
            static.batch_for(T - 1)


def test_ops_on_a_static_view_match_the_exact_batch():
    S, R, K, N, C = 3, 5, 11, 7, 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)
    static = StaticLoRABatch(C, S, "cpu")
    static.refresh(ids)
    x = torch.randn(C, K, generator=gen)
    a, b = torch.randn(S, R, K, generator=gen), torch.randn(S, N, R, generator=gen)
    ranks = torch.tensor([5, 2, 4], dtype=torch.int32)
    padded = torch.cat([ids, torch.full((3,), -1, dtype=torch.int32)])
    exact = lk.LoRABatch.from_adapter_ids(padded, S)
    for backend in ("torch", "triton"):
        got = lk.lora_shrink(x, a, static.batch_for(C), [1.0, 2.0, 0.5], ranks=ranks,
                             backend=backend)
        want = lk.lora_shrink(x, a, exact, [1.0, 2.0, 0.5], ranks=ranks, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        y, y_ref = torch.zeros(C, N), torch.zeros(C, N)
        lk.lora_expand(y, got, b, static.batch_for(C), ranks=ranks, backend=backend)
        lk.lora_expand(y_ref, want, b, exact, ranks=ranks, backend="torch")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
