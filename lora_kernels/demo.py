"""``lora-kernels demo``: the tour, end to end, with nothing downloaded.

1. a GPT-2-style model from a config (random weights);
2. three LoRA adapters made with PEFT (different ranks, one rsLoRA), saved in PEFT's format;
3. an ``AdapterPool`` loads the three files into device slots;
4. one adapter is fine-tuned through our fused ops (``patch_peft_model``) - the loss goes down -
   then saved again and reloaded into the pool;
5. one batch mixing the three adapters and the base model is served from the pool and checked
   against PEFT's own ``model(..., adapter_names=[...])``;
6. a table: trainable vs total parameters (the paper's ratio), time per training step and per
   mixed-batch forward against PEFT, and the largest difference from PEFT's output.
"""

from __future__ import annotations

import copy
import importlib
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

BASE = "__base__"


def _progress(iterable, desc: str, total: Optional[int] = None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: plain iteration, one line of output
        print(f"{desc} ...", flush=True)
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(ours, theirs, reps: int, desc: str) -> tuple[float, float]:
    """Best-of-``reps`` times (ms) that two callables report, run alternately after one warm-up
    call each. Alternating and taking the minimum keep a busy machine (noise only ever adds
    time) from deciding the comparison."""
    ours(), theirs()
    a, b = [], []
    for _ in _progress(range(reps), desc):
        a.append(ours())
        b.append(theirs())
    return min(a), min(b)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _sizes(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(n_layer=4, n_embd=512, n_head=8, vocab=1024, batch=16, seq=128, steps=150,
                    reps=20, dropout=0.05, alphabet=64)
    # On CPU the LoRA dropout mask comes from the reference's Philox in plain torch ops, which is
    # far slower than torch.bernoulli: the CPU tour trains without dropout.
    return dict(n_layer=2, n_embd=128, n_head=4, vocab=256, batch=8, seq=48, steps=40, reps=8,
                dropout=0.0, alphabet=32)


RULE = "each next token is (5 x token + 3) mod {a}, over the first {a} tokens of the vocabulary"


def _task(vocab: int, batch: int, seq: int, gen: torch.Generator, alphabet: int) -> torch.Tensor:
    """Sequences that follow a fixed rule (``RULE``): easy to learn, impossible for the random
    base model - so a falling loss is the adapter learning. The rule lives on a small alphabet
    (a lookup of ``alphabet`` entries, not ``vocab``) so a few dozen steps on a CPU learn most
    of it: first which tokens occur at all (loss ln V -> ln alphabet), then the rule itself."""
    toks = torch.randint(0, alphabet, (batch, 1), generator=gen)
    rows = [toks]
    for _ in range(seq - 1):
        toks = (5 * toks + 3) % alphabet
        rows.append(toks)
    return torch.cat(rows, dim=1) % vocab


def _loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def _pick_device(device: Optional[str]) -> tuple[Optional[torch.device], Optional[str]]:
    """``(device, None)``, or ``(None, a one-line reason)`` for a device the demo cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return None, (f"--device must be cpu or cuda (or cuda:N), got {device!r}"
                      + ("; for a GPU use --device cuda" if device.lower() == "gpu" else ""))
    if dev.type not in ("cpu", "cuda"):
        return None, f"--device must be cpu or cuda (or cuda:N), got {device!r}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None else
                   "no CUDA device is visible")
            return None, f"--device {device}: {why}; run with --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return None, (f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                          f"visible")
    return dev, None


def run_demo(device: Optional[str] = None, steps: Optional[int] = None) -> int:
    """Run the tour; returns the exit code (0: every check passed, 1: a check failed,
    2: cannot run here)."""
    try:
        importlib.import_module("peft")  # needed by the tour; only its presence is checked here
        import transformers
    except ImportError as exc:
        print(f"the demo needs PEFT and transformers ({exc}): pip install 'lora-kernels[peft]'")
        return 2
    dev, problem = _pick_device(device)
    if problem is not None:
        print(f"lora-kernels demo: {problem}")
        return 2
    sz = _sizes(dev)
    steps = sz["steps"] if steps is None else int(steps)
    if steps < 1:
        print("--steps must be at least 1")
        return 2
    verbosity = transformers.logging.get_verbosity()
    tmp = Path(tempfile.mkdtemp(prefix="lora-kernels-demo-"))
    try:
        # Library chatter (deprecations, PEFT's "Already unmerged") would bury the tour.
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Already unmerged")
            return _tour(dev, sz, steps, tmp)
    finally:
        transformers.logging.set_verbosity(verbosity)
        shutil.rmtree(tmp, ignore_errors=True)


def _tour(dev: torch.device, sz: dict, steps: int, tmp: Path) -> int:
    import peft
    import transformers

    from lora_kernels import AdapterPool, patch_peft_model
    from lora_kernels.ops import backend as backend_mod

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"lora-kernels demo: GPT-2-style model ({sz['n_layer']} layers, d={sz['n_embd']}, "
          f"vocab {sz['vocab']}), random weights, device {dev}, "
          f"backend {backend_mod.resolve('auto', dev, 'lora_linear')}")

    # 1. the base model, from a config (no download) ----------------------------------------
    cfg = transformers.GPT2Config(n_layer=sz["n_layer"], n_embd=sz["n_embd"], n_head=sz["n_head"],
                                  vocab_size=sz["vocab"], n_positions=max(64, sz["seq"]),
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg)
    base_state = copy.deepcopy(base.state_dict())

    # 2. three adapters with PEFT (ranks 8/4/16, one rsLoRA), saved in PEFT's format --------
    specs = {
        "sql": peft.LoraConfig(r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"],
                               fan_in_fan_out=True, lora_dropout=sz["dropout"]),
        "chat": peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True,
                                use_rslora=True, init_lora_weights=False),
        "code": peft.LoraConfig(r=16, lora_alpha=24, target_modules=["c_attn", "c_fc"],
                                fan_in_fan_out=True, init_lora_weights=False),
    }
    model = peft.get_peft_model(base, specs["sql"], adapter_name="sql")
    for name in ("chat", "code"):
        model.add_adapter(name, specs[name])
    with torch.no_grad():  # stand-ins for trained adapters: small random B, not zero
        for n, p in model.named_parameters():
            if "lora_B" in n and (".chat." in n or ".code." in n):
                p.mul_(0.05)
    model.to(dev)
    model.save_pretrained(str(tmp))  # one directory per adapter: tmp/<name>/adapter_*
    print(f"saved 3 PEFT adapters under {tmp}: " +
          ", ".join(f"{n} (r={specs[n].r})" for n in specs))

    # 3. an AdapterPool over a fresh copy of the base model ---------------------------------
    serve = transformers.GPT2LMHeadModel(cfg)
    serve.load_state_dict(base_state)
    serve.to(dev).eval()
    pool = AdapterPool(serve, ["c_attn", "c_proj", "c_fc"], num_slots=3, max_rank=16)
    for name in _progress(list(specs), "loading adapters into the pool"):
        pool.load(name, tmp / name)
    print(f"pool: {pool}")

    # 4. fine-tune 'sql' through the fused ops, then time a step against PEFT ---------------
    model.base_model.set_adapter("sql")
    trainable, total = model.get_nb_trainable_parameters()
    first, last = _fine_tune(model, patch_peft_model, sz, steps, gen, dev)
    ours_step, peft_step = _time_train_step(model, patch_peft_model, sz, gen, dev)
    model.eval()
    # the fine-tuned adapter goes back to disk in PEFT's format, and into the pool again
    model.save_pretrained(str(tmp), selected_adapters=["sql"])
    pool.load("sql", tmp / "sql")

    # 5. one mixed batch, three adapters and the base model, against PEFT -------------------
    r = _serve_and_check(model, serve, pool, patch_peft_model, sz, gen, dev)
    ok_learn = last < first - 0.05

    # 6. the table ------------------------------------------------------------------------
    _table([
        (f"trainable / total params (1 : {total / max(trainable, 1):,.0f})",
         f"{trainable:,} / {total:,}", "same adapter"),
        (f"train step, fwd+bwd (ms, best of {sz['reps']})", f"{ours_step:.2f}",
         f"{peft_step:.2f}"),
        ("mixed batch, 3 adapters + base (ms)", f"{r['pool_ms']:.2f} (pool)",
         f"{r['peft_ms']:.2f} (adapter_names)"),
        ("loss, first -> last steps", f"{first:.3f} -> {last:.3f}", ""),
        ("max |logits - PEFT adapter_names|", f"{r['diff']:.2e} (pool)",
         f"{r['diff_patched']:.2e} (patched PEFT)"),
    ])
    print(f"check vs PEFT: {'PASS' if r['ok'] else 'FAIL'} (relative error {r['rel']:.1e} pool, "
          f"{r['rel_patched']:.1e} patched PEFT; tolerance {r['tol']:.0e}); training: "
          f"{'loss went down' if ok_learn else 'loss did NOT go down'}")
    if dev.type == "cpu":
        print("note: CPU timings of a toy model measure per-layer Python overhead, not kernels; "
              "`python bench/bench_cpu_torch.py` compares the CPU path at a real size, "
              "`bash bench/gpu.sh` the Triton/CUDA kernels on a GPU")
    return 0 if r["ok"] and ok_learn else 1


def _fine_tune(model, patch, sz, steps, gen, dev) -> tuple[float, float]:
    """AdamW on the rule-following sequences with PEFT patched onto our ops; returns the mean
    loss of the first and of the last three steps."""
    with patch(model) as handle:
        c = handle.counts()
        print(f"patched {c['layers_patched']} PEFT LoRA layers onto lora-kernels "
              f"({c['layers_skipped']} left on PEFT's forward); adapters: {c['adapters_fused']} "
              f"fused, {c['adapters_fallback']} on PEFT's forward")
        print(f"the 'sql' adapter learns a rule the random base model cannot know: "
              f"{RULE.format(a=sz['alphabet'])}")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses = []
        bar = _progress(range(steps), "fine-tuning 'sql'", total=steps)
        for _ in bar:
            ids = _task(sz["vocab"], sz["batch"], sz["seq"], gen, sz["alphabet"]).to(dev)
            loss = _loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    first = sum(losses[:3]) / len(losses[:3])
    last = sum(losses[-3:]) / len(losses[-3:])
    chance = math.log(sz["vocab"])
    print(f"fine-tuned 'sql' for {steps} steps: loss {first:.3f} -> {last:.3f} (chance, a "
          f"uniform guess over {sz['vocab']} tokens: {chance:.3f}; knowing only the "
          f"{sz['alphabet']}-token alphabet: {math.log(sz['alphabet']):.3f}; knowing the rule: 0)")
    return first, last


def _time_train_step(model, patch, sz, gen, dev) -> tuple[float, float]:
    """One forward + backward, same batch and weights, patched vs PEFT's own layers."""
    ids = _task(sz["vocab"], sz["batch"], sz["seq"], gen, sz["alphabet"]).to(dev)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, ids).backward()

    def ours():
        with patch(model):  # patching is a few dict operations; the timer only sees step()
            return _timed(step, dev)

    result = _time_pair(ours, lambda: _timed(step, dev), sz["reps"],
                        "timing train steps (lora-kernels vs PEFT)")
    model.zero_grad(set_to_none=True)
    return result


def _serve_and_check(model, serve, pool, patch, sz, gen, dev) -> dict:
    names = ["sql", "chat", None, "code"] * max(1, sz["batch"] // 4)
    ids = _task(sz["vocab"], len(names), sz["seq"], gen, sz["alphabet"]).to(dev)
    peft_names = [n or BASE for n in names]

    def serve_pool():
        with pool.batch(names, tokens_per_sample=ids.shape[1]):
            return serve(ids).logits

    def serve_peft():
        return model(ids, adapter_names=peft_names).logits

    with torch.no_grad():
        got = serve_pool()
        want = serve_peft()  # PEFT itself, unpatched: the oracle
        pool_ms, peft_ms = _time_pair(lambda: _timed(serve_pool, dev),
                                      lambda: _timed(serve_peft, dev), sz["reps"],
                                      "timing mixed batches (pool vs PEFT)")
        with patch(model):  # PEFT's own adapter_names path, on multi_lora_linear
            patched = model(ids, adapter_names=peft_names).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    # every adapter must really change its samples (or agreeing with PEFT would prove little)
    effect = {n: (want[i] - base_logits[i]).abs().max().item() for i, n in enumerate(names)}
    print("max |logits - base| per sample's adapter: " +
          ", ".join(f"{n or 'base'} {v:.3f}" for n, v in effect.items()))
    ok_effect = all((v > 1e-3) if n is not None else (v == 0.0) for n, v in effect.items())

    def rel(a):
        return ((a.double() - want.double()).norm() / want.double().norm()).item()
    tol = 1e-4 if dev.type == "cpu" else 5e-3
    out = dict(pool_ms=pool_ms, peft_ms=peft_ms, tol=tol, rel=rel(got), rel_patched=rel(patched),
               diff=(got.float() - want.float()).abs().max().item(),
               diff_patched=(patched.float() - want.float()).abs().max().item())
    out["ok"] = ok_effect and out["rel"] <= tol and out["rel_patched"] <= tol
    return out


def _table(rows) -> None:
    header = ("", "lora-kernels", "PEFT")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(line)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print(line)
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(line)
