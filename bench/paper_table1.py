"""The LoRA paper's Table 1 reproduced, with the rows the paper left out: *unmerged* LoRA.

What is timed: one forward pass of GPT-2 medium (``GPT2LMHeadModel`` built from its config with
random weights, full logits, ``torch.inference_mode``) at the paper's three settings
(batch/seq 32/512, 16/256, 1/128). Every contender is its own copy of the same seeded model;
all of them are built first and then timed round-robin, one trial each per round, so clock
drift hits every row alike. Each trial gets one of 4 rotating input batches; the paper's
statistic (mean of 100 trials) is reported with the median beside it.

Rows:
  * base model — what fine-tuning and *merged* LoRA cost (the merged forward is a plain linear);
  * AdapterL / AdapterH — the paper's adapter baselines (bench/adapters_baselines.py), with
    bottlenecks giving the column's adapter budget (0.5M / 11M parameters);
  * PEFT LoRA, unmerged; PEFT + ``patch_peft_model`` (when the integration exists); our fused
    ``LoRALinear``, unmerged, and the same after ``merge_lora`` (should match the base row) —
    all on ``c_attn`` (GPT-2's packed q,k,v; PEFT cannot adapt q and v alone there) with the
    rank that gives the same parameter budget;
  * 8 adapters in one heterogeneous batch (sample i uses adapter i mod 8): PEFT's
    ``adapter_names=`` and our ``MultiLoRALinear`` + ``LoRABatch`` (the batch metadata is built
    inside each timed forward, as a server would). At batch 1 only one adapter can be active.

    python bench/paper_table1.py [--quick] [--out DIR] [--trials N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapters_baselines as AB  # noqa: E402
import common  # noqa: E402
import e2e_common as C  # noqa: E402

NAME = "paper_table1"
# (batch, seq, adapter budget on GPT-2 medium) — the paper's columns.
SETTINGS = [(32, 512, 0.5e6), (16, 256, 11e6), (1, 128, 11e6)]
QUICK_SETTINGS = [(4, 32, 0.5e6), (2, 16, 11e6), (1, 8, 11e6)]
N_MULTI = 8
# The paper's Table 1 (Quadro RTX8000, mean of 100 trials, ms), for the reader's reference.
PAPER_MS = {"base": (1449.4, 338.0, 19.8), "adapter_l": (1482.0, 354.8, 23.9),
            "adapter_h": (1492.2, 366.3, 25.8)}

ROWS = {
    "base": "Fine-Tune / LoRA merged (base model)",
    "adapter_l": "AdapterL (Lin et al.)",
    "adapter_h": "AdapterH (Houlsby et al.)",
    "peft": "PEFT LoRA, unmerged",
    "peft_patched": "PEFT LoRA + patch_peft_model, unmerged",
    "ours": "lora-kernels fused LoRA, unmerged",
    "ours_merged": "lora-kernels LoRA, merged (merge_lora)",
    "peft_multi": f"PEFT LoRA, {N_MULTI} adapters mixed batch (adapter_names=)",
    "ours_multi": f"lora-kernels MultiLoRALinear, {N_MULTI} adapters mixed batch",
}


def budget_scale(cfg) -> float:
    """--quick shrinks the model; budgets shrink with it so b and r keep GPT-2 medium's ratio."""
    return (cfg.n_layer * cfg.n_embd ** 2) / (24 * 1024 ** 2)


def lora_rank(cfg, budget: float) -> int:
    """Rank on c_attn giving ``budget`` LoRA parameters: per layer r·(d + 3d)."""
    return max(1, round(budget / (cfg.n_layer * 4 * cfg.n_embd)))


def _forward(model, **kw):
    return lambda ids: model(input_ids=ids, **kw)


def _fresh(mode: C.Mode):
    return C.build_model("gpt2", mode).eval()


def build_contenders(mode: C.Mode, batch: int, seq: int, budget: float,
                     errors: dict) -> tuple[dict, dict]:
    """``{row: fn(input_ids)}`` and what each row's adapters are (params, rank/bottleneck).
    A contender that fails to build is left out of the dict with its error in ``errors``."""
    from lora_kernels import LoRABatch, merge_lora, use_lora_batch

    base = _fresh(mode)
    cfg = base.config
    budget = budget * budget_scale(cfg) if mode.quick else budget
    r = lora_rank(cfg, budget)
    lora_params = cfg.n_layer * r * 4 * cfg.n_embd
    lora_info = {"adapter_params": lora_params, "rank": r}
    names = [f"a{i % N_MULTI}" for i in range(batch)]
    multi_info = {**lora_info, "loaded_adapters": N_MULTI, "active_adapters": min(N_MULTI, batch)}
    sample_ids = (torch.arange(batch) % N_MULTI).to(mode.device)

    def adapter(kind):
        m = _fresh(mode)
        att = AB.attach_for_budget(m, kind, budget)
        return _forward(m), {"adapter_params": att.num_params, "bottleneck": att.bottleneck}

    def peft(n_adapters=1, patched=False, **kw):
        m = C.peft_lora(_fresh(mode), "gpt2", ["c_attn"], r, n_adapters=n_adapters)
        if patched:
            patch = C.patch_peft()
            if patch is None:
                return None
            m._lora_kernels_handle = patch(m)  # keep the handle alive with the model
        m.eval()  # get_peft_model leaves its model in training mode
        return _forward(m, **kw), (multi_info if n_adapters > 1 else lora_info)

    def ours_multi():
        m = C.our_multi_lora(_fresh(mode), ["c_attn"], N_MULTI, r).eval()

        def fwd(ids):
            # Metadata built per forward, as a server does for each new batch.
            with use_lora_batch(m, LoRABatch.from_sample_ids(sample_ids, seq, N_MULTI)):
                return m(input_ids=ids)
        return fwd, multi_info

    builders = {
        "base": lambda: (_forward(base), {"adapter_params": 0}),
        "adapter_l": lambda: adapter("L"),
        "adapter_h": lambda: adapter("H"),
        "peft": lambda: peft(),
        "peft_patched": lambda: peft(patched=True),
        "ours": lambda: (_forward(C.our_lora(_fresh(mode), ["c_attn"], r).eval()), lora_info),
        "ours_merged": lambda: (_forward(merge_lora(C.our_lora(_fresh(mode), ["c_attn"], r)).eval()),
                                lora_info),
        "peft_multi": lambda: peft(N_MULTI, adapter_names=names),
        "ours_multi": ours_multi,
    }
    fns, info = {}, {}
    for key, build in builders.items():
        built = C.attempt(errors, key, build)
        if built is not None:
            fns[key], info[key] = built
    info.setdefault("base", {})["budget_params"] = budget
    return fns, info


def measure_setting(mode: C.Mode, batch: int, seq: int, budget: float, trials: int,
                    warmup: int, bar=None) -> tuple[dict, dict, dict]:
    """Build every contender, warm each up, then time them round-robin. Returns
    ``(stats per row, info per row, errors per row)``."""
    errors: dict = {}
    fns, info = build_contenders(mode, batch, seq, budget, errors)
    vocab = C.gpt2_config(mode.quick).vocab_size
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, vocab, (batch, seq), generator=g).to(mode.device) for _ in range(4)]
    timer = C.Timer(mode.device)
    # no_grad rather than inference_mode: the latter breaks code that reads tensor versions
    # (see the report); the difference in overhead is the same for every row.
    with torch.no_grad():
        for row in list(fns):  # warm-up (allocator, autotuning, lazy init) per contender
            fn = fns[row]
            if C.attempt(errors, row, lambda: [fn(inputs[i % 4]) for i in range(warmup)]) is None:
                del fns[row]
        if mode.cuda:
            torch.cuda.synchronize()
        times = {row: [] for row in fns}
        for t in range(trials):
            for row, fn in fns.items():
                times[row].append(timer.once(lambda i: fn(inputs[i % len(inputs)]), t))
            if bar is not None:
                bar.update(1)
    del fns
    C.free_memory()
    return {row: C.summarize(ms) for row, ms in times.items()}, info, errors


def _measure_column(mode, batch, seq, budget, trials, warmup, bar, results) -> str:
    """One column of the table: every row at one (batch, seq, budget); appends to ``results``."""
    stats, info, errors = measure_setting(mode, batch, seq, budget, trials, warmup,
                                          bar if hasattr(bar, "update") else None)
    scaled = info["base"]["budget_params"]
    col = f"{batch}/{seq}/{C.human(scaled)}"
    base = stats.get("base")
    for row in ROWS:
        if row in stats:
            s = stats[row]
            pct = {f"pct_over_base_{k}": (100.0 * (s[f"{k}_ms"] / base[f"{k}_ms"] - 1.0)
                                          if base else None) for k in ("mean", "median")}
            entry = {**info.get(row, {}), **s, **pct}
        elif row in errors:
            entry = {**info.get(row, {}), "error": errors[row]}
        else:
            continue  # optional contender not available (patch_peft_model not written yet)
        results.append({"row": ROWS[row], "key": row, "setting": col, "batch": batch, "seq": seq,
                        "budget_params": scaled, **entry})
    return col


def run(quick: bool = False, out_dir=None, dtype=None, trials=None) -> dict:
    mode = C.resolve_mode(quick, dtype)
    settings = QUICK_SETTINGS if mode.quick else SETTINGS
    trials = trials or (10 if mode.quick else 100)
    warmup = 2 if mode.quick else 10
    cfg = C.gpt2_config(mode.quick)
    columns, results = [], []
    bar = C.progress(range(trials * len(settings)), desc=NAME, total=trials * len(settings))
    with C.quick_threads(mode):
        for batch, seq, budget in settings:
            col = _measure_column(mode, batch, seq, budget, trials, warmup, bar, results)
            columns.append(col)
        env = C.env_info(mode)
    if hasattr(bar, "close"):
        bar.close()
    settings_doc = {
        "model": "GPT-2 medium (n_layer=24, n_embd=1024, n_head=16)" if not mode.quick else
                 f"GPT-2 tiny (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head})",
        "columns": columns, "trials": trials, "warmup": warmup, "rotating_inputs": 4,
        "timing": "CUDA events per forward, synchronised" if mode.cuda else "perf_counter",
        "order": "round-robin over rows, one trial each per round",
        "lora_targets": ["c_attn"], "multi_adapters": N_MULTI,
        "budget_scale": budget_scale(cfg) if mode.quick else 1.0,
    }
    payload = common.results_payload(NAME, results, env, settings_doc, paper_ms_rtx8000=PAPER_MS)
    return C.save(payload, out_dir, markdown, plot)


def _cell(r: dict, stat: str) -> str:
    if "error" in r:
        return "error (see JSON)"
    v = r[f"{stat}_ms"]
    if r["key"] == "base" or r[f"pct_over_base_{stat}"] is None:
        return f"{v:.2f}"
    return f"{v:.2f} ({r[f'pct_over_base_{stat}']:+.1f}%)"


def _layout(payload: dict, stat: str) -> str:
    cols = payload["settings"]["columns"]
    by = {(r["key"], r["setting"]): r for r in payload["rows"]}
    keys = [k for k in ROWS if any((k, c) in by for c in cols)]
    rows = [[ROWS[k]] + [_cell(by[(k, c)], stat) if (k, c) in by else "n/a" for c in cols]
            for k in keys]
    return common.md_table(["Batch size / Sequence length / #adapter params"] +
                           [c.replace("/", " / ") for c in cols], rows)


def markdown(payload: dict) -> str:
    env, s = payload["env"], payload["settings"]
    by = {(r["key"], r["setting"]): r for r in payload["rows"]}
    detail = []
    for c in s["columns"]:
        lo = by.get(("ours", c), {})
        al, ah = by.get(("adapter_l", c), {}), by.get(("adapter_h", c), {})
        detail.append(f"{c}: LoRA r={lo.get('rank')} on c_attn ({C.human(lo.get('adapter_params', 0))}), "
                      f"AdapterL b={al.get('bottleneck')} ({C.human(al.get('adapter_params', 0))}), "
                      f"AdapterH b={ah.get('bottleneck')} ({C.human(ah.get('adapter_params', 0))})")
    paper = common.md_table(["Paper (Quadro RTX8000)", "32 / 512 / 0.5M", "16 / 256 / 11M",
                             "1 / 128 / 11M"],
                            [[ROWS[k], *(f"{v:.1f}" for v in vals)] for k, vals in PAPER_MS.items()])
    quick_note = ("\n> **--quick mode**: tiny GPT-2 on the CPU with scaled-down sizes; these numbers "
                  "show the harness works, not how the kernels perform. GPU figures come from the "
                  "full run.\n" if env["mode"] == "quick" else "")
    return f"""# LoRA paper Table 1, reproduced with unmerged LoRA

{common.env_line(env)}
{quick_note}
Forward latency of {s['model']} in ms, **mean of {s['trials']} trials** (the paper's statistic)
after {s['warmup']} warm-up calls, % over the base model in brackets.

{_layout(payload, 'mean')}

Same trials, **median**:

{_layout(payload, 'median')}

Adapter sizes per column: {'; '.join(detail)}.
LoRA rows: rank chosen for the column's parameter budget, on `c_attn` (GPT-2's packed q,k,v).
Mixed-batch rows: {s['multi_adapters']} adapters loaded, sample i uses adapter i mod {s['multi_adapters']}
(at batch 1 only one is active). Timing: {s['timing']}; {s['order']}; {s['rotating_inputs']} rotating
input batches.

For reference, the paper's own figures:

{paper}
"""


# Bar colours by kind of row; the legend says which is which.
KINDS = {"base": ("base model (no adapter work)", "#888888"),
         "adapter": ("adapter baselines (AdapterL / AdapterH)", "#9467bd"),
         "peft": ("PEFT LoRA", "#ff7f0e"),
         "peft_patched": ("PEFT LoRA + patch_peft_model (our ops)", "#2ca02c"),
         "ours": ("lora-kernels", "#1f77b4")}


def _kind(key: str) -> str:
    if key == "base" or key.startswith("adapter"):
        return "base" if key == "base" else "adapter"
    if key == "peft_patched":
        return key
    return "ours" if key.startswith("ours") else "peft"


def plot(fig, payload: dict) -> None:
    from matplotlib.patches import Patch

    fig.set_layout_engine("constrained")  # makes room for the figure legend below the panels
    cols = payload["settings"]["columns"]
    axes = fig.subplots(1, len(cols), sharey=True, squeeze=False)[0]
    by = {(r["key"], r["setting"]): r for r in payload["rows"]}
    keys = [k for k in ROWS if any((k, c) in by for c in cols)]
    for ax, c in zip(axes, cols):
        vals = [(by.get((k, c)) or {}).get("pct_over_base_median") or 0.0 for k in keys]
        ax.barh(range(len(keys)), vals, color=[KINDS[_kind(k)][1] for k in keys])
        ax.set_title(f"batch/seq/params {c}", fontsize=9)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("% over base (median)")
        ax.invert_yaxis()
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels([ROWS[k] for k in keys], fontsize=7)
    present = dict.fromkeys(_kind(k) for k in keys)
    fig.legend([Patch(color=KINDS[k][1]) for k in present], [KINDS[k][0] for k in present],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    env = payload["env"]
    fig.suptitle(f"GPT-2 forward latency vs base — {env['device']} ({env['mode']}, {env['dtype']})",
                 fontsize=10)


def main(argv=None) -> int:
    return C.cli(run, __doc__, argv, count="trials")


if __name__ == "__main__":
    sys.exit(main())
