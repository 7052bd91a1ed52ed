"""Cases: lora_kernels' vLLM punica wrapper against vLLM's own CPU wrapper
(``PunicaWrapperCPU``, over vLLM's torch reference ops), given the same LoRA mapping,
weights and inputs. Run in their own process by tests/test_engines.py (importing vLLM patches
torch Inductor process-wide).

vLLM is not installed (its pins would replace torch): ``make test`` unpacks the pure-Python
modules these classes import from the 0.33.0 wheel into ``<venv>/engine-src/vllm-0.33.0``
(``tests/engine_env.py``); this module puts that tree on ``sys.path``, or skips.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_SRC = Path(os.environ.get("LORA_KERNELS_VLLM_SRC",
                           Path(sys.prefix) / "engine-src" / "vllm-0.33.0"))
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.append(str(_SRC))
punica_cpu = pytest.importorskip(
    "vllm.lora.punica_wrapper.punica_cpu",
    reason=f"vLLM's LoRA modules not found at {_SRC} (python tests/engine_env.py vllm)")

from helpers import assert_entry_point_declared  # noqa: E402
from lora_kernels.integrations import vllm as lk_vllm  # noqa: E402
from lora_kernels.integrations.engine_versions import UnsupportedEngineVersion  # noqa: E402
from lora_kernels.integrations.vllm_punica import LoRAKernelsPunicaWrapper  # noqa: E402

L, R, K = 4, 5, 19


@pytest.fixture(autouse=True)
def _no_pinned_staging(monkeypatch):
    # vLLM stages host->device copies in pinned memory unless its platform says it cannot;
    # the unpacked tree has no platform for a CPU-only box, and pinning needs a CUDA driver.
    monkeypatch.setattr("vllm.utils.torch_utils.PIN_MEMORY", False)

SLOT_IDS = [11, None, 13, 12]          # slot -> LoRA id (slot 1 empty)
CASES = {
    # prefill: runs of tokens per request; request 2 has no LoRA (id 0)
    "prefill": dict(is_prefill=True, tokens=[11] * 3 + [13] * 2 + [0] * 2 + [12] * 4 + [11],
                    prompts=[11, 13, 0, 12, 11]),
    "decode": dict(is_prefill=False, tokens=[12, 0, 11, 13, 13, 11],
                   prompts=[12, 0, 11, 13, 13, 11]),
}


def _mapping(case):
    c = CASES[case]
    return SimpleNamespace(index_mapping=tuple(c["tokens"]), prompt_mapping=tuple(c["prompts"]),
                           is_prefill=c["is_prefill"])


def _pair(case):
    ref = punica_cpu.PunicaWrapperCPU(64, 16, "cpu")
    ours = LoRAKernelsPunicaWrapper(64, 16, "cpu")
    for w in (ref, ours):
        w.update_metadata(_mapping(case), SLOT_IDS, L, 32)
    return ref, ours


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err <= tol, f"relative error {err:.3g}"


def _stacks(widths, gen):
    a = tuple(torch.randn(L, 1, R, K, generator=gen) for _ in widths)
    b = tuple(torch.randn(L, 1, w, R, generator=gen) for w in widths)
    return a, b


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("widths", [(13,), (8, 4, 4)])
def test_add_lora_linear(case, widths):
    gen = torch.Generator().manual_seed(len(widths) + 7 * len(case))
    ref, ours = _pair(case)
    T = len(CASES[case]["tokens"])
    a, b = _stacks(widths, gen)
    x = torch.randn(T, K, generator=gen)
    y0 = torch.randn(T, sum(widths), generator=gen)
    y_ref, y = y0.clone(), y0.clone()
    ref.add_lora_linear(y_ref, x, a, b, 0.7, widths)
    ours.add_lora_linear(y, x, a, b, 0.7, widths)
    _close(y, y_ref)
    no_lora = torch.tensor([t == 0 for t in CASES[case]["tokens"]])
    assert torch.equal(y[no_lora], y0[no_lora])


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_shrink_and_add_expand(case):
    gen = torch.Generator().manual_seed(3)
    ref, ours = _pair(case)
    T = len(CASES[case]["tokens"])
    widths = (6, 5)
    a, b = _stacks(widths, gen)
    x = torch.randn(T, K, generator=gen)
    buf_ref = torch.randn(2, T, R, generator=gen)   # stale contents: the shrink overwrites
    buf = buf_ref.clone()
    ref.add_shrink(buf_ref, x, a, 1.3)
    ours.add_shrink(buf, x, a, 1.3)
    _close(buf, buf_ref)
    for add_inputs in (True, False):
        y0 = torch.randn(T, 3 + sum(widths), generator=gen)
        y_ref, y = y0.clone(), y0.clone()
        ref.add_expand(y_ref, buf_ref, b, widths, offset_start=3, add_inputs=add_inputs)
        ours.add_expand(y, buf_ref, b, widths, offset_start=3, add_inputs=add_inputs)
        _close(y, y_ref)
        assert torch.equal(y[:, :3], y0[:, :3])


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_lora_embedding(case):
    gen = torch.Generator().manual_seed(5)
    ref, ours = _pair(case)
    T = len(CASES[case]["tokens"])
    b = torch.randn(L, 1, 9, R, generator=gen)
    x = torch.randn(T, R, generator=gen)
    y0 = torch.randn(T, 9, generator=gen)
    y_ref, y = y0.clone(), y0.clone()
    ref.add_lora_embedding(y_ref, x, b, add_input=True)   # vLLM's layers spell it add_input
    ours.add_lora_embedding(y, x, b, add_input=True)
    _close(y, y_ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_lora_logits_with_vocab_padding(case):
    gen = torch.Generator().manual_seed(9)
    ref, ours = _pair(case)
    rows = len(CASES[case]["prompts"])
    V = 17
    a = torch.randn(L, 1, R, K, generator=gen)
    b = torch.randn(L, 1, V, R, generator=gen)
    x = torch.randn(rows, K, generator=gen)
    y0 = torch.randn(rows, V + 3, generator=gen)      # logits padded past the adapter's vocab
    y_ref, y = y0.clone(), y0.clone()
    ref.add_lora_logits(y_ref, x, a, b, 0.5)
    ours.add_lora_logits(y, x, a, b, 0.5)
    _close(y, y_ref)
    assert torch.equal(y[:, V:], y0[:, V:])


def test_apply_lora_full_linear():
    gen = torch.Generator().manual_seed(13)
    ref, ours = _pair("decode")
    rows, out = len(CASES["decode"]["prompts"]), 7
    w = torch.randn(L, 1, out, K, generator=gen)
    bias = torch.randn(L, out, generator=gen)
    enabled = torch.tensor([True, False, True, False])
    x = torch.randn(rows, K, generator=gen)
    y0 = torch.randn(rows, out, generator=gen)
    y_ref, y = y0.clone(), y0.clone()
    ref.apply_lora_full_linear(y_ref, x, w, bias, enabled)
    ours.apply_lora_full_linear(y, x, w, bias, enabled)
    _close(y, y_ref)


def test_padded_rows_and_static_metadata():
    """Rows past the mapping (a CUDA-graph padded batch) get no LoRA, and a new step rewrites
    the same buffers (a captured graph keeps reading valid metadata)."""
    gen = torch.Generator().manual_seed(17)
    ref, ours = _pair("decode")
    T = len(CASES["decode"]["tokens"])
    a, b = _stacks((11,), gen)
    ptrs = [t.data_ptr() for t in ours._tokens.batch_for(T + 2).tensors()]
    x = torch.randn(T + 2, K, generator=gen)
    y0 = torch.randn(T + 2, 11, generator=gen)
    y_ref, y = y0[:T].clone(), y0.clone()
    ref.add_lora_linear(y_ref, x[:T], a, b, 1.0, (11,))
    ours.add_lora_linear(y, x, a, b, 1.0, (11,))
    _close(y[:T], y_ref)
    assert torch.equal(y[T:], y0[T:])
    step2 = SimpleNamespace(index_mapping=(13, 13, 0, 12, 11, 11),
                            prompt_mapping=(13, 13, 0, 12, 11, 11), is_prefill=False)
    ours.update_metadata(step2, SLOT_IDS, L, 32)
    assert [t.data_ptr() for t in ours._tokens.batch_for(T + 2).tensors()] == ptrs
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, (11,))
    ref.update_metadata(step2, SLOT_IDS, L, 32)
    y_ref = y0[:T].clone()
    ref.add_lora_linear(y_ref, x[:T], a, b, 1.0, (11,))
    _close(y[:T], y_ref)


@pytest.mark.parametrize("method", ["moe_lora_align_block_size", "add_lora_fused_moe",
                                    "add_lora_w13", "add_lora_w2"])
def test_moe_methods_say_they_are_not_implemented(method):
    ours = LoRAKernelsPunicaWrapper(8, 4, "cpu")
    with pytest.raises(NotImplementedError, match=method):
        getattr(ours, method)()


def test_bad_calls_name_the_problem():
    ours = LoRAKernelsPunicaWrapper(8, 4, "cpu")
    with pytest.raises(RuntimeError, match="update_metadata"):
        ours.add_lora_linear(torch.zeros(2, 3), torch.zeros(2, K), (torch.zeros(L, 1, R, K),),
                             (torch.zeros(L, 1, 3, R),), 1.0, (3,))
    ours.update_metadata(_mapping("decode"), SLOT_IDS, L, 32)
    with pytest.raises(ValueError, match="one entry per slice"):
        ours.add_lora_linear(torch.zeros(6, 3), torch.zeros(6, K), (torch.zeros(L, 1, R, K),),
                             (), 1.0, (3,))
    with pytest.raises(ValueError, match="outside"):
        ours.add_expand(torch.zeros(6, 3), torch.zeros(1, 6, R), (torch.zeros(L, 1, 3, R),),
                        (3,), offset_start=2)


def _gpu_wrapper() -> str:
    return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"


@pytest.fixture
def platform(monkeypatch):
    """vLLM's resolved current platform, answering like the CUDA one; restored afterwards."""
    import vllm.platforms as platforms
    p = platforms.current_platform
    monkeypatch.setattr(p, "get_punica_wrapper", _gpu_wrapper, raising=False)
    return p


def test_register_is_opt_in(monkeypatch, platform):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    monkeypatch.delenv(lk_vllm.ENABLE_ENV, raising=False)
    lk_vllm.register()
    assert platform.get_punica_wrapper().endswith("PunicaWrapperGPU")   # untouched
    monkeypatch.setenv(lk_vllm.ENABLE_ENV, "1")
    lk_vllm.register()
    lk_vllm.register()  # idempotent
    qualname = platform.get_punica_wrapper()
    assert resolve_obj_by_qualname(qualname) is LoRAKernelsPunicaWrapper
    # what vllm.lora.punica_wrapper.punica_selector.get_punica_wrapper() does (its log line
    # imports vllm.distributed, not unpacked here)
    from vllm.lora.punica_wrapper import punica_selector
    assert punica_selector.current_platform is platform
    w = resolve_obj_by_qualname(platform.get_punica_wrapper())(16, max_batches=4, device="cpu",
                                                                lora_config=None)
    assert isinstance(w, LoRAKernelsPunicaWrapper)


def test_unsupported_version_fails_clearly(monkeypatch, platform):
    monkeypatch.setenv(lk_vllm.ENABLE_ENV, "1")
    monkeypatch.setattr("lora_kernels.integrations.engine_versions.installed_version",
                        lambda dist: "0.32.1")
    with pytest.raises(UnsupportedEngineVersion, match=r"supports vllm 0\.33\.0, found 0\.32\.1"):
        lk_vllm.register()
    monkeypatch.setenv(lk_vllm.ALLOW_UNTESTED_ENV, "1")
    lk_vllm.register()


def test_entry_point_installed_and_vllm_loads_it(monkeypatch, platform):
    eps = [e for e in metadata.entry_points(group="vllm.general_plugins")
           if e.name == "lora_kernels"]
    if not eps:
        pytest.skip("lora-kernels is installed without the entry point (reinstall: pip install "
                    "-e . --no-deps)")
    import vllm.plugins as plugins
    monkeypatch.setenv(lk_vllm.ENABLE_ENV, "1")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_kernels")
    monkeypatch.setattr(plugins, "plugins_loaded", False)
    plugins.load_general_plugins()
    assert platform.get_punica_wrapper() == lk_vllm.WRAPPER_QUALNAME


def test_entry_point_declared_and_loadable():
    assert_entry_point_declared("vllm.general_plugins", "lora_kernels.integrations.vllm:register",
                                lk_vllm.register)
    assert metadata.version("vllm") == "0.33.0"


def test_triton_kernels_match_vllm_cpu(monkeypatch):
    """add_lora_linear (packed slices, rows without LoRA) through the Triton kernels (CPU
    interpreter), padded to a larger captured size."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    gen = torch.Generator().manual_seed(23)
    ref, ours = _pair("prefill")
    T, widths = len(CASES["prefill"]["tokens"]), (8, 4, 4)
    a, b = _stacks(widths, gen)
    x = torch.randn(T + 3, K, generator=gen)
    y0 = torch.randn(T + 3, sum(widths), generator=gen)
    y_ref, y = y0[:T].clone(), y0.clone()
    ref.add_lora_linear(y_ref, x[:T], a, b, 0.9, widths)
    ours.add_lora_linear(y, x, a, b, 0.9, widths)
    _close(y[:T], y_ref)
    assert torch.equal(y[T:], y0[T:])
