"""The oracle itself, checked against hand-written float64 compositions (per token, per slice)."""

import pytest
import torch

from lora_kernels import reference as ref
from helpers import randn

F64 = torch.float64


def _per_token_multi(x, W, b, A, B, ids, s, ranks=None, out_slices=None):
    """The most literal statement of the contract: one token at a time."""
    R = B.shape[2]
    widths = out_slices or [W.shape[0]]
    rows = []
    for t in range(x.shape[0]):
        y = W @ x[t] + (b if b is not None else 0)
        i = int(ids[t])
        if i >= 0:
            col = 0
            parts = []
            for j, w in enumerate(widths):
                rk = R if ranks is None else int(ranks[i] if ranks.dim() == 1 else ranks[i, j])
                a = A[i, j * R:j * R + rk]
                bb = B[i, col:col + w, :rk]
                parts.append(s[i] * (bb @ (a @ x[t])))
                col += w
            y = y + torch.cat(parts)
        rows.append(y)
    return torch.stack(rows)


def test_lora_linear_matches_composition():
    x, W, b = randn(7, 37, dtype=F64), randn(19, 37, dtype=F64), randn(19, dtype=F64)
    A, B = randn(5, 37, dtype=F64), randn(19, 5, dtype=F64)
    y = ref.lora_linear(x, W, b, A, B, scaling=0.5)
    expect = x @ W.T + b + 0.5 * (x @ A.T @ B.T)
    assert torch.allclose(y, expect, rtol=1e-12, atol=1e-12)


def test_lora_linear_3d_input():
    x = randn(2, 3, 11, dtype=F64)
    W, A, B = randn(6, 11, dtype=F64), randn(2, 11, dtype=F64), randn(6, 2, dtype=F64)
    y = ref.lora_linear(x, W, None, A, B)
    assert y.shape == (2, 3, 6)
    assert torch.allclose(y[1, 2], W @ x[1, 2] + B @ (A @ x[1, 2]))


@pytest.mark.parametrize("ranks", [None, "1d", "2d"])
@pytest.mark.parametrize("slices", [None, [9, 4, 6]])
def test_multi_lora_matches_per_token(ranks, slices):
    T, K, N, S, R = 13, 23, 19, 4, 6
    n_sl = 1 if slices is None else len(slices)
    x, W, b = randn(T, K, dtype=F64), randn(N, K, dtype=F64), randn(N, dtype=F64)
    A, B = randn(S, n_sl * R, K, dtype=F64), randn(S, N, R, dtype=F64)
    ids = torch.tensor([0, -1, 3, 3, 1, 0, -1, 2, 2, 2, 1, -1, 3])
    s = torch.rand(S, dtype=F64) + 0.1
    rk = None
    if ranks == "1d":
        rk = torch.tensor([6, 1, 0, 3])
    elif ranks == "2d":
        rk = torch.randint(0, R + 1, (S, n_sl))
    y = ref.multi_lora_linear(x, W, b, A, B, ids, s, rk, slices)
    expect = _per_token_multi(x, W, b, A, B, ids, s, rk, slices)
    assert torch.allclose(y, expect, rtol=1e-12, atol=1e-10)
    # shrink + expand == the LoRA part
    xa = ref.lora_shrink(x, A, ids, s, rk, n_sl)
    y2 = ref.lora_expand(x @ W.T + b, xa, B, ids, rk, slices)
    assert torch.allclose(y2, expect, rtol=1e-12, atol=1e-10)
    assert (xa[ids == -1] == 0).all()


def test_cpu_kernels_match_oracle_single():
    x, W, b = randn(9, 21, dtype=F64), randn(14, 21, dtype=F64), randn(14, dtype=F64)
    A, B = randn(3, 21, dtype=F64, requires_grad=True), randn(14, 3, dtype=F64, requires_grad=True)
    x.requires_grad_(True)
    y_ref = ref.lora_linear(x, W, b, A, B, 0.7, 0.25, 11)
    y, xa = ref.lora_linear_forward(x, W, b, A, B, 0.7, 0.25, 11)
    assert torch.allclose(y, y_ref)
    dy = randn(9, 14, dtype=F64)
    g_ref = torch.autograd.grad(y_ref, (x, A, B), dy)
    dx, dw, db, da, dbb = ref.lora_linear_backward(dy, x, W, A, B, xa, 0.7, 0.25, 11,
                                                   (True, True, True, True, True))
    for got, want in zip((dx, da, dbb), g_ref):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    assert torch.allclose(dw, dy.T @ x) and torch.allclose(db, dy.sum(0))


def test_philox_mask_statistics_and_determinism():
    m1 = ref.dropout_keep_mask(1234, 300, 301, 0.3)
    m2 = ref.dropout_keep_mask(1234, 300, 301, 0.3)
    m3 = ref.dropout_keep_mask(1235, 300, 301, 0.3)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    keep = m1.double().mean().item()
    assert abs(keep - 0.7) < 0.01  # 90k draws: sd ≈ 0.0015
    # row_offset addresses the same counter stream
    assert torch.equal(ref.dropout_keep_mask(1234, 100, 301, 0.3, row_offset=200), m1[200:])
    assert ref.dropout_keep_mask(7, 4, 5, 0.0).all()


def test_philox_known_answer():
    # Philox4x32-10 with key 0 and counter 0: first word of the published test vector
    # (Salmon et al., Random123 kat_vectors: philox4x32_10 zero key -> 6627e8d5 ...).
    assert ref.philox_uint32(0, torch.tensor([0])).item() == 0x6627E8D5
    # all four words (mask v2 uses every one): Random123 kat_vectors, philox4x32_10, zero key
    # and counter -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    words = [w.item() for w in ref.philox4x32(0, torch.tensor([0]))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_mask_v2_lane_layout():
    """Mask v2 by hand: element (m, k) is 16-bit half k%2 of word (k%8)//2 of the Philox call
    on group counter m·ceil(cols/8) + k//8 (docs/BACKENDS.md, "Dropout")."""
    seed, rows, cols, p = 99, 3, 13, 0.4
    t = ref.keep_threshold(p)
    groups = (cols + 7) // 8
    want = torch.zeros(rows, cols, dtype=torch.bool)
    for m in range(rows):
        for k in range(cols):
            w = ref.philox4x32(seed, torch.tensor([m * groups + k // 8]))[(k % 8) // 2].item()
            want[m, k] = ((w >> (16 * (k % 2))) & 0xFFFF) >= t
    assert torch.equal(ref.dropout_keep_mask(seed, rows, cols, p), want)


def test_compiled_cpu_mask_is_bit_identical():
    """The torch backend's fast (inductor-compiled) Philox mask equals the oracle's, bit for bit,
    above and below the size where it switches to the compiled loop."""
    from lora_kernels.ops import cpu_dropout
    for seed, rows, cols, p, off in [(0, 300, 301, 0.3, 0), (2**63 + 11, 257, 300, 0.05, 3),
                                     (-3, 5, 7, 0.5, 0)]:
        want = ref.dropout_keep_mask(seed, rows, cols, p, row_offset=off)
        got = cpu_dropout.dropout_keep_mask(seed, rows, cols, p, row_offset=off)
        assert torch.equal(got, want)


def test_keep_threshold_matches_float_rule():
    for p in (0.0, 1e-9, 0.05, 0.1, 0.3, 0.5, 0.999999):
        t = ref.keep_threshold(p)
        assert t * 2.0**-16 >= p and (t - 1) * 2.0**-16 < p


def test_seed_int64_is_the_two_complement_of_the_masked_seed():
    for seed, want in [(5, 5), (2**64 - 1, -1), (2**63, -(2**63)), (-3, -3), (2**64 + 7, 7)]:
        assert ref.seed_int64(seed) == want
    # the same 64 bits key philox_uint32 whichever form the seed comes in
    c = torch.arange(10)
    for seed in (2**63 + 11, -3):
        assert torch.equal(ref.philox_uint32(ref.seed_int64(seed), c), ref.philox_uint32(seed, c))


def _counting(gen):
    calls = []

    def keep_mask(*args, **kwargs):
        calls.append(args)
        return gen(*args, **kwargs)
    return keep_mask, calls


def _single_case():
    x, W = randn(9, 21, dtype=F64, requires_grad=True), randn(14, 21, dtype=F64)
    A, B = randn(3, 21, dtype=F64, requires_grad=True), randn(14, 3, dtype=F64, requires_grad=True)
    return x, W, A, B, randn(9, 14, dtype=F64)


@pytest.mark.parametrize("needs", [(True, True, True, True, True), (True, False, False, False, True),
                                   (False, True, True, True, False)])
def test_single_backward_builds_one_mask(needs):
    """dx and dA drop on the same [M, K] grid: one keep-mask per backward, same gradients."""
    x, W, A, B, dy = _single_case()
    y_ref = ref.lora_linear(x, W, None, A, B, 0.7, 0.25, 11)
    g_ref = torch.autograd.grad(y_ref, (x, A, B), dy)
    keep_mask, calls = _counting(ref.dropout_keep_mask)
    _, xa = ref.lora_linear_forward(x, W, None, A, B, 0.7, 0.25, 11)
    dx, _, _, da, dbb = ref.lora_linear_backward(dy, x, W, A, B, xa, 0.7, 0.25, 11, needs,
                                                 keep_mask=keep_mask)
    assert len(calls) == (1 if needs[0] or needs[3] else 0)
    for got, want, need in zip((dx, da, dbb), g_ref, (needs[0], needs[3], needs[4])):
        assert (got is None) == (not need)
        if need:
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_ext_fp32_backward_builds_one_mask(monkeypatch):
    """The CUDA backend's float32 single-adapter backward is plain torch around the mask: run it
    on CPU with the reference mask standing in for the kernel's (bit-identical by contract)."""
    from lora_kernels import _ext
    from lora_kernels._ext import backend as ext_backend  # where lora_linear_bwd looks it up
    keep_mask, calls = _counting(ref.dropout_keep_mask)
    monkeypatch.setattr(ext_backend, "dropout_keep_mask", keep_mask)
    x, W, A, B, dy = _single_case()
    x32, W32, A32, B32, dy32 = (t.detach().float() for t in (x, W, A, B, dy))
    for p in (0.0, 0.25):
        calls.clear()
        y_ref = ref.lora_linear(x, W, None, A, B, 0.7, p, 11)
        g_ref = torch.autograd.grad(y_ref, (x, A, B), dy)
        xa = ref.lora_linear_forward(x32, W32, None, A32, B32, 0.7, p, 11)[1]
        dx, _, _, da, dbb = _ext.lora_linear_bwd(dy32, x32, W32, A32, B32, xa, 0.7, p, 11,
                                                 (True, False, False, True, True))
        assert len(calls) == (1 if p > 0 else 0)
        for got, want in zip((dx, da, dbb), g_ref):
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
