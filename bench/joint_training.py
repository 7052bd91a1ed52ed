"""Joint multi-adapter training rows for bench_training.py (issue #17).

K adapters (ranks spread over 8..64) trained jointly in one batch of B samples under
``patch_peft_model`` (``model(..., adapter_names=[...])`` in training mode, one AdamW over
``adapter_param_groups``), against:

* one adapter (r=16) at batch B on the same patched model: what the K-adapter step costs over
  a single-adapter step (GPU target: <= 1.10x at K = 8);
* K sequential PEFT trainings at B/K each: plain PEFT, unpatched, one adapter after the other,
  each with its own optimizer - what people run today (GPU target: joint >= 1.5x the tokens/s
  at K = 8).

Every contender processes B·seq tokens per timed unit (one joint step, one single step, or one
round of K sequential steps). tokens/s = B·seq / median time of that unit. Llama model (the
bench's own config), LoRA on all linear layers, no dropout, B zeros at init (PEFT's default:
same FLOPs as trained adapters).
"""

from __future__ import annotations

import warnings

import torch

import e2e_common as C

JOINT_K = (1, 4, 8)
KIND = "llama"
SINGLE_RANK = 16
ROWS = {"single": "1 adapter (r=16), batch B, patched", "joint": "K adapters jointly, batch B",
        "sequential": "K sequential PEFT trainings, batch B/K each"}


def ranks_for(k: int) -> list[int]:
    """K ranks spread over 8..64 in steps of 8 (K = 1: the single-adapter rank)."""
    if k == 1:
        return [SINGLE_RANK]
    return [8 + 8 * round(i * 7 / (k - 1)) for i in range(k)]


def shapes(quick: bool) -> dict:
    if quick:  # B divisible by every K
        return {"batch": 8, "seq": 32, "warmup": 1, "steps": 3}
    return {"batch": 16, "seq": 512, "warmup": 2, "steps": 10}


def _peft(mode: C.Mode, ranks: list[int]):
    from peft import LoraConfig, get_peft_model
    model = C.build_model(KIND, mode)
    targets = C.TARGETS[KIND]["all"]
    names = [f"j{i}" for i in range(len(ranks))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, r in zip(names, ranks):
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
            if name == "j0":
                model = get_peft_model(model, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
    model.set_requires_grad(names, True)
    return model.train(), names


def _time(step, mode: C.Mode, sh: dict) -> dict:
    return C.summarize(C.Timer(mode.device).run(step, sh["steps"], sh["warmup"]))


def measure(contender: str, k: int, mode: C.Mode, sh: dict) -> dict:
    import lora_kernels as lk
    B, seq = sh["batch"], sh["seq"]
    ranks = [SINGLE_RANK] if contender == "single" else ranks_for(k)
    model, names = _peft(mode, ranks)
    inputs = C.random_ids(model, B, seq, mode.device)
    handle = None
    if contender in ("single", "joint"):
        handle = lk.patch_peft_model(model)
        opt = torch.optim.AdamW(lk.adapter_param_groups(model, lr=1e-5))
        # every adapter B/K consecutive samples (a batch grouped by adapter, as a data loader
        # would build it: one run of tokens per adapter)
        per_sample = [names[i * len(names) // B] for i in range(B)]

        def step(i):
            ids = inputs[i % len(inputs)]
            kw = {} if contender == "single" else {"adapter_names": per_sample}
            model(input_ids=ids, labels=ids, **kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:  # one round: each adapter trains alone on its B/K samples, plain PEFT
        opts = {}
        for n in names:
            model.set_adapter(n)
            opts[n] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                        lr=1e-5)
        part = B // k

        def step(i):
            ids = inputs[i % len(inputs)]
            for j, n in enumerate(names):
                model.set_adapter(n)
                sub = ids[j * part:(j + 1) * part]
                model(input_ids=sub, labels=sub).loss.backward()
                opts[n].step()
                opts[n].zero_grad(set_to_none=True)
    try:
        s = _time(step, mode, sh)
    finally:
        if handle is not None:
            handle.unpatch()
    return {"model": KIND, "method": f"joint_{contender}", "target_key": "all", "k": k,
            "contender": contender, "row": ROWS[contender], "ranks": ranks, "batch": B,
            "seq": seq, "tokens_per_s": B * seq / (s["median_ms"] / 1e3), **s}


def run_rows(mode: C.Mode) -> tuple[list[dict], dict]:
    sh = shapes(mode.quick)
    todo = [("single", 1)] + [(c, k) for k in JOINT_K for c in ("joint", "sequential")]
    rows = []
    for contender, k in C.progress(todo, desc="joint training", total=len(todo)):
        errors: dict = {}
        row = C.attempt(errors, f"{contender}/K={k}", lambda: measure(contender, k, mode, sh))
        C.free_memory()
        if row is None:
            row = {"model": KIND, "method": f"joint_{contender}", "target_key": "all", "k": k,
                   "contender": contender, "row": ROWS[contender],
                   "error": next(iter(errors.values()))}
        rows.append(row)
    single = next((r for r in rows if r["contender"] == "single" and "error" not in r), None)
    for r in rows:
        if r["contender"] != "joint" or "error" in r:
            continue
        seq = next((q for q in rows if q["contender"] == "sequential" and q["k"] == r["k"]
                    and "error" not in q), None)
        if single is not None:
            r["cost_vs_single"] = r["median_ms"] / single["median_ms"]
        if seq is not None:
            r["speedup_vs_sequential"] = r["tokens_per_s"] / seq["tokens_per_s"]
    settings = {**sh, "model": KIND, "targets": C.TARGETS[KIND]["all"], "k": list(JOINT_K),
                "ranks": {k: ranks_for(k) for k in JOINT_K}, "single_rank": SINGLE_RANK,
                "optimizer": "AdamW (one per adapter for the sequential row)"}
    return rows, settings


def markdown(rows: list[dict], settings: dict) -> str:
    head = (f"## Joint multi-adapter training (issue #17)\n\n{settings['model']}, LoRA on all "
            f"linear layers, batch B={settings['batch']} x seq {settings['seq']}, median of "
            f"{settings['steps']} after {settings['warmup']} warm-up. Joint = one forward/"
            f"backward over B samples split evenly across K adapters (ranks "
            f"{settings['ranks']}); sequential = plain PEFT, K trainings of B/K each. GPU "
            f"targets at K=8: cost <= 1.10x the single adapter, >= 1.5x sequential tokens/s.\n")
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["row"], r["k"], "error: " + r["error"][:80], None, None, None])
            continue
        cost = r.get("cost_vs_single")
        speed = r.get("speedup_vs_sequential")
        table.append([r["row"], r["k"], f"{r['tokens_per_s']:,.0f}", f"{r['median_ms']:.1f}",
                      None if cost is None else f"{cost:.2f}x",
                      None if speed is None else f"{speed:.2f}x"])
    return head + "\n" + C.md_table(["Contender", "K", "tokens/s", "median ms",
                                     "cost vs 1 adapter", "tokens/s vs sequential"], table) + "\n"
