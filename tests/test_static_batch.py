"""StaticLoRABatch: refreshed in place, valid for every padded size (engines' CUDA graphs)."""

import pytest
import torch

import lora_kernels as lk
from helpers import capture_cuda_graph, rel_err, tol
from lora_kernels import reference as ref
from lora_kernels.integrations.static_batch import StaticLoRABatch
from test_batch import _CountSyncs


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


def _padded(ids, Tc):
    return torch.cat([ids, torch.full((Tc - ids.shape[0],), -1, dtype=torch.int32)])


def test_cached_view_is_refreshed_with_its_tile_map():
    # Regression: a view cached by batch_for() before a refresh kept the tile map of the batch
    # it was first built for, so the Triton decode kernels (which find their work in the tile
    # map) served the *old* mix under CUDA-graph replay. Two sizes, both cached before.
    S, R, K, N, C = 3, 5, 11, 7, 9
    gen = torch.Generator().manual_seed(1)
    static = StaticLoRABatch(C, S, "cpu")
    static.refresh(torch.tensor([0, 0, -1, 0], dtype=torch.int32))
    views = {Tc: static.batch_for(Tc) for Tc in (7, C)}
    ids = torch.tensor([2, -1, 1, 2, 1, 0, 2], dtype=torch.int32)
    static.refresh(ids)
    a, b = torch.randn(S, R, K, generator=gen), torch.randn(S, N, R, generator=gen)
    W = torch.randn(N, K, generator=gen) * K ** -0.5
    sc = torch.tensor([1.0, 2.0, 0.5])
    for Tc, view in views.items():
        assert static.batch_for(Tc) is view and view.bounded
        assert view.num_active == S and view.max_seg_len == Tc
        x = torch.randn(Tc, K, generator=gen)
        exact = lk.LoRABatch.from_adapter_ids(_padded(ids, Tc), S)
        xa = lk.lora_shrink(x, a, view, sc, backend="triton")
        xa_ref = lk.lora_shrink(x, a, exact, sc, backend="torch")
        torch.testing.assert_close(xa, xa_ref, rtol=1e-5, atol=1e-5)
        y, y_ref = torch.zeros(Tc, N), torch.zeros(Tc, N)
        lk.lora_expand(y, xa, b, view, backend="triton")
        lk.lora_expand(y_ref, xa_ref, b, exact, backend="torch")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        got = lk.multi_lora_linear(x, W, None, a, b, view, scalings=sc, backend="triton")
        want = ref.multi_lora_linear(x.double(), W.double(), None, a.double(), b.double(),
                                     _padded(ids, Tc), sc.double())
        assert rel_err(got, want) <= tol(torch.float32, torch.device("cpu"))
        # the view's tile rows are the exact batch's (the rest is -1 padding)
        real = view.tile_map[view.tile_map[:, 0] >= 0]
        assert torch.equal(real, exact.tile_map)
        assert (view.tile_map[real.shape[0]:, 0] == -1).all()


@pytest.mark.parametrize("T", [0, 3, 8])
def test_refresh_does_no_host_sync(T):
    static = StaticLoRABatch(8, 3, "cpu")
    for Tc in range(T, 9):
        static.batch_for(Tc)  # cached views are refreshed too
    ids = torch.tensor([2, -1, 1, 2, 0, 1, 1, 2][:T], dtype=torch.int32)
    with _CountSyncs() as mode:
        static.refresh(ids)
    assert mode.syncs == []
    # no data read at all: the same refresh (views included) runs on meta tensors
    meta = StaticLoRABatch(8, 3, "meta")
    meta.batch_for(8)
    meta.refresh(ids.to("meta"))
    assert meta.batch_for(8).tile_map.device.type == "meta"


def test_bad_input_raises_and_changes_nothing():
    with pytest.raises(ValueError, match="capacity"):
        StaticLoRABatch(2.0, 3, "cpu")
    with pytest.raises(ValueError, match="num_slots"):
        StaticLoRABatch(4, -1, "cpu")
    static = StaticLoRABatch(4, 3, "cpu")
    static.refresh(torch.tensor([1, 2], dtype=torch.int32))
    view = static.batch_for(4)
    before = [t.clone() for t in view.tensors()]
    with pytest.raises(ValueError, match="1-D"):
        static.refresh(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        static.refresh(torch.zeros(2))
    assert all(torch.equal(a, b) for a, b in zip(before, view.tensors()))
    assert static.num_real == 2

@pytest.mark.gpu
def test_gpu_graphs_per_padded_size_replay_after_refresh():
    """The engines' use: one decode graph captured per padded size T_c over the views of one
    StaticLoRABatch, then refreshes with T ≤ T_c real tokens (SGLang refreshes with the real
    batch size and replays the padded size's graph): every replay equals the exact batch."""
    S, K, N, R, C = 8, 256, 192, 16, 48
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dt)
    x, W = rnd(C, K), rnd(N, K, scale=K ** -0.5)
    A, B = rnd(S, R, K, scale=K ** -0.5), rnd(S, N, R)
    sc = torch.rand(S, generator=gen).cuda()
    static = StaticLoRABatch(C, S, "cuda")
    static.refresh(torch.randint(-1, S, (1,), generator=gen, dtype=torch.int32).cuda())

    def fwd(Tc):
        return lk.multi_lora_linear(x[:Tc], W, None, A, B, static.batch_for(Tc), scalings=sc,
                                    backend="triton")
    graphs = {}
    for Tc in (1, 16, 33, C):
        fwd(Tc)  # warm-up: compiles
        graphs[Tc] = capture_cuda_graph(lambda: fwd(Tc))
    for Tc, (graph, out) in graphs.items():
        for T in sorted({1, Tc // 2, Tc} - {0}):
            ids = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
            ids_dev = ids.cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                static.refresh(ids_dev)  # in place, no host sync, views included
                graph.replay()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            exact = lk.multi_lora_linear(x[:Tc], W, None, A, B,
                                         lk.LoRABatch.from_adapter_ids(_padded(ids, Tc).cuda(),
                                                                       S),
                                         scalings=sc, backend="triton")
            assert rel_err(out, exact) <= tol(dt, "cuda"), (Tc, T)
