"""The packed 1-bit dropout mask (issue #13 item 4): written once by the forward, read by the
backward's dX epilogue and dA instead of a Philox redraw.

Bits are the v2 mask packed (uint8 ``[M, ceil(K/8)]``, byte g bit j = column 8g + j, LSB
first, padding 0): reference pack/unpack, Triton's in-kernel bytes and the known answer from
Random123's published Philox vector; then the op end to end in the interpreter (fp32/fp16
against float64, every gradient, bits saved vs redrawn, checkpointing).
"""

import importlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lora_kernels as lk
from lora_kernels import reference as ref

triton_dropout = pytest.importorskip("lora_kernels.triton.dropout")
op_mod = importlib.import_module("lora_kernels.ops.lora_linear")  # the module, not the function

# odd sizes (partial bytes, partial tiles), seeds past 2^63, row offsets
GRID_CASES = [(5, 37, 0.1, 3, 0), (17, 130, 0.5, 2**63 + 5, 3), (3, 8, 0.05, 7, 0),
              (2, 1, 0.5, 1, 9), (33, 257, 0.05, 12345, 1)]


def test_packed_known_answer():
    # seed 0, counter 0: Philox4x32-10 words 6627e8d5 e169c58d bc57ac4c 9b00dbd8 (Random123
    # kat_vectors). Halves (j = 2·word + half): e8d5 6627 c58d e169 ac4c bc57 dbd8 9b00; at
    # p = 0.75 (threshold 0xC000) lanes 0, 2, 3, 6 are kept -> byte 0b01001101 = 0x4D.
    assert ref.keep_threshold(0.75) == 0xC000
    assert ref.dropout_keep_packed(0, 1, 8, 0.75).tolist() == [[0x4D]]
    assert ref.dropout_keep_packed(0, 1, 6, 0.75).tolist() == [[0x0D]]  # padding bits are 0
    assert triton_dropout.dropout_keep_packed(0, 1, 8, 0.75).tolist() == [[0x4D]]
    assert triton_dropout.dropout_keep_packed(0, 1, 6, 0.75).tolist() == [[0x0D]]


@pytest.mark.parametrize("rows,cols,p,seed,off", GRID_CASES)
def test_pack_unpack_round_trip(rows, cols, p, seed, off):
    keep = ref.dropout_keep_mask(seed, rows, cols, p, row_offset=off)
    bits = ref.pack_keep_bits(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (rows, (cols + 7) // 8)
    assert torch.equal(ref.unpack_keep_bits(bits, cols), keep)
    if cols % 8:
        assert not (bits[:, -1].to(torch.int64) >> (cols % 8)).any()  # padding bits cleared
    # bit j of byte g is column 8g + j, by hand
    m, k = rows - 1, cols - 1
    assert bool((int(bits[m, k // 8]) >> (k % 8)) & 1) == bool(keep[m, k])


@pytest.mark.parametrize("rows,cols,p,seed,off", GRID_CASES)
def test_triton_bits_equal_reference_bits(rows, cols, p, seed, off):
    want = ref.dropout_keep_packed(seed, rows, cols, p, row_offset=off)
    got = triton_dropout.dropout_keep_packed(seed, rows, cols, p, row_offset=off)
    assert torch.equal(got, want)


def test_packed_without_dropout_keeps_all():
    got = triton_dropout.dropout_keep_packed(3, 2, 11, 0.0)
    assert got.tolist() == [[0xFF, 0x07]] * 2
    assert torch.equal(got, ref.pack_keep_bits(torch.ones(2, 11, dtype=torch.bool)))


@pytest.mark.parametrize("M,K,r", [(37, 45, 5), (19, 300, 80)])  # r = 80: several rank blocks
def test_shrink_writes_the_bits_and_reduce_reads_them(M, K, r):
    from lora_kernels.triton.lowrank import reduce_rows, shrink
    torch.manual_seed(0)
    p, seed = 0.3, 2**63 + 9
    x = torch.randn(M, K)
    a = torch.randn(r, K)
    bits = torch.full((M, (K + 7) // 8), 0xAA, dtype=torch.uint8)
    u = shrink(x, a, torch.empty(M, r), p, seed, keep_bits=bits)
    assert torch.equal(bits, ref.dropout_keep_packed(seed, M, K, p))
    xd = ref.apply_dropout(x.double(), seed, p)
    torch.testing.assert_close(u.double(), xd @ a.double().t(), rtol=1e-4, atol=1e-4)
    dyb = torch.randn(M, r)
    want = (xd.t() @ dyb.double()) * 0.7
    from_bits = reduce_rows(x, dyb, torch.empty(K, r), 0.7, p, seed, keep_bits=bits)
    # the seed is ignored when bits are read: a wrong seed proves the bits are used
    from_wrong_seed = reduce_rows(x, dyb, torch.empty(K, r), 0.7, p, seed + 1, keep_bits=bits)
    redrawn = reduce_rows(x, dyb, torch.empty(K, r), 0.7, p, seed)
    torch.testing.assert_close(from_bits.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(from_bits, from_wrong_seed) and torch.equal(from_bits, redrawn)


@pytest.mark.parametrize("schedule,store,M", [(None, None, 29), ("split_k", "pointer", 5),
                                               ("persistent", "pointer", 29),
                                               ("persistent", "tma", 32)])
def test_dx_epilogue_reads_the_bits(schedule, store, M):
    from lora_kernels.triton.fused_gemm import fused_gemm
    from lora_kernels.triton.gemm.modes import LoraMode
    torch.manual_seed(1)
    N, K, r, p, seed, s = 24, 40 if store == "tma" else 43, 3, 0.5, 77, 1.3
    dy, w, dyb, a = torch.randn(M, N), torch.randn(N, K), torch.randn(M, r), torch.randn(r, K)
    bits = ref.dropout_keep_packed(seed, M, K, p)
    small = 16 if schedule == "split_k" else 0
    run = lambda sd, kb: fused_gemm(dy, w.t(), torch.empty(M, K), lora=LoraMode.SEEDED, u=dyb,
                                    lb=a.t(), scaling=s, dropout_p=p, seed=sd, keep_bits=kb,
                                    schedule=schedule, store=store, small_m_max=small)
    got = run(seed + 1, bits)  # wrong seed: only the bits can give the right mask
    want = dy.double() @ w.double() + ref.apply_keep(s * dyb.double() @ a.double(),
                                                     ref.unpack_keep_bits(bits, K), p)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, run(seed, None))


def _leaves(M, K, N, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype).requires_grad_()
    return mk(M, K), mk(N, K), mk(N), mk(r, K), mk(N, r)


def _grads(y, dy, leaves):
    return torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_op_saves_bits_and_matches_float64(p, dtype, tol, backend):
    M, K, N, r, seed, s = 21, 45, 19, 6, -(2**62) - 3, 1.7
    leaves = _leaves(M, K, N, r, dtype)
    y = lk.lora_linear(*leaves, scaling=s, dropout_p=p, dropout_seed=seed, backend=backend)
    # the packed mask is what autograd saved (not x·keep): 1 bit per element of x
    saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.dtype == torch.uint8]
    assert len(saved) == 1 and torch.equal(saved[0], ref.dropout_keep_packed(seed, M, K, p))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = _grads(y, dy, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = ref.lora_linear(*ref_leaves, scaling=s, dropout_p=p, seed=seed)
    want = _grads(y_ref, dy.double(), ref_leaves)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    for gg, gw in zip(got, want):
        torch.testing.assert_close(gg.double(), gw, rtol=tol, atol=tol * 4)
    keep = ref.unpack_keep_bits(saved[0], K)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.1  # 945 draws
    # same mask forward and backward: dA has no contribution from dropped x elements
    # (one column of x perturbed only where dropped leaves dA unchanged)
    x2 = leaves[0].detach().clone()
    x2[~keep] += 3.0
    y2 = lk.lora_linear(x2, *leaves[1:], scaling=s, dropout_p=p, dropout_seed=seed,
                        backend=backend)
    torch.testing.assert_close(y2 - x2.to(y2.dtype) @ leaves[1].t(),
                               y - leaves[0] @ leaves[1].t(), rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bits_path_equals_redraw_path(backend, monkeypatch):
    """Reading the bits gives the same gradients, bit for bit, as redrawing the mask."""
    M, K, N, r, p, seed = 19, 37, 13, 4, 0.3, 99
    leaves = _leaves(M, K, N, r, torch.float32, 3)
    dy = torch.randn(M, N)
    y = lk.lora_linear(*leaves, scaling=0.9, dropout_p=p, dropout_seed=seed, backend=backend)
    with_bits = _grads(y, dy, leaves)
    monkeypatch.setattr(op_mod, "_bits_shape", lambda x, dp, b: (0,))
    y = lk.lora_linear(*leaves, scaling=0.9, dropout_p=p, dropout_seed=seed, backend=backend)
    assert not any(t is not None and t.dtype == torch.uint8 for t in y.grad_fn.saved_tensors)
    redrawn = _grads(y, dy, leaves)
    for a, b in zip(with_bits, redrawn):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpoint_recompute_matches(backend):
    M, K, N, r, p, seed = 17, 29, 11, 3, 0.1, 4242
    leaves = _leaves(M, K, N, r, torch.float32, 4)
    dy = torch.randn(M, N)
    fn = lambda *t: lk.lora_linear(*t, scaling=1.1, dropout_p=p, dropout_seed=seed,
                                   backend=backend)
    plain = _grads(fn(*leaves), dy, leaves)
    ckpt = _grads(checkpoint(fn, *leaves, use_reentrant=False), dy, leaves)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_custom_op_path_saves_bits_and_opchecks():
    """The custom op (torch.compile / opcheck path) returns the bits as a third output and its
    backward op takes them; the fake kernels agree on shapes."""
    M, K, N, r, p = 9, 21, 7, 3, 0.5
    x, w, b, a, bb = (t.detach() for t in _leaves(M, K, N, r, torch.float32, 6))
    seed = torch.tensor(123)
    y, xa, bits = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 1.0, p, seed, "triton")
    assert torch.equal(bits, ref.dropout_keep_packed(123, M, K, p))
    _, _, none = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 1.0, 0.0, None, "triton")
    assert none.shape == (0,)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear.default,
                          (x, w, b, a, bb, 1.0, p, seed, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    dy = torch.randn(M, N)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_backward.default,
                          (dy, x, w, a, bb, xa, 1.0, p, seed, [True, True, True, True, True],
                           "torch", bits), test_utils=("test_schema", "test_faketensor"))


def test_bad_keep_bits_rejected():
    with pytest.raises(ValueError, match="keep_bits"):
        ref.check_keep_bits(torch.zeros(3, 2, dtype=torch.int8), 3, 9, "cpu")
    with pytest.raises(ValueError, match="keep_bits"):
        ref.check_keep_bits(torch.zeros(3, 1, dtype=torch.uint8), 3, 9, "cpu")
    with pytest.raises(TypeError, match="keep_bits"):
        ref.check_keep_bits([1, 2], 3, 9, "cpu")
    ref.check_keep_bits(torch.zeros(3, 2, dtype=torch.uint8), 3, 9, "cpu")


# ---- GPU only (skipped here): bf16/fp16 at benchmark-like sizes, every path of the op ----------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r,p", [(17, 1000, 1003, 13, 0.1), (2048, 4096, 4096, 16, 0.1),
                                       (4099, 1032, 2056, 64, 0.5)])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bits_saved_and_gradients_match_redraw(M, K, N, r, p, dtype, backend, monkeypatch):
    """On a GPU: Triton's forward writes the reference's bits; gradients read from them equal
    the redrawn ones bit for bit (persistent/TMA dX, split dA); CUDA saves none and redraws."""
    from lora_kernels.ops import backend as B
    if not B.available(backend, "cuda"):
        pytest.skip(B._why_unavailable(backend, "cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g, device="cuda") * 0.3).to(dtype).requires_grad_()
    leaves = mk(M, K), mk(N, K), mk(N), mk(r, K), mk(N, r)
    dy = torch.randn(M, N, generator=g, device="cuda").to(dtype)
    y = lk.lora_linear(*leaves, scaling=2.0, dropout_p=p, dropout_seed=321, backend=backend)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.dtype == torch.uint8]
    if backend == "triton":
        assert len(saved) == 1
        assert torch.equal(saved[0].cpu(), ref.dropout_keep_packed(321, M, K, p))
    else:
        assert not saved
    got = _grads(y, dy, leaves)
    monkeypatch.setattr(op_mod, "_bits_shape", lambda x, dp, b: (0,))
    y2 = lk.lora_linear(*leaves, scaling=2.0, dropout_p=p, dropout_seed=321, backend=backend)
    for a, b in zip(got, _grads(y2, dy, leaves)):
        assert torch.equal(a, b)
