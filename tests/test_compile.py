"""torch.compile(fullgraph=True) on CPU with inductor over our modules and a patched PEFT model
(fullgraph makes any graph break an error), and torch.library.opcheck over every registered
``lora_kernels::`` op with the torch backend."""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, rel_err, tiny_gpt2
from lora_kernels import LoRABatch, LoRALinear, MultiLoRALinear, PackedLoRALinear
from lora_kernels import reference as ref


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # One compile worker: the CI box has two cores, shared with other tests.
    old = torch._inductor.config.compile_threads
    torch._inductor.config.compile_threads = 1
    yield
    torch._inductor.config.compile_threads = old
    torch._dynamo.reset()


def _randomize_b(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def _check_fwd_bwd(module, *args):
    """Compiled and eager agree on the output and on every trainable gradient."""
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(*args)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    ref = module(*args)
    ref.square().sum().backward()
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert got and got.keys() == {n for n, p in module.named_parameters() if p.grad is not None}
    for n, p in module.named_parameters():
        if p.grad is not None:
            assert rel_err(got[n], p.grad) <= 1e-4, n
    return compiled


def test_compile_lora_linear_and_packed():
    lin = LoRALinear(13, 11, r=3, lora_alpha=6, lora_dropout=0.1)
    packed = PackedLoRALinear(13, [4, 5, 6], r=2, enable_lora=[True, False, True], lora_dropout=0.2)
    for m in (lin, packed):
        _randomize_b(m)
        m.eval()  # deterministic: dropout off, so compiled == eager
        x = torch.randn(2, 7, 13)
        compiled = _check_fwd_bwd(m, x)
        m.train()  # the dropout path compiles too (random masks, so no value comparison)
        y = compiled(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(m.lora_A.weight.grad).all()


def test_compile_lora_linear_dora():
    lin = LoRALinear(13, 11, r=3, lora_alpha=6, use_dora=True)
    _randomize_b(lin)
    _check_fwd_bwd(lin.eval(), torch.randn(2, 7, 13))


def test_compile_multi_lora_linear():
    ml = MultiLoRALinear(torch.nn.Linear(13, 11), num_slots=3, max_rank=4)
    ml.set_adapter(0, torch.randn(4, 13), torch.randn(11, 4), 0.5)
    ml.set_adapter(2, torch.randn(2, 13), torch.randn(11, 2), 2.0)
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, -1, 2, 2, 0, 1, 2]), 3)
    _check_fwd_bwd(ml, torch.randn(7, 13), batch)


class _Logits(torch.nn.Module):  # the PeftModel itself, returning a tensor
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).logits


def _check_patched_peft_gpt2(**lora_config):
    """A patched tiny GPT-2 PeftModel (c_attn and c_proj adapted, random B) compiles and
    matches eager, forward and backward."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_kernels import patch_peft_model
    base = tiny_gpt2(n_layer=1, n_embd=32, n_head=4, vocab=97, n_positions=32, seed=0)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        init_lora_weights=False, **lora_config))
    handle = patch_peft_model(model)
    ids = torch.randint(0, 97, (2, 9))
    _check_fwd_bwd(_Logits(model).train(), ids)
    handle.unpatch()


def test_compile_patched_peft_model():
    _check_patched_peft_gpt2(rank_pattern={"h.0.attn.c_attn": 6})


def test_compile_patched_peft_dora_model():
    _check_patched_peft_gpt2(use_dora=True)


# ------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch - for every op
# ------------------------------------------------------------------------------------------
def _batch_args():
    batch = LoRABatch.from_adapter_ids(torch.tensor([0, -1, 2, 2, 0, 1, -1]), 3)
    return list(batch.tensors()), batch.host_ints()


def _moe_args(r):
    """Samples of the MoE-LoRA ops: 5 experts (expert 2 empty), top-2 with a repeated expert,
    per-token and per-pair x."""
    from lora_kernels.ops.moe_lora import moe_plan
    E, T, k, K, N, R = 5, 7, 2, 13, 11, 3
    ids = torch.tensor([[3, 3], [0, 1], [4, 0], [1, 1], [0, 4], [3, 1], [4, 4]])
    plan = moe_plan(ids, E)
    x, xp, w = r(T, K, grad=True), r(T * k, K, grad=True), r(E, N, K)
    A, B = r(E, R, K, grad=True), r(E, N, R, grad=True)
    u = torch.randn(T * k, R)
    from lora_kernels.ops.moe_lora import moe_multi_plan
    S = 3
    mplan = moe_multi_plan(ids, torch.tensor([0, -1, 2, 2, 1, -1, 0]), E, S)
    MA, MB, sc = r(S, E, R, K), r(S, E, N, R), torch.tensor([0.5, 1.0, 2.0])
    return {
        "moe_multi_lora_linear": [(x.detach(), w, MA, MB, sc, *mplan, k, "torch"),
                                  (xp.detach(), w, MA, MB, sc, *mplan, 1, "torch")],
        "moe_lora_linear": [(x, w, A, B, *plan, k, 0.5, "torch"),
                            (xp, w, A, B, *plan, 1, 2.0, "torch")],
        "moe_lora_linear_backward": [
            (r(T * k, N), x.detach(), w, A.detach(), B.detach(), u, *plan, k, 0.5,
             [True, True, True], "torch"),
            (r(T * k, N), xp.detach(), w, A.detach(), B.detach(), u, *plan, 1, 2.0,
             [False, True, False], "torch")],
    }


def _samples():
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g).requires_grad_(grad)
    T, K, N, R, S = 7, 13, 11, 4, 3
    x, w, b = r(T, K, grad=True), r(N, K, grad=True), r(N, grad=True)
    a1, b1 = r(3, K, grad=True), r(N, 3, grad=True)
    seed = torch.tensor(1234, dtype=torch.int64)
    xa1 = (x @ a1.t()).detach()
    bt, ints = _batch_args()
    A, B = r(S, R, K, grad=True), r(S, N, R, grad=True)
    A2, B2 = r(S, 2 * R, K), r(S, N, R)
    sc = torch.tensor([0.5, 1.0, 2.0])
    ranks = torch.tensor([4, 0, 2], dtype=torch.int32)
    ranks2 = torch.tensor([[4, 1], [0, 0], [2, 3]], dtype=torch.int32)
    xa_multi = torch.randn(T, R, generator=g)
    mag, wsq = r(N, grad=True), w.detach().norm(dim=1).square()
    dnorm = (w.detach() + 0.5 * (b1 @ a1).detach()).norm(dim=1)
    y_pre = torch.randn(T, N, generator=g)
    moe = _moe_args(r)
    return {
        **moe,
        "dora_linear": [
            (x, w, b, a1, b1, mag, wsq, None, 0.5, 0.0, None, "torch"),
            (x, w.detach(), None, a1, b1, mag, wsq, None, 2.0, 0.3, seed, "torch"),  # dropout
            (x, w.detach(), b, a1, b1, mag, None, dnorm, 0.5, 0.0, None, "torch"),  # cached norm
        ],
        "dora_linear_backward": [
            (r(T, N), x.detach(), w.detach(), b.detach(), a1.detach(), b1.detach(), mag.detach(),
             xa1, dnorm, y_pre, 0.5, 0.0, None, [True, True, True, True, True, True], "torch"),
            (r(T, N), x.detach(), w.detach(), None, a1.detach(), b1.detach(), mag.detach(), xa1,
             dnorm, y_pre, 0.5, 0.3, seed, [True, False, False, True, False, True], "torch"),
        ],
        "lora_linear": [
            (x, w, b, a1, b1, 0.5, 0.0, None, "torch"),
            (x, w, None, a1, b1, 2.0, 0.3, seed, "torch"),
            (x, w, b, a1, b1, 0.5, 0.25, seed, "torch"),  # bias and dropout together
        ],
        "lora_linear_backward": [
            (r(T, N), x.detach(), w.detach(), a1.detach(), b1.detach(), xa1, 0.5, 0.0, None,
             [True, True, True, True, True], "torch"),
            (r(T, N), x.detach(), w.detach(), a1.detach(), b1.detach(), xa1, 0.5, 0.3, seed,
             [True, False, False, True, False], "torch"),
            (r(T, N), x.detach(), w.detach(), a1.detach(), b1.detach(), xa1, 0.5, 0.25, seed,
             [True, False, False, True, True], "torch"),
            # the forward's packed keep mask (#13 item 4) read instead of a redraw
            (r(T, N), x.detach(), w.detach(), a1.detach(), b1.detach(), xa1, 0.5, 0.25, seed,
             [True, False, False, True, True], "torch",
             ref.dropout_keep_packed(int(seed), T, x.shape[1], 0.25)),
        ],
        "multi_lora_linear": [
            (x, w, b, A, B, sc, ranks, *bt, ints, None, True, "torch"),
            (x.detach(), w.detach(), None, A2, B2, sc, ranks2, *bt, ints, [5, 6], False, "torch"),
            (x, w.detach(), None, A, B, sc, ranks, *bt, ints, None, True, "torch"),
        ],
        "multi_lora_linear_backward": [
            (r(T, N), x.detach(), w.detach(), A.detach(), B.detach(), xa_multi, sc, ranks, *bt,
             ints, None, [True, True, True, True, True], "torch"),
            (r(T, N), x.detach(), w.detach(), A2, B2, torch.randn(T, 2 * R, generator=g), sc,
             ranks2, *bt, ints, [5, 6], [True, False, False, False, True], "torch"),
            (r(T, N), x.detach(), w.detach(), A.detach(), B.detach(), xa_multi, sc, ranks, *bt,
             ints, None, [True, False, False, True, True], "torch"),
        ],
        "multi_lora_linear_dropout": [
            (x, w, b, A, B, sc, ranks, *bt, ints, None, [0.3, 0.0, 0.5], seed, True, "torch"),
            (x.detach(), w.detach(), None, A2, B2, sc, ranks2, *bt, ints, [5, 6],
             [0.25, 0.25, 0.25], seed, False, "torch"),
        ],
        "multi_lora_linear_dropout_backward": [
            (r(T, N), x.detach(), w.detach(), A.detach(), B.detach(), xa_multi, sc, ranks, *bt,
             ints, None, [0.3, 0.0, 0.5], seed, [True, True, True, True, True], "torch"),
            (r(T, N), x.detach(), w.detach(), A2, B2, torch.randn(T, 2 * R, generator=g), sc,
             ranks2, *bt, ints, [5, 6], [0.25, 0.25, 0.25], seed,
             [True, False, False, True, True], "torch"),
        ],
        **_quant_multi_samples(r, x, A, B, A2, B2, sc, ranks, ranks2, bt, ints, seed),
        "lora_linear_nf4": _nf4_samples(r, x, b1, seed)[0],
        "lora_linear_nf4_backward": _nf4_samples(r, x, b1, seed)[1],
        "lora_linear_fp8": _fp8_samples(r, x, b1, seed)[0],
        "lora_linear_fp8_backward": _fp8_samples(r, x, b1, seed)[1],
        "lora_shrink": [
            (x.detach(), A.detach(), sc, ranks, *bt, ints, 1, "torch"),
            (x.detach(), A2, None, ranks2, *bt, ints, 2, "torch"),
        ],
        "lora_expand": [
            (r(T, N), xa_multi, B.detach(), ranks, *bt, ints, None, "torch"),
            (r(T, N), torch.randn(T, 2 * R, generator=g), B2, ranks2, *bt, ints, [5, 6], "torch"),
        ],
    }


def _nf4_samples(r, x, b1, seed):
    """NF4 storage built by hand (random codes and scales: opcheck needs no bitsandbytes) for
    W [11, 13] (143 elements: blocks straddle rows), plain and nested absmax."""
    from lora_kernels.ops.lora_linear_nf4 import op_args
    from lora_kernels.ops.nf4 import NF4Weight
    g = torch.Generator().manual_seed(3)
    N, K = 11, 13
    codes = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, generator=g)
    code = torch.linspace(-1, 1, 16)
    plain = NF4Weight(codes=codes, absmax=torch.rand(3, generator=g) + 0.5, code=code,
                      shape=(N, K), dtype=torch.float32, blocksize=64)
    nested = NF4Weight(codes=codes, absmax=torch.randint(0, 256, (3,), dtype=torch.uint8,
                                                          generator=g),
                       code=code, shape=(N, K), dtype=torch.float32, blocksize=64,
                       absmax2=torch.rand(1, generator=g) + 0.5,
                       code2=torch.linspace(-1, 1, 256), offset=0.3, blocksize2=256)
    xd, bd = x.detach(), r(N, grad=True)
    a1, bb = r(3, K, grad=True), b1
    fwd = [op_args(x, plain, bd, a1, bb, 0.5, 0.0, None, "torch"),
           op_args(x, nested, None, a1, bb, 2.0, 0.3, seed, "torch")]
    xa = (xd @ a1.detach().t())
    dy = r(7, N)

    def bwd(w, p, sd, needs):
        head = op_args(xd, w, None, a1.detach(), bb.detach(), 0.5, p, sd, "torch")
        return (dy, xd, *head[1:11], a1.detach(), bb.detach(), xa, 0.5, p, sd, needs, "torch")
    return fwd, [bwd(plain, 0.0, None, [True, True, True, True]),
                 bwd(nested, 0.3, seed, [True, False, True, False])]


def _quant_multi_samples(r, x, A, B, A2, B2, sc, ranks, ranks2, bt, ints, seed):
    """The multi-adapter ops over a quantized base: an FP8 W [11, 13] and a hand-made nested
    NF4 one (tests/test_quant_multi_lora.py checks the numbers)."""
    from lora_kernels.ops.fp8 import quantize_fp8
    from lora_kernels.ops.multi_lora_quant import _parts
    from lora_kernels.ops.nf4 import NF4Weight
    g = torch.Generator().manual_seed(5)
    N, K = 11, 13
    q = quantize_fp8(torch.randn(N, K, generator=g))
    # the e4m3 bytes as uint8 (the op takes either): opcheck's CPU checks have no float8 math
    fp8 = _parts(type(q)(codes=q.codes.view(torch.uint8), scale=q.scale))
    nf4 = _parts(NF4Weight(
        codes=torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, generator=g),
        absmax=torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g),
        code=torch.linspace(-1, 1, 16), shape=(N, K), dtype=torch.float32, blocksize=64,
        absmax2=torch.rand(1, generator=g) + 0.5, code2=torch.linspace(-1, 1, 256),
        offset=0.3, blocksize2=256))
    T, R = x.shape[0], B.shape[2]
    xd = x.detach()
    return {
        "multi_lora_linear_quant": [
            (x, *fp8, r(N, grad=True), A, B, sc, ranks, *bt, ints, None, True, None, None,
             "torch"),
            (xd, *nf4, None, A2, B2, sc, ranks2, *bt, ints, [5, 6], False, None, None, "torch"),
            (x, *nf4, None, A, B, sc, ranks, *bt, ints, None, True, [0.3, 0.0, 0.5], seed,
             "torch"),  # dropout
        ],
        "multi_lora_linear_quant_backward": [
            (r(T, N), xd, *fp8, A.detach(), B.detach(), torch.randn(T, R, generator=g), sc,
             ranks, *bt, ints, None, [True, True, True, True], None, None, "torch"),
            (r(T, N), xd, *nf4, A2, B2, torch.randn(T, 2 * R, generator=g), sc, ranks2, *bt,
             ints, [5, 6], [True, False, False, True], None, None, "torch"),
            (r(T, N), xd, *fp8, A.detach(), B.detach(), torch.randn(T, R, generator=g), sc,
             ranks, *bt, ints, None, [True, True, True, True], [0.3, 0.0, 0.5], seed,
             "torch"),
        ],
    }


def _fp8_samples(r, x, b1, seed):
    """An e4m3 W [11, 13] with per-row scales (codes as their uint8 bytes, as the op takes them)."""
    from lora_kernels.ops.fp8 import quantize_fp8
    from lora_kernels.ops.lora_linear_fp8 import op_args
    g = torch.Generator().manual_seed(4)
    w = quantize_fp8(torch.randn(11, 13, generator=g))
    xd, a1, dy = x.detach(), r(3, 13, grad=True), r(7, 11)
    fwd = [op_args(x, w, r(11, grad=True), a1, b1, 0.5, 0.0, None, "torch"),
           op_args(x, w, None, a1, b1, 2.0, 0.3, seed, "torch"),
           op_args(x, w, r(11, grad=True), a1, b1, 0.5, 0.0, None, "torch", "e4m3_per_token")]
    xa = xd @ a1.detach().t()

    def bwd(p, sd, needs):
        head = op_args(xd, w, None, a1.detach(), b1.detach(), 0.5, p, sd, "torch")
        return (dy, xd, head[1], head[2], a1.detach(), b1.detach(), xa, 0.5, p, sd, needs,
                "torch")
    return fwd, [bwd(0.0, None, [True, True, True, True]),
                 bwd(0.3, seed, [True, False, True, False])]


def _registered_ops():
    # The CUDA extension's kernel-level ops (cuda_*) have no CPU kernel to opcheck here; their
    # schemas and fake kernels are checked in tests/test_ext.py, their numerics on a GPU.
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("lora_kernels::") and not n.startswith("lora_kernels::cuda_"))


def test_every_registered_op_has_an_opcheck_sample():
    missing = set(_registered_ops()) - set(_samples())
    assert not missing, f"add opcheck samples to tests/test_compile.py for: {sorted(missing)}"


@pytest.mark.parametrize("op", _registered_ops())
def test_opcheck(op):
    samples = _samples().get(op)
    if samples is None:
        pytest.fail(f"no opcheck sample for lora_kernels::{op}")
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.lora_kernels, op).default, args)


def test_compile_lora_linear_nf4():
    """The NF4 op traces as one custom op (fake kernel, autograd) under fullgraph."""
    from lora_kernels.ops.lora_linear_nf4 import lora_linear_nf4
    fwd, _ = _nf4_samples(lambda *s, grad=False: torch.randn(*s).requires_grad_(grad),
                          torch.randn(7, 13), torch.randn(11, 3), None)
    (_, codes, absmax, code, absmax2, code2, offset, shape, wdtype, bs, bs2, *_rest) = fwd[1]
    from lora_kernels.ops.nf4 import NF4Weight
    w = NF4Weight(codes=codes, absmax=absmax, code=code, shape=tuple(shape), dtype=wdtype,
                  blocksize=bs, absmax2=absmax2, code2=code2, offset=offset, blocksize2=bs2)

    class NF4LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(3, 13) * 0.3)
            self.b = torch.nn.Parameter(torch.randn(11, 3) * 0.3)
            self.bias = torch.nn.Parameter(torch.randn(11))

        def forward(self, x):
            return lora_linear_nf4(x, w, self.bias, self.a, self.b, scaling=0.5)
    _check_fwd_bwd(NF4LoRA(), torch.randn(2, 7, 13))
