"""Joint multi-adapter training under torch's DDP and FSDP2 (2 CPU processes, gloo): each rank
trains every adapter on its half of the batch; the averaged gradients (and the weights after a
few SGD steps) equal single-process joint training on the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import run_gloo
from test_joint_training import joint_gpt2, joint_loss, tokens

pytest.importorskip("peft")

WORLD = 2
STEPS = 2
# every rank's half names every adapter equally often, so the mean over ranks of per-adapter
# means is the whole batch's per-adapter mean
NAMES = ["a1", "a2", "a3", "__base__"] * 2
MODES = ("ddp", "fsdp2")


def _lora_state(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(model, step_model, rank=0, world=1, full=lambda t: t):
    import lora_kernels as lk
    opt = torch.optim.SGD(lk.adapter_param_groups(model, lr=0.05, a3={"lr": 0.2}))
    first = None
    n = len(NAMES) // world
    for step in range(STEPS):
        ids = tokens(len(NAMES), seed=10 + step)
        rows = slice(rank * n, (rank + 1) * n)
        loss = joint_loss(step_model, ids[rows], NAMES[rows])
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = {k: full(p.grad).detach().clone() for k, p in _lora_state(model).items()}
        opt.step()
    return first, {k: full(p).detach().clone() for k, p in _lora_state(model).items()}


def _run(mode: str, rank: int):
    import lora_kernels as lk
    model = joint_gpt2()
    lk.patch_peft_model(model)
    if mode == "ddp":
        return train(model, nn.parallel.DistributedDataParallel(model), rank, WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.base_model.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in _lora_state(model).values())
    return train(model, model, rank, WORLD, full=lambda t: t.full_tensor())


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_gloo(_run, MODES, WORLD, tmp_path_factory.mktemp("joint_dist"), timeout=300)


@pytest.mark.parametrize("mode", MODES)
def test_two_process_joint_training_matches_single_process(mode, two_process_results):
    import lora_kernels as lk
    model = joint_gpt2()
    lk.patch_peft_model(model)
    ref_grads, ref_params = train(model, model)
    grads, params = two_process_results[mode]
    assert grads.keys() == ref_grads.keys() and len(grads) == 24
    for k in ref_grads:
        assert ref_grads[k].abs().sum() > 0, k
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(params[k], ref_params[k], rtol=1e-4, atol=1e-6, msg=k)
