"""LoRABatch: the per-batch metadata every multi-adapter layer reads."""

import pytest
import torch

import lora_kernels as lk


def test_fields_describe_sorted_segments():
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    b = lk.LoRABatch.from_adapter_ids(ids, num_slots=4)
    assert b.num_tokens == 7 and b.num_slots == 4 and b.has_lora
    assert b.num_active == 2 and b.max_seg_len == 3
    assert b.active_slots.tolist() == [0, 2]
    off = b.seg_offsets.tolist()
    assert off == [0, 2, 4, 4, 7, 7]
    order = b.sorted_token_ids.tolist()
    assert order[:2] == [1, 5]  # the -1 tokens first, stable
    assert order[off[1]:off[2]] == [2, 6] and order[off[3]:off[4]] == [0, 3, 4]
    assert all(t.dtype == torch.int32 for t in b.tensors())
    assert [(s, r.tolist()) for s, r in b.groups()] == [(0, [2, 6]), (2, [0, 3, 4])]


def test_lists_and_sample_ids():
    b = lk.LoRABatch.from_adapter_ids([0, 1, -1], 2)
    assert b.adapter_ids.tolist() == [0, 1, -1]
    s = lk.LoRABatch.from_sample_ids(torch.tensor([1, -1]), tokens_per_sample=3, num_slots=2)
    assert s.adapter_ids.tolist() == [1, 1, 1, -1, -1, -1]


def test_empty_and_base_only():
    e = lk.LoRABatch.from_adapter_ids(torch.empty(0, dtype=torch.long), 3)
    assert e.num_tokens == 0 and not e.has_lora and e.seg_offsets.tolist() == [0, 0, 0, 0, 0]
    b = lk.LoRABatch.from_adapter_ids(torch.full((5,), -1), 3)
    assert not b.has_lora and b.max_seg_len == 0


def test_round_trip_through_parts_and_to():
    b = lk.LoRABatch.from_adapter_ids(torch.tensor([1, 0, 1]), 2)
    # ids [1, 0, 1]: no base tokens, slot 0 has token 1, slot 1 has tokens 0 and 2.
    want = [[1, 0, 1], [1, 0, 2], [0, 0, 1, 3], [0, 1]]  # ids, sorted tokens, offsets, active
    c = lk.LoRABatch.from_parts(*b.tensors(), b.host_ints())
    assert [t.tolist() for t in c.tensors()] == want
    assert c.host_ints() == [2, 2, 2] and c.host_offsets() == (0, 0, 1, 3)
    # to() really moves (meta: no data) and keeps the host-side ints without a sync.
    m = b.to("meta")
    assert all(t.device.type == "meta" for t in m.tensors())
    assert [t.shape for t in m.tensors()] == [t.shape for t in b.tensors()]
    assert [t.dtype for t in m.tensors()] == [t.dtype for t in b.tensors()]
    assert m.host_ints() == [2, 2, 2] and m.host_offsets() == (0, 0, 1, 3)
    d = b.to("cpu")
    assert [t.tolist() for t in d.tensors()] == want


@pytest.mark.parametrize("num_slots", [-1, 2.0, True])
def test_bad_num_slots(num_slots):
    with pytest.raises(TypeError, match="num_slots"):
        lk.LoRABatch.from_adapter_ids(torch.tensor([0]), num_slots)
