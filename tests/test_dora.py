"""DoRA: the op against the float64 oracle, the rank-sized norm against the direct one, the
modules, and patch_peft_model against PEFT's own DoRA (GPT-2 Conv1D and Llama Linear layers,
torch backend and Triton under the interpreter), plus the structure of a training step."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_kernels as lk
from helpers import TOL, f64, randn, rel_err, tiny_gpt2, triton_device
from lora_kernels import reference as ref
from lora_kernels.ops import dora as D
from lora_kernels.ops.lora_linear import draw_seed

M, K, N, R = 7, 13, 11, 5


def _inputs(dtype=torch.float64, bias=True, conv1d=False, seed=0, grad_w=False):
    g = torch.Generator().manual_seed(seed)
    x = randn(M, K, dtype=dtype, generator=g, requires_grad=True)
    w = randn(*((K, N) if conv1d else (N, K)), dtype=dtype, generator=g, requires_grad=grad_w)
    b = randn(N, dtype=dtype, generator=g) if bias else None
    a = randn(R, K, dtype=dtype, generator=g, scale=0.3, requires_grad=True)
    bb = randn(N, R, dtype=dtype, generator=g, scale=0.3, requires_grad=True)
    m = (torch.rand(N, generator=g, dtype=torch.float64) * 2 + 0.2).to(dtype).requires_grad_()
    return x, w, b, a, bb, m


def _grads(y, leaves, g):
    return torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)


def _oracle_check(backend, dtype, tol, *, bias=True, conv1d=False, p=0.0, grad_w=False,
                  keep_mask=None, scaling=0.7):
    x, w, b, a, bb, m = _inputs(dtype, bias, conv1d, grad_w=grad_w)
    w_op = w.t() if conv1d else w  # a Conv1D weight reaches the op as a transposed view
    torch.manual_seed(3)
    y = lk.dora_linear(x, w_op, b, a, bb, m, scaling=scaling, dropout_p=p, backend=backend)
    torch.manual_seed(3)
    seed = int(draw_seed()) if p > 0 else 0
    xs, ws, bs, as_, bbs, ms = (f64(t) for t in (x, w, b, a, bb, m))
    want = ref.dora_linear(xs, ws.t() if conv1d else ws, bs, as_, bbs, ms, scaling, p, seed,
                           keep_mask=keep_mask)
    assert rel_err(y, want) <= tol
    gy = randn(M, N, generator=torch.Generator().manual_seed(9))
    got = _grads(y, (x, w, a, bb, m), gy.to(dtype))
    exp = _grads(want, (xs, ws, as_, bbs, ms), gy.double())
    for name, u, v in zip(("x", "w", "a", "b", "m") if grad_w else ("x", "a", "b", "m"), got, exp):
        assert rel_err(u, v) <= tol, name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv1d", [False, True])
def test_torch_backend_float64_matches_oracle(bias, conv1d):
    _oracle_check("torch", torch.float64, 1e-12, bias=bias, conv1d=conv1d)


def test_torch_backend_dropout_and_trainable_weight():
    _oracle_check("torch", torch.float64, 1e-12, p=0.3, grad_w=True)
    _oracle_check("torch", torch.float32, TOL[torch.float32], p=0.25, conv1d=True)


def test_oracle_is_peft_composition():
    """reference.dora_linear is PEFT's formula: base + (c−1)·base + c·s·lora, direct norm."""
    x, w, b, a, bb, m = _inputs()
    norm = torch.linalg.norm(w + 0.7 * (bb @ a), dim=1).detach()
    c = (m / norm)[None, :]
    base = x @ w.t()
    want = base + b + (c - 1) * base + c * ((x @ a.t()) @ bb.t()) * 0.7
    assert rel_err(ref.dora_linear(x, w, b, a, bb, m, 0.7), want) <= 1e-14


def test_rank_sized_norm_matches_direct_norm_float64():
    x, w, b, a, bb, m = _inputs()
    for s in (0.0, 0.7, 3.0):
        direct = ref.dora_weight_norm(w, a, bb, s)
        assert rel_err(D.weight_norm(w, a, bb, s), direct) <= 1e-13
        assert rel_err(D.weight_norm(w.t().contiguous().t(), a, bb, s), direct) <= 1e-13


def test_norm_cancellation_is_clamped_and_documented():
    """A row of W0 cancelled by s·B·A: the expansion loses ~ε·‖W0‖²/‖W0+sBA‖² and clamps at 0."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, generator=g, dtype=torch.float64)
    bb = torch.randn(4, 2, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w[1] = -(bb[1] @ a)  # row 1: W0 + B·A = 0 exactly
    got = D.weight_norm(w, a, bb, 1.0)
    direct = ref.dora_weight_norm(w, a, bb, 1.0)
    assert direct[1] == 0 and got[1] >= 0 and got[1] <= 1e-6 * w[1].norm()
    keep = torch.arange(4) != 1
    assert rel_err(got[keep], direct[keep]) <= 1e-13


def test_zero_magnitude_column_gets_its_gradient():
    x, w, b, a, bb, m = _inputs()
    with torch.no_grad():
        m[3] = 0.0
    y = lk.dora_linear(x, w, b, a, bb, m, scaling=0.7, backend="torch")
    want = ref.dora_linear(*(f64(t) for t in (x, w, b, a, bb, m)), 0.7)
    gy = torch.randn(M, N, dtype=torch.float64)
    (dm,) = torch.autograd.grad(y, m, gy)
    ms = f64(m)
    (dm_ref,) = torch.autograd.grad(ref.dora_linear(f64(x), w, b, f64(a), f64(bb), ms, 0.7), ms, gy)
    assert rel_err(y, want) <= 1e-12 and dm[3] != 0 and rel_err(dm, dm_ref) <= 1e-12


def test_half_inputs_with_fp32_factors_and_magnitude():
    x, w, b, a, bb, m = _inputs(torch.float32)
    xh, wh, bh = x.detach().half().requires_grad_(), w.half(), b.half()
    y = lk.dora_linear(xh, wh, bh, a, bb, m, scaling=0.7, backend="torch")
    want = ref.dora_linear(f64(xh), f64(wh), f64(bh), f64(a), f64(bb), f64(m), 0.7)
    assert y.dtype == torch.float16 and rel_err(y, want) <= TOL[torch.float16]
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and m.grad.dtype == torch.float32


def test_empty_batch_and_inference_fast_path():
    x, w, b, a, bb, m = _inputs()
    y = lk.dora_linear(x[:0], w, b, a, bb, m, backend="torch")
    assert y.shape == (0, N)
    y.sum().backward()
    assert m.grad is not None and (m.grad == 0).all()
    with torch.no_grad():
        y = lk.dora_linear(x, w, b, a, bb, m, scaling=0.7)
    assert rel_err(y, ref.dora_linear(f64(x), w, b, f64(a), f64(bb), f64(m), 0.7)) <= 1e-12


def test_bad_input_names_the_argument():
    x, w, b, a, bb, m = _inputs(torch.float32)
    with pytest.raises(ValueError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, m[:-1])
    with pytest.raises(TypeError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, m.tolist())
    with pytest.raises(ValueError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, m[None])
    with pytest.raises(ValueError, match="weight_sq_norm"):
        lk.dora_linear(x, w, b, a, bb, m, weight_sq_norm=torch.ones(N + 1))
    with pytest.raises(ValueError, match="lora_b"):
        lk.dora_linear(x, w, b, a, bb[:, :-1], m)
    with pytest.raises(ValueError, match="dropout_p"):
        lk.dora_linear(x, w, b, a, bb, m, dropout_p=1.0)
    with pytest.raises(TypeError, match="training"):
        lk.dora_linear(x, w, b, a, bb, m, training=1)
    with pytest.raises(ValueError, match="backend"):
        lk.dora_linear(x, w, b, a, bb, m, backend="tpu")
    with pytest.raises(TypeError, match="use_dora"):
        lk.LoRALinear(4, 3, r=2, use_dora="yes")
    with pytest.raises(TypeError, match="use_dora"):
        lk.PackedLoRALinear(8, [4, 4], r=2, enable_lora=[True, False], use_dora=1)


# ------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, fp32): the column-scale epilogue in both forward modes
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("conv1d", [False, True])
def test_triton_matches_oracle(conv1d):
    dev = triton_device()
    if dev == "cuda":
        pytest.skip("GPU numerics run in the GPU suite")
    from lora_kernels.triton.dropout import dropout_keep_mask as triton_mask
    _oracle_check("triton", torch.float32, TOL[torch.float32], conv1d=conv1d)
    _oracle_check("triton", torch.float32, TOL[torch.float32], bias=False, p=0.3,
                  keep_mask=triton_mask)


@pytest.mark.skipif(triton_device() != "cpu", reason="interpreter only")
@pytest.mark.parametrize("mode", [1, 2])
def test_triton_kernel_modes(mode):
    from lora_kernels.triton.dora import dora_linear_fwd
    x, w, b, a, bb, m = (t.detach() if t is not None else t for t in _inputs(torch.float32))
    c = (m / D.weight_norm(w, a, bb, 0.7)).float()
    y, xa = dora_linear_fwd(x, w, b, a, bb, c, 0.7, mode=mode)
    assert rel_err(y, ref.dora_linear(f64(x), f64(w), f64(b), f64(a), f64(bb), f64(m), 0.7)) \
        <= TOL[torch.float32]
    assert rel_err(xa, f64(x) @ f64(a).t()) <= TOL[torch.float32]


@pytest.mark.skipif(triton_device() != "cpu", reason="interpreter only")
@pytest.mark.parametrize("bias", [True, False])
def test_triton_scale_grad_pass(bias):
    """The fused g = dy⊙c / Σ dy·(y − b) pass equals the torch backend's."""
    from lora_kernels.ops import torch_backend as TB
    from lora_kernels.triton.dora import dora_scale_grad
    g_ = torch.Generator().manual_seed(4)
    dy, y = randn(37, 45, generator=g_), randn(37, 45, generator=g_)
    b = randn(45, generator=g_) if bias else None
    c = torch.rand(45, generator=g_) + 0.5
    got = dora_scale_grad(dy, y, b, c, True, True)
    want = TB.dora_scale_grad(dy.double(), y.double(), None if b is None else b.double(),
                              c.double(), True, True)
    assert rel_err(got[0], want[0]) <= TOL[torch.float32]
    assert rel_err(got[1], want[1]) <= TOL[torch.float32]
    assert dora_scale_grad(dy, y, b, c, False, True)[0] is None
    assert dora_scale_grad(dy, y, b, c, True, False)[1] is None


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_linear_dora_forward_merge_unmerge(fan_in_fan_out):
    torch.manual_seed(0)
    lin = lk.LoRALinear(K, N, r=R, lora_alpha=7, use_dora=True, fan_in_fan_out=fan_in_fan_out,
                        dtype=torch.float64)
    with torch.no_grad():
        lin.lora_B.weight.normal_(std=0.3)
        lin.lora_magnitude_vector.mul_(torch.rand(N, dtype=torch.float64) + 0.5)
    assert lin.lora_magnitude_vector.shape == (N,)
    assert "lora_magnitude_vector" in lk.lora_state_dict(torch.nn.Sequential(lin)).__repr__()
    x = torch.randn(2, M, K, dtype=torch.float64)
    want = ref.dora_linear(x, lin.base_weight(), lin.bias, lin.lora_A.weight, lin.lora_B.weight,
                           lin.lora_magnitude_vector, lin.scaling)
    assert rel_err(lin(x), want) <= 1e-12
    w0 = lin.weight.detach().clone()
    lin.merge()
    assert rel_err(lin(x), want) <= 1e-12
    lin.unmerge()
    assert rel_err(lin.weight, w0) <= 1e-13
    lin(x).sum().backward()
    assert lin.lora_magnitude_vector.grad is not None and lin.lora_A.weight.grad is not None


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_packed_dora_is_dora_per_adapted_slice(fan_in_fan_out):
    torch.manual_seed(1)
    slices, enable = [4, 5, 6], [True, False, True]
    lin = lk.PackedLoRALinear(K, slices, r=3, enable_lora=enable, lora_alpha=5, use_dora=True,
                              fan_in_fan_out=fan_in_fan_out, dtype=torch.float64)
    with torch.no_grad():
        lin.lora_B.weight.normal_(std=0.3)
        lin.lora_magnitude_vector.mul_(torch.rand(10, dtype=torch.float64) + 0.5)
    assert lin.lora_magnitude_vector.shape == (10,)
    x = torch.randn(M, K, dtype=torch.float64)
    w, b = lin.base_weight(), lin.bias
    a, bb, m = lin.lora_A.weight, lin.lora_B.weight, lin.lora_magnitude_vector
    want = torch.cat([ref.dora_linear(x, w[:4], b[:4], a[:3], bb[:4], m[:4], lin.scaling),
                      torch.nn.functional.linear(x, w[4:9], b[4:9]),
                      ref.dora_linear(x, w[9:], b[9:], a[3:], bb[4:], m[4:], lin.scaling)], dim=1)
    y = lin(x)
    assert rel_err(y, want) <= 1e-12
    assert (lin.dora_magnitude().detach()[4:9] / lin.dora_weight_norm()[4:9] == 1).all()
    gy = torch.randn(M, 15, dtype=torch.float64)
    for got, exp in zip(torch.autograd.grad(y, (a, bb, m), gy),
                        torch.autograd.grad(want, (a, bb, m), gy)):
        assert rel_err(got, exp) <= 1e-12
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.merge()
        assert rel_err(lin(x), want) <= 1e-12
        lin.unmerge()
    assert rel_err(lin.weight, w0) <= 1e-13


def test_lora_linear_dora_init_is_the_base_model():
    base = torch.nn.Linear(K, N)
    lin = lk.LoRALinear.from_linear(base, r=R, use_dora=True)
    assert lin.weight is base.weight
    assert rel_err(lin.lora_magnitude_vector, base.weight.norm(dim=1)) <= 1e-6
    x = torch.randn(M, K)
    assert rel_err(lin(x), base(x)) <= 1e-6


# ------------------------------------------------------------------------------------------
# patch_peft_model against PEFT's own DoRA
# ------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=37,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _dora_model(kind, seed=0, adapters=("default",), dropout=0.0):
    if kind == "gpt2":
        base = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, vocab=37, n_positions=16, seed=seed)
        targets, fifo = ["c_attn", "c_proj", "c_fc"], True
    else:
        base = _tiny_llama(seed)
        targets, fifo = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], False
    cfgs = {}
    for i, name in enumerate(adapters):
        dora = not name.startswith("plain")
        cfgs[name] = peft.LoraConfig(r=3 + i, lora_alpha=6, target_modules=targets,
                                     fan_in_fan_out=fifo, init_lora_weights=False,
                                     use_dora=dora, lora_dropout=dropout)
    model = peft.get_peft_model(base, cfgs[adapters[0]], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfgs[name])
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial magnitudes: c far from 1
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand_like(p) + 0.5)
    return model


def _step(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, **kw).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _compare(model, ids, backend="torch", tol=1e-5, **kw):
    want, gwant = _step(model, ids, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.integrations.LoRAKernelsFallbackWarning)
        handle = lk.patch_peft_model(model, backend=backend)
        got, ggot = _step(model, ids, **kw)
    assert not handle.skipped
    assert rel_err(got, want) <= tol
    assert ggot.keys() == gwant.keys() and any("magnitude" in n for n in ggot)
    for n in gwant:
        assert rel_err(ggot[n], gwant[n]) <= 10 * tol, n
    return handle


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_dora_training_matches_peft(kind):
    model = _dora_model(kind).train()
    handle = _compare(model, torch.randint(0, 37, (2, 5)))
    handle.unpatch()


@pytest.mark.skipif(triton_device() != "cpu", reason="interpreter run")
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_dora_triton_matches_peft(kind):
    model = _dora_model(kind).train()
    _compare(model, torch.randint(0, 37, (1, 3)), backend="triton").unpatch()


def test_peft_dora_under_autocast_bf16_close_to_peft():
    model = _dora_model("llama").eval()
    ids = torch.randint(0, 37, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids).logits.float()
        with lk.patch_peft_model(model) as handle:
            got = model(ids).logits.float()
    assert not handle.skipped and rel_err(got, want) <= 2e-2


def test_peft_dora_dropout_matches_the_oracle_in_distribution():
    """With dropout the masks differ from PEFT's (ours is counter-based); eval is exact and the
    training step runs on the op (no fallback) with finite gradients."""
    model = _dora_model("gpt2", dropout=0.2)
    ids = torch.randint(0, 37, (2, 5))
    model.eval()
    want = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.integrations.LoRAKernelsFallbackWarning)
        handle = lk.patch_peft_model(model)
        assert rel_err(model(ids).logits, want) <= 1e-5
        model.train()
        _, grads = _step(model, ids)
    assert all(torch.isfinite(g).all() for g in grads.values())
    handle.unpatch()


def test_peft_dora_merge_unmerge_and_set_adapter():
    model = _dora_model("llama", adapters=("d1", "d2")).eval()
    ids = torch.randint(0, 37, (2, 5))
    outs = {}
    for a in ("d1", "d2"):
        model.set_adapter(a)
        outs[a] = model(ids).logits
    handle = lk.patch_peft_model(model)
    for a in ("d1", "d2"):
        model.set_adapter(a)
        assert rel_err(model(ids).logits, outs[a]) <= 1e-5
    model.merge_adapter()
    assert rel_err(model(ids).logits, outs["d2"]) <= 1e-5
    model.unmerge_adapter()
    assert rel_err(model(ids).logits, outs["d2"]) <= 1e-5
    handle.unpatch()


def test_peft_mixed_batch_dora_plain_and_base():
    """PEFT refuses DoRA in adapter_names; patched, each sample equals PEFT's output for that
    sample with its adapter alone active (the base model for "__base__")."""
    model = _dora_model("gpt2", adapters=("d1", "plain", "d2")).eval()
    ids = torch.randint(0, 37, (5, 4))
    names = ["d1", "plain", "__base__", "d2", "d1"]
    want = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want.append(model(ids[i:i + 1]).logits)
        else:
            model.set_adapter(name)
            want.append(model(ids[i:i + 1]).logits)
    want = torch.cat(want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.integrations.LoRAKernelsFallbackWarning)
        handle = lk.patch_peft_model(model)
        assert rel_err(model(ids, adapter_names=names).logits, want) <= 1e-5
    handle.unpatch()
    with pytest.raises(ValueError, match="DoRA"):  # last: PEFT leaves its hooks behind
        model(ids, adapter_names=names)


def test_peft_several_active_adapters():
    """DoRA first, plain after: fused. Plain first, DoRA after: PEFT's forward, with a warning."""
    model = _dora_model("llama", adapters=("d1", "plain")).eval()
    ids = torch.randint(0, 37, (2, 5))
    model.base_model.set_adapter(["d1", "plain"])
    want = model(ids).logits
    handle = lk.patch_peft_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.integrations.LoRAKernelsFallbackWarning)
        assert rel_err(model(ids).logits, want) <= 1e-5
    model.base_model.set_adapter(["plain", "d1"])
    handle.unpatch()
    want = model(ids).logits
    handle = lk.patch_peft_model(model)
    with pytest.warns(lk.integrations.LoRAKernelsFallbackWarning, match="rescales"):
        assert rel_err(model(ids).logits, want) <= 1e-6
    handle.unpatch()


def test_training_step_builds_no_weight_sized_temporary():
    """After the first step (which caches ‖W0‖²), no aten op in a training step's forward or
    backward outputs an N×K (or K×N) tensor of any DoRA layer, and no layer falls back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _dora_model("llama").train()
    layers = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")
              and len(m.lora_magnitude_vector)]
    weight_shapes = set()
    for m in layers:
        n, k = m.base_layer.weight.shape
        weight_shapes |= {(n, k), (k, n)}

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
                (args, kwargs)) if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # views (w.t(), reshapes) allocate nothing: only new storage counts
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    ids = torch.randint(0, 37, (3, 7))  # M = 21 rows: not a weight dimension
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.integrations.LoRAKernelsFallbackWarning)
        handle = lk.patch_peft_model(model)
        _step(model, ids)
        mode = Shapes()
        with mode:
            _step(model, ids)
    bad = [(f, s) for f, s in mode.seen if s in weight_shapes]
    assert not bad, bad[:5]
    assert len(handle.patched) == len(layers) and not handle.skipped
    handle.unpatch()


def test_packed_dora_saves_as_one_peft_dora_adapter(tmp_path):
    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Linear(K, 15))
    ours = torch.nn.Sequential(lk.PackedLoRALinear.from_linear(
        base[0], r=2, enable_lora=[True, False, True], lora_alpha=3, use_dora=True))
    with torch.no_grad():
        ours[0].lora_B.weight.normal_(std=0.3)
        ours[0].lora_magnitude_vector.mul_(torch.rand(10) + 0.5)
    x = torch.randn(M, K)
    want = ours(x)
    path = lk.save_peft_adapter(tmp_path / "packed", ours)
    fresh = torch.nn.Sequential(torch.nn.Linear(K, 15))
    fresh.load_state_dict(base.state_dict())
    assert rel_err(peft.PeftModel.from_pretrained(fresh, str(path))(x), want) <= 1e-5


def test_dora_adapter_files_round_trip_with_peft(tmp_path):
    """Ours -> file -> PEFT gives PEFT's DoRA the same function; PEFT's file -> load_peft_adapter
    keeps the magnitudes."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Tanh(), torch.nn.Linear(N, 6))
    ours = torch.nn.Sequential(lk.LoRALinear.from_linear(base[0], r=R, lora_alpha=4, use_dora=True),
                               base[1], lk.LoRALinear.from_linear(base[2], r=R, lora_alpha=4,
                                                                  use_dora=True))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
            elif "magnitude" in n:
                p.mul_(torch.rand_like(p) + 0.5)
    x = torch.randn(M, K)
    want = ours(x)
    path = lk.save_peft_adapter(tmp_path / "ours", ours)
    cfg, sd = lk.load_peft_adapter(path)
    assert cfg.use_dora and sum("lora_magnitude_vector" in k for k in sd) == 2
    fresh = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Tanh(), torch.nn.Linear(N, 6))
    fresh.load_state_dict({k: v for k, v in base.state_dict().items()})
    model = peft.PeftModel.from_pretrained(fresh, str(path))
    assert rel_err(model(x), want) <= 1e-5
    model.save_pretrained(str(tmp_path / "peft"))
    cfg2, sd2 = lk.load_peft_adapter(tmp_path / "peft")
    assert cfg2.use_dora and {k for k in sd2 if "magnitude" in k} == \
        {k for k in sd if "magnitude" in k}


def test_inference_reuses_the_norm_until_a_factor_changes(monkeypatch):
    """Eval without grad: the norm (its W0·Aᵀ pass over W0) is computed once per weight version;
    an in-place update of B is seen. Training recomputes it every call."""
    from lora_kernels.ops import torch_backend as TB
    calls = []
    orig = TB.dora_weight_a
    monkeypatch.setattr(TB, "dora_weight_a", lambda *a: calls.append(1) or orig(*a))
    lin = lk.LoRALinear(K, N, r=R, use_dora=True, dtype=torch.float64).eval()
    calls.clear()
    x = torch.randn(M, K, dtype=torch.float64)

    def want():
        return ref.dora_linear(x, lin.base_weight(), lin.bias, lin.lora_A.weight,
                               lin.lora_B.weight, lin.lora_magnitude_vector, lin.scaling)
    with torch.no_grad():
        lin(x)
        lin(x)
        assert len(calls) == 1
        lin.lora_B.weight.normal_()
        assert rel_err(lin(x), want()) <= 1e-12 and len(calls) == 2
    lin.train()
    lin(x)
    lin(x)
    assert len(calls) == 4
    model = _dora_model("llama").eval()
    ids = torch.randint(0, 37, (1, 3))
    with torch.no_grad():
        expect = model(ids).logits
        handle = lk.patch_peft_model(model)
        n_layers = len(handle.patched)
        calls.clear()
        model(ids)
        got = model(ids).logits
    assert len(calls) == n_layers and rel_err(got, expect) <= 1e-5
    handle.unpatch()
