"""Training-step throughput and memory: full fine-tuning vs PEFT LoRA vs our fused LoRA.

This is where the paper's claims (LoRA: ~3x less GPU memory and ~25% more training throughput
than full fine-tuning) are checked on our kernels.

What is timed: one optimizer step = forward with labels (causal-LM loss) + backward + AdamW
step + ``zero_grad(set_to_none=True)``, on random token batches cycled from 4 (rotating inputs),
after warm-up steps (which also allocate the optimizer state). Median over the timed steps;
tokens/s = batch x seq / median step time.

Memory: peak ``torch.cuda.max_memory_allocated`` from before the model is built to the last
step — weights, gradients, optimizer state and activations, the paper's accounting. On the CPU
there is no allocator peak to read, so the column is n/a and only the "state" column (bytes of
weights + gradients + optimizer state, counted from the tensors) is shown.

Models (random weights from configs): GPT-2 medium and a Llama-style model (Llama-3-8B layer
shapes, 8 layers). Precision: every contender keeps the base weights in the run's dtype (bf16
on GPU); full fine-tuning trains all of them with AdamW in that dtype (weights + grads + 2
states = 4x the weights, as in the paper's GPT-3 figure); PEFT keeps its defaults (its adapter
weights are upcast to fp32); ours keeps the adapters in the base dtype. LoRA r=16 (alpha 16,
no dropout) on q,v (the paper's choice; GPT-2's packed c_attn for every contender) and on all
linear layers.

    python bench/bench_training.py [--quick] [--out DIR] [--steps N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import e2e_common as C  # noqa: E402
import joint_training as J  # noqa: E402  (the joint multi-adapter rows, issue #17)

NAME = "bench_training"
RANK = 16
MODELS = ("gpt2", "llama")
MODEL_NAMES = {"gpt2": "GPT-2 medium", "llama": "Llama-style 4096x8 layers"}
QUICK_MODEL_NAMES = {"gpt2": "GPT-2 tiny", "llama": "Llama-style tiny"}
METHODS = {"full": "full fine-tuning", "peft": "PEFT LoRA", "peft_patched": "PEFT LoRA + patch_peft_model",
           "ours": "lora-kernels fused LoRA"}
TARGET_NAMES = {"qv": "q,v", "all": "all linear"}


def shapes(quick: bool) -> dict:
    if quick:
        return {"batch": 2, "seq": 32, "warmup": 2, "steps": 5}
    return {"batch": 8, "seq": 512, "warmup": 3, "steps": 15}


def prepare(kind: str, method: str, targets, mode: C.Mode):
    """The model for one contender, in training mode, and the parameters it trains."""
    model = C.build_model(kind, mode)
    if method == "full":
        trainable = list(model.parameters())
    elif method in ("peft", "peft_patched"):
        model = C.peft_lora(model, kind, targets, RANK, random_b=False)
        if method == "peft_patched":
            model._lora_kernels_handle = C.patch_peft()(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        from lora_kernels import inject_lora, mark_only_lora_as_trainable
        inject_lora(model, list(targets), r=RANK, lora_alpha=RANK)
        mark_only_lora_as_trainable(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    return model, trainable


def state_bytes(model, opt) -> int:
    """Weights + gradients (one per trainable weight) + optimizer state, counted from tensors."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def measure(kind: str, method: str, target: str, mode: C.Mode, sh: dict) -> dict:
    C.free_memory()
    if mode.cuda:
        torch.cuda.reset_peak_memory_stats()
    row = _train(kind, method, target, mode, sh)
    C.free_memory()  # _train's model, optimizer and inputs died with its frame
    return row


def _train(kind: str, method: str, target: str, mode: C.Mode, sh: dict) -> dict:
    targets = C.TARGETS[kind][target] if target else None
    model, trainable = prepare(kind, method, targets, mode)
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = C.random_ids(model, sh["batch"], sh["seq"], mode.device)

    def step(i):
        ids = inputs[i % len(inputs)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = C.Timer(mode.device).run(step, sh["steps"], sh["warmup"])
    s = C.summarize(ms)
    row = {
        "model": kind, "method": method, "row": METHODS[method],
        "targets": TARGET_NAMES.get(target, "all weights"), "target_key": target or "full",
        "trainable_params": sum(p.numel() for p in {id(p): p for p in trainable}.values()),
        "total_params": C.count_params(model),
        "tokens_per_step": sh["batch"] * sh["seq"],
        "tokens_per_s": sh["batch"] * sh["seq"] / (s["median_ms"] / 1e3), **s,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if mode.cuda else None,
        "state_mb": state_bytes(model, opt) / 2 ** 20,
    }
    return row


def cases(quick: bool):
    patched = C.patch_peft() is not None
    for kind in MODELS:
        yield kind, "full", None
        for target in ("qv", "all"):
            for method in ("peft", "peft_patched", "ours"):
                if method != "peft_patched" or patched:
                    yield kind, method, target


def run(quick: bool = False, out_dir=None, dtype=None, steps=None) -> dict:
    mode = C.resolve_mode(quick, dtype)
    sh = shapes(mode.quick)
    if steps:
        sh["steps"] = steps
    todo = list(cases(mode.quick))
    rows = []
    with C.quick_threads(mode):
        for kind, method, target in C.progress(todo, desc=NAME, total=len(todo)):
            errors: dict = {}
            row = C.attempt(errors, f"{kind}/{method}/{target}",
                            lambda: measure(kind, method, target, mode, sh))
            if row is None:
                C.free_memory()
                row = {"model": kind, "method": method, "row": METHODS[method],
                       "targets": TARGET_NAMES.get(target, "all weights"),
                       "target_key": target or "full", "error": next(iter(errors.values()))}
            rows.append(row)
        joint_rows, joint_settings = J.run_rows(mode)
        env = C.env_info(mode)
    for kind in MODELS:  # ratios against full fine-tuning of the same model
        full = next(r for r in rows if r["model"] == kind and r["method"] == "full")
        for r in rows:
            if r["model"] != kind or "error" in r or "error" in full:
                continue
            r["throughput_vs_full_pct"] = 100.0 * (r["tokens_per_s"] / full["tokens_per_s"] - 1.0)
            r["memory_reduction_x"] = (full["peak_mem_gb"] / r["peak_mem_gb"]
                                       if r["peak_mem_gb"] else None)
            r["state_reduction_x"] = full["state_mb"] / r["state_mb"]
    gcfg, lcfg = C.gpt2_config(mode.quick), C.llama_config(mode.quick)
    settings = {
        **sh, "rank": RANK, "lora_alpha": RANK, "lora_dropout": 0.0, "optimizer": "AdamW",
        "models": {"gpt2": f"GPT-2 n_layer={gcfg.n_layer} n_embd={gcfg.n_embd}",
                   "llama": f"Llama hidden={lcfg.hidden_size} inter={lcfg.intermediate_size} "
                            f"layers={lcfg.num_hidden_layers} heads={lcfg.num_attention_heads}/"
                            f"{lcfg.num_key_value_heads} vocab={lcfg.vocab_size}"},
        "targets": {k: {t: v for t, v in C.TARGETS[k].items()} for k in MODELS},
        "timing": "CUDA events per step, synchronised" if mode.cuda else "perf_counter",
    }
    return C.save(common.results_payload(NAME, rows, env, settings, joint=joint_rows,
                                         joint_settings=joint_settings), out_dir, markdown, plot)


def markdown(payload: dict) -> str:
    env, s = payload["env"], payload["settings"]
    parts = [f"# Training step: full fine-tuning vs PEFT LoRA vs lora-kernels\n\n{common.env_line(env)}\n"]
    if env["mode"] == "quick":
        parts.append("> **--quick mode**: tiny models on the CPU; shows the harness works, not how "
                     "the kernels perform. Peak memory needs CUDA (n/a here).\n")
    parts.append(f"One step = forward + backward + AdamW, batch {s['batch']} x seq {s['seq']}, "
                 f"median of {s['steps']} steps after {s['warmup']} warm-up; LoRA r={s['rank']}. "
                 f"Peak = max CUDA memory allocated (weights, grads, optimizer, activations); "
                 f"state = weights + grads + optimizer tensors.\n")
    for kind in MODELS:
        table = [_md_row(r) for r in payload["rows"] if r["model"] == kind]
        names = QUICK_MODEL_NAMES if env["mode"] == "quick" else MODEL_NAMES
        parts.append(f"## {names[kind]} ({s['models'][kind]})\n\n" + common.md_table(
            ["Method", "LoRA on", "trainable", "tokens/s", "vs full FT", "peak GB",
             "less memory than full FT", "state MB", "less state than full FT"], table) + "\n")
    parts.append("Paper's claims for reference: ~3x less memory (GPT-3 175B: 1.2 TB -> 350 GB) and "
                 "~25% more training throughput than full fine-tuning. GPT-2's q,v live in the "
                 "packed c_attn, so 'q,v' there means LoRA on c_attn for every contender.")
    if payload.get("joint"):
        parts.append("\n" + J.markdown(payload["joint"], payload["joint_settings"]))
    return "\n".join(parts)


def _md_row(r: dict) -> list:
    if "error" in r:
        return [r["row"], r["targets"], "error: " + r["error"][:80]] + [None] * 6

    def fmt(key, spec, suffix=""):
        v = r.get(key)
        return None if v is None else format(v, spec) + suffix
    return [r["row"], r["targets"], f"{r['trainable_params'] / 1e6:,.2f}M",
            f"{r['tokens_per_s']:,.0f}", fmt("throughput_vs_full_pct", "+.1f", "%"),
            fmt("peak_mem_gb", ".2f"), fmt("memory_reduction_x", ".2f", "x"),
            f"{r['state_mb']:,.1f}", fmt("state_reduction_x", ".2f", "x")]


# One colour per kind of contender, the same in both panels and in the legend.
COLORS = {"full": "#888888", "peft": "#ff7f0e", "peft_patched": "#2ca02c", "ours": "#1f77b4"}


def plot(fig, payload: dict) -> None:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig.set_layout_engine("constrained")  # makes room for the figure legend below the panels

    ax1, ax2 = fig.subplots(1, 2)
    rows = [r for r in payload["rows"] if "error" not in r]
    labels = [f"{r['model']}: {r['row']}" + (f" ({r['targets']})" if r["method"] != "full" else "")
              for r in rows]
    colors = [COLORS.get(r["method"], "#d62728") for r in rows]
    y = range(len(rows))
    ax1.barh(y, [r["tokens_per_s"] for r in rows], color=colors)
    ax1.set_yticks(list(y))
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("training tokens/s (higher is better)")
    cuda = bool(rows) and rows[0]["peak_mem_gb"] is not None
    ax2.barh(y, [r["peak_mem_gb"] if cuda else r["state_mb"] for r in rows], color=colors)
    ax2.set_yticks(list(y))
    ax2.set_yticklabels([])
    ax2.invert_yaxis()
    ax2.set_xlabel("peak GPU memory, GB" if cuda else "weights+grads+optimizer, MB (CPU)")
    for ax in (ax1, ax2):  # few ticks, thousands grouped: long tick labels never collide
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}" if abs(v) >= 100 else f"{v:g}")
        ax.tick_params(axis="x", labelsize=8)
    present = dict.fromkeys(r["method"] for r in rows)
    fig.legend([Patch(color=COLORS.get(m, "#d62728")) for m in present],
               [METHODS.get(m, m) for m in present], loc="outside lower center",
               ncol=len(present), fontsize=8, frameon=False)
    env = payload["env"]
    fig.suptitle(f"Training step — {env['device']} ({env['mode']}, {env['dtype']})", fontsize=10)


def main(argv=None) -> int:
    return C.cli(run, __doc__, argv, count="steps", count_help="timed steps per contender",
                 quick_help="tiny models on the CPU")


if __name__ == "__main__":
    sys.exit(main())
