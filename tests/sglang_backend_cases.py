"""Cases: the ``lora_kernels`` SGLang backend against SGLang's own ``torch_native`` backend
(run in their own process by tests/test_engines.py: importing SGLang has side effects).

Both backends get the same forward batch, adapter buffers (laid out as SGLang's memory pool
lays them out: A tight at each slot's rank, stale rows past it) and inputs; every method must
give the same result. Needs ``sglang`` installed (``make test`` installs it ``--no-deps`` with
the few light packages its LoRA modules import); skipped otherwise.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

tb = pytest.importorskip("sglang.srt.lora.backend.torch_backend",
                         reason="sglang not installed (make test installs it --no-deps)")
from sglang.srt.lora.backend import lora_registry  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from lora_kernels.integrations import sglang as lk_sglang  # noqa: E402
from lora_kernels.integrations.engine_versions import UnsupportedEngineVersion  # noqa: E402
from lora_kernels.integrations.sglang_backend import LoRAKernelsSGLangBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_env import unpin_sglang_torch_native  # noqa: E402
from helpers import assert_entry_point_declared  # noqa: E402

S, R, K = 4, 6, 19
RANKS = [4, 5, 2, 0]          # slot 3 has rank 0: SGLang's base-model slot
SCALINGS = [0.5, 1.5, 2.0, 3.0]
LAYOUTS = {"plain": [13], "qkv": [8, 4, 4], "gate_up": [7, 7]}


@pytest.fixture
def no_pin(monkeypatch):
    unpin_sglang_torch_native(monkeypatch)


def _forward_batch(lens, decode=False):
    mode = ForwardMode.DECODE if decode else ForwardMode.EXTEND
    return SimpleNamespace(forward_mode=mode, batch_size=len(lens),
                           extend_seq_lens=torch.tensor(lens, dtype=torch.int32),
                           extend_seq_lens_cpu=list(lens), extend_num_tokens=sum(lens),
                           return_logprob=False)


def _buffers(n, widths, gen):
    """A [S, n·R, K] tight per slot (rows past n·rank hold stale values), B [S, N, R]."""
    A = torch.randn(S, n * R, K, generator=gen)
    B = torch.randn(S, sum(widths), R, generator=gen)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    return A, B, torch.tensor(offsets, dtype=torch.int32)


def _pair(lens, weight_indices, decode=False, ranks=RANKS):
    ref = tb.TorchNativeLoRABackend(S, torch.device("cpu"))
    ours = LoRAKernelsSGLangBackend(S, torch.device("cpu"))
    fb = _forward_batch(lens, decode)
    for b in (ref, ours):
        b.prepare_lora_batch(fb, weight_indices, ranks, SCALINGS, False)
    return ref, ours


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err <= tol, f"relative error {err:.3g}"


# Prefill (runs of tokens per request, one of them on the rank-0 base slot, one slot used by
# two requests) and decode (one token per request).
BATCHES = {"prefill": ([3, 1, 5, 2, 4], [0, 2, 1, 3, 0], False),
           "decode": ([1] * 6, [1, 3, 0, 2, 2, 1], True)}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_method_matches_torch_native(no_pin, batch, layout):
    lens, wi, decode = BATCHES[batch]
    widths = LAYOUTS[layout]
    n, T, N = len(widths), sum(lens), sum(widths)
    gen = torch.Generator().manual_seed(hash((batch, layout)) % 2**31)
    ref, ours = _pair(lens, wi, decode)
    A, B, off = _buffers(n, widths, gen)
    x = torch.randn(T, K, generator=gen)
    base = torch.randn(T, N, generator=gen)

    xa_ref = ref.run_lora_a_sgemm(x, A, stack_num=n)
    xa = ours.run_lora_a_sgemm(x, A, stack_num=n)
    _close(xa, xa_ref)
    y_ref = ref.run_lora_b_sgemm(xa_ref, B, output_offset_cpu=off, base_output=base.clone())
    y = ours.run_lora_b_sgemm(xa_ref, B, output_offset=off, output_offset_cpu=off,
                              base_output=base.clone())
    _close(y, y_ref)
    # Without base_output: a fresh output holding the LoRA term only.
    _close(ours.run_lora_b_sgemm(xa_ref, B, output_offset_cpu=off),
           ref.run_lora_b_sgemm(xa_ref, B, output_offset_cpu=off))
    if layout == "qkv":
        got = ours.run_qkv_lora(x=x, qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                                output_offset_cpu=off, max_qkv_out_dim=max(widths),
                                base_output=base.clone())
        want = ref.run_qkv_lora(x=x, qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                                output_offset_cpu=off, max_qkv_out_dim=max(widths),
                                base_output=base.clone())
        _close(got, want)
    if layout == "gate_up":
        got = ours.run_gate_up_lora(x=x, gate_up_lora_a=A, gate_up_lora_b=B, output_offset=off,
                                    output_offset_cpu=off, base_output=base.clone())
        want = ref.run_gate_up_lora(x=x, gate_up_lora_a=A, gate_up_lora_b=B,
                                    output_offset_cpu=off, base_output=base.clone())
        _close(got, want)
    # Tokens of the rank-0 (base) slot keep the base output exactly.
    base_rows = torch.repeat_interleave(torch.tensor([RANKS[w] == 0 for w in wi]),
                                        torch.tensor(lens))
    assert torch.equal(y[base_rows], base[base_rows])


def test_embedding_matches_torch_native(no_pin):
    lens, wi, _ = BATCHES["prefill"]
    gen = torch.Generator().manual_seed(7)
    ref, ours = _pair(lens, wi)
    V = 23
    A = torch.randn(S, R, V, generator=gen)
    ids = torch.randint(0, V, (sum(lens),), generator=gen)
    _close(ours.run_lora_a_embedding(ids, A, vocab_size=V),
           ref.run_lora_a_embedding(ids, A, vocab_size=V))


def test_lm_head_on_pruned_rows(no_pin):
    """Prefill: the logits processor keeps each request's last token; lm_head LoRA runs on
    those rows with the pruned batch info that prepare_lora_batch built."""
    lens, wi, _ = BATCHES["prefill"]
    gen = torch.Generator().manual_seed(19)
    _, ours = _pair(lens, wi)
    info = ours.lm_head_batch_info
    assert info is not None and info.expected_tokens == len(lens)
    ref = tb.TorchNativeLoRABackend(S, torch.device("cpu"))   # oracle: a batch of those rows
    ref.prepare_lora_batch(_forward_batch([1] * len(lens)), wi, RANKS, SCALINGS, False)
    A, B, off = _buffers(1, [29], gen)
    h = torch.randn(len(lens), K, generator=gen)
    logits = torch.randn(len(lens), 29, generator=gen)
    xa = ours.run_lora_a_sgemm(h, A, pruned_batch_info=info)
    got = ours.run_lora_b_sgemm(x=xa, weights=B, output_offset=off, output_offset_cpu=off,
                                base_output=logits.clone(), pruned_batch_info=info)
    want = ref.run_lora_b_sgemm(ref.run_lora_a_sgemm(h, A), B, output_offset_cpu=off,
                                base_output=logits.clone())
    _close(got, want)
    _, dec = _pair([1] * 3, [0, 1, 2], decode=True)
    assert dec.lm_head_batch_info is None             # decode: lm_head sees every token


def _plain_layer(weight, quant="UnquantizedLinearMethod"):
    qm = type(quant, (), {})()
    return SimpleNamespace(base_layer=SimpleNamespace(weight=weight, bias=None,
                                                      skip_bias_add=False, quant_method=qm))


@pytest.mark.parametrize("quant", ["UnquantizedLinearMethod", "Fp8LinearMethod"])
def test_forward_with_base(no_pin, quant):
    """A plain linear runs as one multi_lora_linear; any other base keeps SGLang's base path
    (``layer.apply_lora``) with our LoRA term. Both equal base + torch_native's LoRA."""
    lens, wi, _ = BATCHES["prefill"]
    gen = torch.Generator().manual_seed(11)
    ref, ours = _pair(lens, wi)
    A, B, off = _buffers(1, [13], gen)
    T = sum(lens)
    x = torch.randn(T, K, generator=gen)
    W = torch.randn(13, K, generator=gen)
    layer = _plain_layer(W, quant)
    calls = []

    def apply_lora(base_output, x_):
        calls.append(1)
        xa = ours.run_lora_a_sgemm(x_, A)
        return ours.run_lora_b_sgemm(xa, B, output_offset_cpu=off, base_output=base_output)

    layer.apply_lora = apply_lora
    got = ours.forward_with_base(layer, x, lambda: x @ W.T, A, B, off, (0, 13))
    xa = ref.run_lora_a_sgemm(x, A)
    want = ref.run_lora_b_sgemm(xa, B, output_offset_cpu=off, base_output=x @ W.T)
    _close(got, want)
    assert bool(calls) == (quant != "UnquantizedLinearMethod")


@pytest.mark.parametrize("uniform", [True, False])
def test_forward_with_base_packed(no_pin, uniform):
    """Packed qkv: one multi_lora_linear when every slot has rank 0 or r_max (SGLang's tight
    layout is then ours), SGLang's base path + our LoRA term with mixed ranks."""
    lens, wi, _ = BATCHES["prefill"]
    ranks = [R, R, 0, R] if uniform else RANKS
    gen = torch.Generator().manual_seed(29)
    ref, ours = _pair(lens, wi, ranks=ranks)
    widths = LAYOUTS["qkv"]
    A, B, off = _buffers(3, widths, gen)
    T, N = sum(lens), sum(widths)
    x = torch.randn(T, K, generator=gen)
    W = torch.randn(N, K, generator=gen)
    layer = _plain_layer(W)
    calls = []

    def apply_lora(base_output, x_):
        calls.append(1)
        return ours.run_qkv_lora(x=x_, qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                                 output_offset_cpu=off, max_qkv_out_dim=8,
                                 base_output=base_output)

    layer.apply_lora = apply_lora
    got = ours.forward_with_base(layer, x, lambda: x @ W.T, A, B, off, tuple(off.tolist()))
    want = ref.run_qkv_lora(x=x, qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                            output_offset_cpu=off, max_qkv_out_dim=8, base_output=x @ W.T)
    _close(got, want)
    assert bool(calls) == (not uniform)


@pytest.mark.parametrize("layout", ["plain", "qkv"])
def test_decode_cuda_graph_batch_info(no_pin, layout):
    """Graph mode: buffers refreshed in place; a batch captured for 6 requests serves a later
    batch of 4 real requests padded to 6 (SGLang's graph runner pads the rest)."""
    widths = LAYOUTS[layout]
    n, N = len(widths), sum(widths)
    gen = torch.Generator().manual_seed(3)
    A, B, off = _buffers(n, widths, gen)
    ours = LoRAKernelsSGLangBackend(S, torch.device("cpu"))
    ours.init_decode_cuda_graph_batch_info(max_bs_in_cuda_graph=8, num_tokens_per_req=1)
    # "capture" at bs = 6 (all slots mixed), then "replay" with 4 real requests
    ours.prepare_lora_batch(_forward_batch([1] * 6, True), [0, 1, 2, 3, 0, 1], RANKS,
                            SCALINGS, True)
    captured = ours.batch_info.lk_batch
    x = torch.randn(6, K, generator=gen)
    base = torch.randn(6, N, generator=gen)
    ours._packed(x, A, B, off, off, base.clone())   # warm-up: creates the derived buffers
    wi_real, ranks2 = [2, 3, 1, 2], [3, 6, 1, 0]      # new batch, other ranks
    ours.prepare_lora_batch(_forward_batch([1] * 4, True), wi_real, ranks2, SCALINGS, True)
    ref, _ = _pair([1] * 4, wi_real, decode=True, ranks=ranks2)
    ours.batch_info.lk_batch = captured            # what the replayed graph reads
    ours.batch_info.lk_cache.clear()
    got = ours._packed(x, A, B, off, off, base.clone())
    want = ref.run_qkv_lora(x=x[:4], qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                            output_offset_cpu=off, max_qkv_out_dim=max(widths),
                            base_output=base[:4].clone())
    _close(got[:4], want)
    assert torch.equal(got[4:], base[4:])           # padding rows: untouched
    # The refreshed batch's own size agrees too.
    ours.batch_info.lk_batch = ours._graph.batch_for(4)
    ours.batch_info.lk_cache.clear()
    _close(ours._packed(x[:4], A, B, off, off, base[:4].clone()), want)


def test_registry_and_cli_choices():
    lk_sglang.register()
    lk_sglang.register()  # idempotent
    assert lora_registry.get_backend_from_name("lora_kernels") is LoRAKernelsSGLangBackend
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--enable-lora", "--lora-backend",
                              "lora_kernels"])
    assert args.lora_backend == "lora_kernels"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--lora-backend", "no_such_backend"])


def test_entry_point_declared_and_loadable():
    assert_entry_point_declared("sglang.srt.plugins", "lora_kernels.integrations.sglang:register",
                                lk_sglang.register)


def test_entry_point_installed_and_sglang_loads_it():
    eps = [e for e in metadata.entry_points(group="sglang.srt.plugins")
           if e.name == "lora_kernels"]
    if not eps:
        pytest.skip("lora-kernels is installed without the entry point (reinstall: pip install "
                    "-e . --no-deps)")
    assert eps[0].value == "lora_kernels.integrations.sglang:register"
    import sglang.srt.plugins as plugins
    plugins._plugins_loaded = False
    plugins.load_plugins()
    assert "lora_kernels" in lora_registry.LORA_SUPPORTED_BACKENDS
    # what `python -m sglang.launch_server ... --lora-backend lora_kernels` parses with
    from sglang.srt.server_args import prepare_server_args
    args = prepare_server_args(["--model-path", "m", "--enable-lora", "--lora-backend",
                                "lora_kernels"])
    assert args.lora_backend == "lora_kernels"


def test_unsupported_version_fails_clearly(monkeypatch):
    lk_sglang.register()
    monkeypatch.setattr("lora_kernels.integrations.engine_versions.installed_version",
                        lambda dist: "0.4.9")
    monkeypatch.delenv(lk_sglang.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UnsupportedEngineVersion, match=r"supports sglang 0\.5\.23, found 0\.4\.9"):
        lora_registry.get_backend_from_name("lora_kernels")
    monkeypatch.setenv(lk_sglang.ALLOW_UNTESTED_ENV, "1")
    assert lora_registry.get_backend_from_name("lora_kernels") is LoRAKernelsSGLangBackend


def test_bad_calls_name_the_problem(no_pin):
    ours = LoRAKernelsSGLangBackend(S, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="prepare_lora_batch"):
        ours.run_lora_a_sgemm(torch.randn(3, K), torch.randn(S, R, K))
    ours.prepare_lora_batch(_forward_batch([2, 1]), [0, 1], RANKS, SCALINGS, False)
    with pytest.raises(TypeError, match="pruned_batch_info"):
        ours.run_lora_a_sgemm(torch.randn(3, K), torch.randn(S, R, K), pruned_batch_info=object())
    with pytest.raises(ValueError, match="T=5"):
        ours.run_lora_a_sgemm(torch.randn(5, K), torch.randn(S, R, K))
    with pytest.raises(ValueError, match="weight_indices"):
        ours.prepare_lora_batch(_forward_batch([2, 1]), [0, 9], RANKS, SCALINGS, False)
    with pytest.raises(RuntimeError, match="init_decode_cuda_graph_batch_info"):
        ours.prepare_lora_batch(_forward_batch([1, 1], True), [0, 1], RANKS, SCALINGS, True)
    ours.init_decode_cuda_graph_batch_info(4, 1)
    before = ours.batch_info
    with pytest.raises(ValueError, match="weight_indices"):  # checked on the host: a bad
        ours.prepare_lora_batch(_forward_batch([1, 1], True), [0, -2], RANKS, SCALINGS, True)
    with pytest.raises(ValueError, match="at most 4 requests"):
        ours.prepare_lora_batch(_forward_batch([1] * 5, True), [0] * 5, RANKS, SCALINGS, True)
    assert ours.batch_info is before                           # rejected: no state changed


def test_triton_kernels_match_torch_native(no_pin, monkeypatch):
    """The same comparison through the Triton kernels (CPU interpreter), packed qkv with mixed
    ranks and the plain-linear forward_with_base."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    lens, wi, _ = BATCHES["prefill"]
    gen = torch.Generator().manual_seed(5)
    ref, ours = _pair(lens, wi)
    T = sum(lens)
    x = torch.randn(T, K, generator=gen)
    A, B, off = _buffers(3, LAYOUTS["qkv"], gen)
    base = torch.randn(T, 16, generator=gen)
    kw = dict(x=x, qkv_lora_a=A, qkv_lora_b=B, output_offset=off, output_offset_cpu=off,
              max_qkv_out_dim=8)
    _close(ours.run_qkv_lora(**kw, base_output=base.clone()),
           ref.run_qkv_lora(**kw, base_output=base.clone()))
    A1, B1, off1 = _buffers(1, [13], gen)
    W = torch.randn(13, K, generator=gen)
    got = ours.forward_with_base(_plain_layer(W), x, lambda: x @ W.T, A1, B1, off1, (0, 13))
    want = ref.run_lora_b_sgemm(ref.run_lora_a_sgemm(x, A1), B1, output_offset_cpu=off1,
                                base_output=x @ W.T)
    _close(got, want)


def test_bench_engines_quick_runs(no_pin, monkeypatch, tmp_path):
    """bench/bench_engines.py --quick writes a row per case × layer × backend (numbers are
    not checked: they belong in results files)."""
    import json

    import engine_env
    monkeypatch.setattr(engine_env, "unpin_sglang_torch_native", lambda *a: None)  # done above
    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    import bench_engines
    assert bench_engines.main(["--quick", "--rep", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_engines.json").read_text())["rows"]
    names = ("lora_kernels", "torch_native", "csgmv", "triton")
    assert {(r["case"], r["layer"], r["backend"]) for r in rows} == {
        (c, layer, b) for c in ("decode", "prefill") for layer in ("qkv", "plain", "layer")
        for b in names} | {("decode", layer, b + "[graph-batch]")
                           for layer in ("qkv", "plain", "layer") for b in names}
    ours = [r for r in rows if r["backend"].startswith("lora_kernels")]
    assert all(r["ms"] is not None and r["err"] is not None for r in ours)
    assert (tmp_path / "bench_engines.md").exists()


def test_triton_fused_packed_matches_torch_native(no_pin, monkeypatch):
    """forward_with_base on packed qkv with uniform ranks, through the Triton kernels."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    lens, wi, _ = BATCHES["decode"]
    ranks = [R, R, 0, R]
    gen = torch.Generator().manual_seed(31)
    ref, ours = _pair(lens, wi, decode=True, ranks=ranks)
    A, B, off = _buffers(3, LAYOUTS["qkv"], gen)
    x = torch.randn(sum(lens), K, generator=gen)
    W = torch.randn(16, K, generator=gen)
    got = ours.forward_with_base(_plain_layer(W), x, lambda: x @ W.T, A, B, off,
                                 tuple(off.tolist()))
    want = ref.run_qkv_lora(x=x, qkv_lora_a=A, qkv_lora_b=B, output_offset=off,
                            output_offset_cpu=off, max_qkv_out_dim=8, base_output=x @ W.T)
    _close(got, want)
