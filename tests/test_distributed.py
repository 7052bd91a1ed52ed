"""Distributed training with torch's own DDP and FSDP2 (``fully_shard``) over our LoRA layers:
2 CPU processes with the gloo backend must produce the gradients (and, after a few optimizer
steps, the weights) of single-process training on the whole batch. Nothing home-made: the
layers are ordinary modules with ordinary Parameters, so torch's wrappers just work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import run_gloo
from lora_kernels import inject_lora, mark_only_lora_as_trainable

WORLD = 2
STEPS = 3
BATCH = 8  # split evenly: each rank gets 4 rows
MODES = ("ddp", "fsdp2")


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 20), nn.GELU(),
                          nn.Linear(20, 6))
    inject_lora(model, ["0", "2", "4"], r=4, lora_alpha=8)
    with torch.no_grad():  # B = 0 at init would make A's first gradient zero: not a real test
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return mark_only_lora_as_trainable(model)


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 6, generator=g))
            for _ in range(STEPS)]


def train(model, batches, rank=0, world=1, full_grad=lambda g: g):
    """SGD on the mean loss; returns the first step's gradients and the final LoRA weights."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = None
    for x, y in batches:
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = nn.functional.mse_loss(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = {k: full_grad(p.grad).detach().clone() for k, p in model.named_parameters()
                     if p.requires_grad}
        opt.step()
    return first


def _run(mode: str, rank: int):
    model = build_model()
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
        grads = train(wrapped, data(), rank, WORLD)
        grads = {k.removeprefix("module."): v for k, v in grads.items()}
        params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # sharded for real: every trainable parameter is a DTensor split across the ranks
        assert all(type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad)
        grads = train(model, data(), rank, WORLD, full_grad=lambda g: g.full_tensor())
        params = {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()
                  if p.requires_grad}
    return {"grads": grads, "params": params}


def _single_process():
    model = build_model()
    grads = train(model, data())
    return grads, {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_gloo(_run, MODES, WORLD, tmp_path_factory.mktemp("dist"), timeout=240)


@pytest.mark.parametrize("mode", MODES)
def test_two_process_gloo_training_matches_single_process(mode, two_process_results):
    got = two_process_results[mode]
    ref_grads, ref_params = _single_process()
    assert got["grads"].keys() == ref_grads.keys() and len(ref_grads) == 6  # A and B of 3 layers
    for k in ref_grads:
        torch.testing.assert_close(got["grads"][k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ref_params:
        torch.testing.assert_close(got["params"][k], ref_params[k], rtol=1e-5, atol=1e-6, msg=k)
