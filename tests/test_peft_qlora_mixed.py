"""PEFT mixed batches (``adapter_names=``) over bitsandbytes NF4 ``Linear4bit`` bases, fused:
PEFT's own ``adapter_names=`` forward over the same quantized model is the oracle, for outputs
in inference and for outputs and every LoRA gradient in joint training (notes/joint.md), fp32
and bf16-compute setups, nested and not, both PEFT layer classes, adapters of different ranks.
The patched Triton training step makes no N×K tensor."""

import warnings

import pytest
import torch

from helpers import (LargestTensor, interpreting, lora_grads, patched_joint_step,
                     peft_mixed_oracle, rel_err)
from lora_kernels import patch_peft_model
from lora_kernels.integrations.peft import LoRAKernelsFallbackWarning

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from test_peft_qlora import HID, K, qlora_model  # noqa: E402  (same tiny model)

NAMES = ["other", "__base__", "default", "default", "other"]


def two_adapter_model(compute_dtype, nested, peft_bnb_class=False):
    model = qlora_model(compute_dtype, nested, peft_bnb_class=peft_bnb_class)
    torch.manual_seed(11)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q", "o"],
                                               init_lora_weights=False))
    for n, p in model.named_parameters():  # add_adapter leaves the new factors frozen
        if "lora_" in n:
            p.requires_grad_(True)
    return model


def _x(dtype, seed=1):
    return torch.randn(len(NAMES), 3, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _peft_step(model, x):
    return peft_mixed_oracle(model, x, NAMES)


BACKENDS = ["torch"] + (["triton"] if interpreting() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peft_bnb_class", [False, True])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("compute_dtype,x_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    # QLoRA's usual setup: fp32 activations and adapters, bf16 compute (PEFT runs the low-rank
    # term in fp32, we in the compute dtype, as the single-adapter op does)
    (torch.bfloat16, torch.float32, 2e-2),
])
def test_mixed_inference_matches_peft(backend, peft_bnb_class, nested, compute_dtype, x_dtype,
                                      tol):
    if backend == "triton" and compute_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bf16 wrong (GPU test covers it)")
    model = two_adapter_model(compute_dtype, nested, peft_bnb_class)
    x = _x(x_dtype)
    model.eval()
    with torch.no_grad():
        want = model(x, adapter_names=NAMES)
        with patch_peft_model(model, backend=backend), warnings.catch_warnings():
            warnings.simplefilter("error", LoRAKernelsFallbackWarning)  # fused, not PEFT's
            got = model(x, adapter_names=NAMES)
            base = model(x, adapter_names=["__base__"] * len(NAMES))
    assert got.dtype == want.dtype
    assert rel_err(got, want) <= tol
    with torch.no_grad():
        assert rel_err(base, model(x, adapter_names=["__base__"] * len(NAMES))) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nested,peft_bnb_class", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_mixed_joint_training_matches_peft(backend, nested, peft_bnb_class, compute_dtype, tol):
    """``adapter_names=`` in training mode (joint training): each adapter's gradient equals
    PEFT's for the same mixed batch, the NF4 base stays frozen."""
    if backend == "triton" and compute_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bf16 wrong (GPU test covers it)")
    model = two_adapter_model(compute_dtype, nested, peft_bnb_class)
    x = _x(torch.float32, seed=2)
    want_y, want_g = _peft_step(model, x)
    assert {n.split(".")[-2] for n in want_g} == {"default", "other"}
    y, got = patched_joint_step(model, x, NAMES, backend)
    assert rel_err(y, want_y) <= tol
    assert sorted(got) == sorted(want_g)
    for n in want_g:
        assert rel_err(got[n], want_g[n]) <= tol, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dropout_trains(backend):
    """With LoRA dropout the mask is ours (PEFT's nn.Dropout draws its own, and PEFT cannot
    backward a mixed batch over Linear4bit at all): eval outputs equal PEFT's, the same seed
    gives the same gradients, every adapter's factors get gradients, no fallback."""
    model = qlora_model(torch.float32, True, dropout=0.25)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q", "o"],
                                               lora_dropout=0.5, init_lora_weights=False))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    x = _x(torch.float32, seed=6)
    model.eval()
    with torch.no_grad():
        want = model(x, adapter_names=NAMES)
    with patch_peft_model(model, backend=backend), warnings.catch_warnings():
        warnings.simplefilter("error", LoRAKernelsFallbackWarning)
        model.train()
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            model.zero_grad(set_to_none=True)
            y = model(x, adapter_names=NAMES)
            (y.float() ** 2).mean().backward()
            runs.append(lora_grads(model))
        assert sorted(runs[0]) == sorted(runs[1]) and len(runs[0]) == 8
        assert all(torch.equal(runs[0][n], runs[1][n]) and runs[0][n].abs().sum() > 0
                   for n in runs[0])
        model.eval()
        with torch.no_grad():
            assert rel_err(model(x, adapter_names=NAMES), want) <= 1e-5


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
def test_patched_mixed_training_step_on_triton_makes_no_whole_weight():
    """W of q is 37×65 = 2405 elements, more than any other tensor of the step: PEFT's mixed
    forward (eval) dequantizes it (the detector works), the patched joint step never does."""
    model = two_adapter_model(torch.float32, True)
    x = torch.randn(len(NAMES), 1, K, generator=torch.Generator().manual_seed(4))
    with LargestTensor() as peft_step:
        want_y, want_g = _peft_step(model, x)
    assert peft_step.biggest >= HID * K
    model.train()
    with patch_peft_model(model, backend="triton"):
        with LargestTensor() as ours:
            model.zero_grad(set_to_none=True)
            y = model(x, adapter_names=NAMES)
            (y.float() ** 2).mean().backward()
    assert ours.biggest < HID * K
    assert rel_err(y.detach(), want_y) <= 1e-5
    got = lora_grads(model)
    assert all(rel_err(got[n], want_g[n]) <= 1e-5 for n in want_g)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_gpu_mixed_bf16_compute_matches_peft(nested):
    """CUDA bitsandbytes storage, bf16 compute, the Triton kernels: inference and joint
    training against PEFT's mixed forward."""
    model = two_adapter_model(torch.bfloat16, nested).cuda()
    x = _x(torch.float32, seed=5).cuda()
    want_y, want_g = _peft_step(model, x)
    model.train()
    with patch_peft_model(model, backend="triton"), warnings.catch_warnings():
        warnings.simplefilter("error", LoRAKernelsFallbackWarning)
        model.zero_grad(set_to_none=True)
        y = model(x, adapter_names=NAMES)
        (y.float() ** 2).mean().backward()
        got = lora_grads(model)
    assert rel_err(y.detach(), want_y) <= 3e-2
    for n in want_g:
        assert rel_err(got[n], want_g[n]) <= 3e-2, n
