"""PEFT QLoRA (lora.Linear over a bitsandbytes NF4 ``Linear4bit``, what PEFT builds on CPU) as
the oracle for ``patch_peft_model``: outputs and LoRA gradients match, unpatch restores PEFT,
and the patched Triton training step holds no whole-weight (N×K) tensor."""

import pytest
import torch
from torch import nn

from helpers import (LargestTensor, check_patched_dropout_trains,
                     check_patched_step_matches_peft, interpreting, peft_step, rel_err)
from lora_kernels import patch_peft_model

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

K, HID = 65, 37  # q: [37, 65] (NF4 blocks straddle rows), o: [65, 37]


class Tiny(nn.Module):
    def __init__(self, compute_dtype, nested):
        super().__init__()
        mk = lambda i, o: bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=compute_dtype,
                                            quant_type="nf4", compress_statistics=nested)
        self.q, self.o = mk(K, HID), mk(HID, K)

    def forward(self, x):
        return self.o(torch.nn.functional.gelu(self.q(x)))


def qlora_model(compute_dtype, nested, dropout=0.0, seed=0, peft_bnb_class=False):
    torch.manual_seed(seed)
    model = Tiny(compute_dtype, nested).to(compute_dtype).to("cpu")  # quantizes
    if peft_bnb_class:
        model.is_loaded_in_4bit = True  # what transformers sets: PEFT picks lora.bnb.Linear4bit
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # keep bitsandbytes' portable layout (no AVX512-BF16 repack on eval forwards), so
            # the PEFT reference and our kernels read the same bytes
            m.support_avx512bf16_for_cpu = False
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o"], lora_dropout=dropout,
                          init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("peft_bnb_class", [False, True])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("compute_dtype,x_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    # QLoRA's usual setup: fp32 activations and LoRA factors, bf16 compute. PEFT runs the
    # low-rank term in fp32, we in bf16: bf16 rounding of that term.
    (torch.bfloat16, torch.float32, 2e-2),
    (torch.float16, torch.float16, 5e-3),
])
def test_patched_qlora_matches_peft(peft_bnb_class, nested, compute_dtype, x_dtype, tol):
    model = qlora_model(compute_dtype, nested, peft_bnb_class=peft_bnb_class)
    layer_cls = type(model.base_model.model.q)
    assert (layer_cls.__module__ == "peft.tuners.lora.bnb") == peft_bnb_class
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    check_patched_step_matches_peft(model, x, "torch", tol)


def test_patched_qlora_dropout_trains():
    """With dropout the mask is ours (PEFT's nn.Dropout draws its own): eval outputs equal
    PEFT's, training gives the same gradients for the same seed and every LoRA factor moves."""
    model = qlora_model(torch.float32, True, dropout=0.25)
    check_patched_dropout_trains(model, torch.randn(4, K, generator=torch.Generator().manual_seed(2)))


# Mixed batches (adapter_names=) over NF4, with and without dropout, are fused now:
# tests/test_peft_qlora_mixed.py.


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
def test_patched_qlora_step_on_triton_makes_no_whole_weight():
    """A whole W (N×K = 37·65 = 2405 elements) is bigger than every other tensor of the step
    (x 3×65, activations 3×37, codes 1203 bytes): PEFT's step makes one (the detector works),
    the patched Triton step makes none."""
    model = qlora_model(torch.float32, True)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(4))
    with LargestTensor() as theirs:
        want_y, want_g = peft_step(model, x)
    assert theirs.biggest >= HID * K
    with patch_peft_model(model, backend="triton"):
        with LargestTensor() as ours:
            y, g = peft_step(model, x)
    assert ours.biggest < HID * K
    assert rel_err(y, want_y) <= 1e-5
    assert all(rel_err(g[n], want_g[n]) <= 1e-5 for n in want_g)


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the Triton kernels on CPU")
def test_patched_qlora_step_on_the_slab_route_makes_no_whole_weight(monkeypatch):
    """The same probe with every NF4 layer on the slab route (lora_kernels/triton/nf4_slabs.py:
    threshold 1, a 16-row workspace budget): slabs of W are decoded (q's forward and dX, o's
    forward; o's K = 37 is too narrow for two 64-column slabs, its dX stays in the mainloop),
    none as big as W, and the step still matches PEFT's."""
    from lora_kernels.triton import nf4_slabs
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "1")
    monkeypatch.setattr(nf4_slabs, "SLAB_BYTES", 16 * K * 4)
    slabs = []
    real = nf4_slabs.decode_slab
    monkeypatch.setattr(nf4_slabs, "decode_slab",
                        lambda w, out, *cut: slabs.append((w.shape, cut)) or real(w, out, *cut))
    model = qlora_model(torch.float32, True)
    # x needs a gradient, so the first layer (q) runs its dX too
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    want_y, want_g = peft_step(model, x)
    with patch_peft_model(model, backend="triton"):
        with LargestTensor() as ours:
            y, g = peft_step(model, x)
    assert {(HID, K), (K, HID)} <= {shape for shape, _ in slabs}
    assert any(shape == (HID, K) and cut[:2] == (0, HID) and cut[2:] != (0, K)
               for shape, cut in slabs), "q's dX ran on column slabs"
    assert ours.biggest < HID * K
    assert rel_err(y, want_y) <= 1e-5
    assert all(rel_err(g[n], want_g[n]) <= 1e-5 for n in want_g)
