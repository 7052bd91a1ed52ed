"""Helpers for the end-to-end benchmarks (paper_table1, bench_training, bench_serving).

Models are built from configs with random weights (no download); every contender gets its own
copy of the same seeded model so they can be timed side by side in one process. What every
benchmark shares (environment record, markdown table, JSON + markdown + PNG writer, results
folder) lives in common.py; this file holds what only whole-model benchmarks need: model
builders, the ways each contender attaches LoRA, a per-trial timer that gives mean *and*
median, progress bars, and the command line the three scripts share.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import common

# lora_kernels/bench_runner.py (outside bench/) writes SUMMARY.md with these, through this module.
env_line, md_table = common.env_line, common.md_table

# LoRA target sets. GPT-2 packs q, k and v into one Conv1D (c_attn); PEFT can only adapt all of
# it, so "qv" on GPT-2 means c_attn for every contender (same FLOPs for PEFT and ours).
TARGETS = {
    "gpt2": {"qv": ["c_attn"], "all": ["c_attn", "c_proj", "c_fc"]},
    "llama": {"qv": ["q_proj", "v_proj"],
              "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}


# ------------------------------------------------------------------------------------------
# Where and how
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    quick: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_mode(quick: bool, dtype: Optional[str] = None) -> Mode:
    """--quick: tiny models on the CPU in fp32 (any machine, minutes). Full: CUDA in bf16, the
    dtype users train and serve in. Full without a GPU falls back to quick, loudly."""
    if not quick and not torch.cuda.is_available():
        print("no CUDA device: running the --quick sizes on the CPU (GPU figures pending)",
              file=sys.stderr)
        quick = True
    device = torch.device("cpu" if quick else "cuda")
    name = dtype or ("float32" if quick else "bfloat16")
    return Mode(quick, device, getattr(torch, name))


@contextlib.contextmanager
def quick_threads(mode: Mode):
    """One intra-op thread for the --quick CPU runs: tiny GEMMs gain nothing from threads, and on
    a shared machine two threads fighting other processes made steps 10x slower and erratic."""
    if not mode.quick:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def env_info(mode: Mode) -> dict:
    """common.env_info for a Mode (the scripts and lora_kernels/bench_runner.py hold one)."""
    return common.env_info(mode.dtype, mode.quick)


# ------------------------------------------------------------------------------------------
# Models (random weights from configs)
# ------------------------------------------------------------------------------------------
def gpt2_config(quick: bool):
    from transformers import GPT2Config
    if quick:
        return GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=256,
                          bos_token_id=1023, eos_token_id=1023)
    return GPT2Config(n_layer=24, n_embd=1024, n_head=16)  # GPT-2 medium


def llama_config(quick: bool):
    from transformers import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                           max_position_embeddings=512)
    # Llama-3-8B's layer shapes (GQA 32/8, MLP 14336) with 8 layers and Llama-2's vocabulary.
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=4096)


def build_model(kind: str, mode: Mode, seed: int = 0) -> nn.Module:
    """A causal LM with seeded random weights, created directly on the device in the mode's
    dtype (a 2B-parameter Llama initialised on the CPU in fp32 would take minutes). transformers
    keeps the rotary ``inv_freq`` buffers in fp32, as a real checkpoint load would."""
    from transformers import AutoModelForCausalLM
    cfg = gpt2_config(mode.quick) if kind == "gpt2" else llama_config(mode.quick)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(mode.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=mode.dtype)
    return model.to(mode.device)


def random_ids(model: nn.Module, batch: int, seq: int, device, n: int = 4, seed: int = 1):
    """``n`` different input batches, cycled trial by trial (rotating inputs)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


# ------------------------------------------------------------------------------------------
# Contenders: how each one puts LoRA on a model
# ------------------------------------------------------------------------------------------
def peft_lora(model: nn.Module, kind: str, targets: Sequence[str], r: int, n_adapters: int = 1,
              random_b: bool = True) -> nn.Module:
    """PEFT as users run it (defaults kept, including fp32 adapters on a bf16 model). Adapters
    ``a0..a{n-1}``; ``random_b`` gives B non-zero weights so nothing is skippable."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), lora_dropout=0.0,
                     fan_in_fan_out=(kind == "gpt2"), init_lora_weights=not random_b,
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, n_adapters):
            pm.add_adapter(f"a{i}", cfg)
    pm.set_adapter("a0")
    return pm


def patch_peft():
    """``patch_peft_model`` once the integration exists, else None (the row is left out)."""
    try:
        from lora_kernels.integrations.peft import patch_peft_model
    except ImportError:
        return None
    return patch_peft_model


def our_lora(model: nn.Module, targets: Sequence[str], r: int) -> nn.Module:
    """Our fused single-adapter layer on every target, unmerged; B random (as PEFT's above)."""
    from lora_kernels import inject_lora
    from lora_kernels.nn import lora_modules
    inject_lora(model, list(targets), r=r, lora_alpha=r)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B.weight, std=0.02)
    return model


def our_multi_lora(model: nn.Module, targets: Sequence[str], num_slots: int, r: int,
                   seed: int = 0) -> nn.Module:
    """Replace every target by a ``MultiLoRALinear`` holding ``num_slots`` random rank-``r``
    adapters (what an adapter pool would have uploaded)."""
    from lora_kernels import MultiLoRALinear
    from lora_kernels.nn.lora_linear import is_conv1d
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules()
             if any(n == t or n.endswith("." + t) for t in targets)
             and (isinstance(m, nn.Linear) or is_conv1d(m))]
    if not names:
        raise ValueError(f"targets {list(targets)} matched no linear layer")
    for name in names:
        base = model.get_submodule(name)
        multi = MultiLoRALinear(base, num_slots=num_slots, max_rank=r)
        k, n = multi.in_features, multi.out_features
        for slot in range(num_slots):
            a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(multi.lora_A)
            b = (torch.randn(n, r, generator=g) * 0.02).to(multi.lora_B)
            multi.set_adapter(slot, a, b, scaling=1.0)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, multi)
    return model


def human(n: float) -> str:
    """Parameter counts as the paper writes them: 0.5M, 11M, 1.3K."""
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}K"
    return f"{int(n)}"


def attempt(errors: dict, key: str, fn: Callable[[], object]):
    """Run ``fn``; on failure record ``"ExcType: message"`` under ``key`` and return None. One
    broken contender (code under development) must not take the rest of the suite down; its
    row shows the error instead of numbers."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 — reported in the results, not swallowed
        errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        print(f"[bench] {key} failed: {errors[key]}", file=sys.stderr)
        return None


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
class Timer:
    """Times ``fn(i)`` trial by trial: CUDA events around each call (synchronised after each, so
    one trial is one latency) or ``perf_counter`` on the CPU. Warm-up calls are not recorded."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def once(self, fn: Callable[[int], object], i: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t0) * 1e3

    def run(self, fn: Callable[[int], object], trials: int, warmup: int) -> list[float]:
        for i in range(warmup):
            fn(i)
        if self.cuda:
            torch.cuda.synchronize()
        return [self.once(fn, warmup + i) for i in range(trials)]


def summarize(ms: Sequence[float]) -> dict:
    return {"n": len(ms), "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
            "min_ms": min(ms), "max_ms": max(ms),
            "std_ms": statistics.pstdev(ms) if len(ms) > 1 else 0.0}


def progress(iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar (inner level under the runner's bar); a plain iterator without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    # disable=None: no bar when stderr is not a terminal (logs, pytest), so no escape codes there.
    off = os.environ.get("LORA_KERNELS_BENCH_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, leave=False, position=1,
                disable=True if off else None)


# ------------------------------------------------------------------------------------------
# Results and command line
# ------------------------------------------------------------------------------------------
def save(payload: dict, out_dir, markdown: Callable[[dict], str],
         plot: Callable[[object, dict], None]) -> dict:
    """Write ``payload`` (common.write_results) with ``markdown(payload)`` and ``plot(fig,
    payload)``, under ``out_dir`` or bench/results/<device>/; the paths go in
    ``payload["files"]`` (after the JSON is written: they are where it is, not what it says)."""
    out_dir = Path(out_dir) if out_dir else common.results_dir(payload["env"]["mode"] == "quick")
    paths = common.write_results(out_dir, payload, markdown(payload),
                                 lambda fig: plot(fig, payload), figsize=(10, 5.5))
    payload["files"] = [str(p) for p in paths]
    return payload


def cli(run: Callable[..., dict], doc: str, argv=None, *, count: str,
        count_help: Optional[str] = None, quick_help: str = "tiny model on the CPU") -> int:
    """The scripts' shared command line: ``run(quick, out, dtype, <count>)``, then print the
    markdown it wrote. ``count`` names the script's repetition option (steps, trials)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=None, help="results dir (default bench/results/<device>)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    p.add_argument(f"--{count}", type=int, default=None, help=count_help)
    a = p.parse_args(argv)
    payload = run(a.quick, a.out, a.dtype, getattr(a, count))
    print(Path(payload["files"][1]).read_text())
    return 0
