"""``lora-kernels demo --multi-train``: four adapters trained jointly in one batch.

A small Llama built from a config (random weights, nothing downloaded) gets four LoRA adapters
of different ranks, alphas and dropouts. Each learns its own synthetic task - a cycle through
four tokens of its own (disjoint sets, random starting phase), so an adapter must learn its
own "next token" map - and every training step is one forward/backward over a batch mixing
all four (``model(..., adapter_names=[...])`` in training mode, which PEFT alone
refuses). Each adapter has its own optimizer group. At the end the demo prints each adapter's
loss against chance (ln V) and a task x adapter loss table (each adapter is good at its own
task only), saves the adapters as four PEFT directories, and reloads each into plain PEFT on a
fresh copy of the base model, checking it reproduces the jointly trained outputs.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

CYCLE = 4  # tokens per task cycle
TASKS = ("count", "skip", "mirror", "shuffle")  # task i cycles through its own 4 tokens
ADAPTERS = {  # name: (rank, alpha, dropout, rslora) - deliberately all different
    "count": (8, 16, 0.0, False),
    "skip": (16, 8, 0.05, True),
    "mirror": (4, 8, 0.1, False),
    "shuffle": (12, 20, 0.0, False),
}


def _sizes() -> dict:
    return dict(vocab=32, hidden=64, layers=2, heads=4, seq=12, per_task=4, lr=2e-2)


def _base_model(sz: dict, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=sz["vocab"], hidden_size=sz["hidden"], intermediate_size=2 * sz["hidden"],
        num_hidden_layers=sz["layers"], num_attention_heads=sz["heads"],
        num_key_value_heads=sz["heads"], max_position_embeddings=64, attention_dropout=0.0,
        tie_word_embeddings=False,
        initializer_range=0.2)  # logits sharp enough to learn (0.02 caps them near chance)
    return transformers.LlamaForCausalLM(cfg)


def _cycles(vocab: int) -> dict[str, torch.Tensor]:
    """Each task's cycle: four tokens of its own, in a task-specific order."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    return {t: perm[i * CYCLE:(i + 1) * CYCLE] for i, t in enumerate(TASKS)}


def _batch(sz: dict, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``per_task`` sequences of every task, each its cycle from a random phase."""
    rows, names = [], []
    steps = torch.arange(sz["seq"])
    for name, cycle in _cycles(sz["vocab"]).items():
        phase = torch.randint(0, CYCLE, (sz["per_task"], 1), generator=gen)
        rows.append(cycle[(phase + steps) % CYCLE])
        names += [name] * sz["per_task"]
    return torch.cat(rows), names


def _per_sample_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none")
    return lp.view(ids.shape[0], -1).mean(1)


def _per_adapter(losses: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    return {a: losses[[i for i, n in enumerate(names) if n == a]].mean() for a in TASKS}


def run_multi_train(steps: Optional[int] = None, device: Optional[str] = None,
                    out_dir: Optional[str] = None, sizes: Optional[dict] = None) -> int:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"demo --multi-train needs peft and transformers ({exc}); "
              f"pip install 'lora-kernels[peft]'")
        return 2
    steps = 60 if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        print(f"--steps must be a positive int, got {steps!r}")
        return 2
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        print(f"--device: {exc}")
        return 2
    sz = dict(_sizes(), **(sizes or {}))
    if dev.type != "cpu":
        return _run_in(sz, steps, dev, out_dir)
    # One CPU thread: GEMMs this small gain nothing from more, and on a shared box the thread
    # pool's barriers cost more than the math (measured here: 10 µs vs ~15 ms per tiny mm).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_in(sz, steps, dev, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run_in(sz: dict, steps: int, dev: torch.device, out_dir: Optional[str]) -> int:
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="lora-kernels-multi-") as tmp:
            return _run(sz, steps, dev, Path(tmp))
    return _run(sz, steps, dev, Path(out_dir))


def _peft_model(sz: dict):
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = None
    for name, (r, alpha, drop, rslora) in ADAPTERS.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=drop, use_rslora=rslora,
                         target_modules=targets)
        if model is None:
            model = get_peft_model(_base_model(sz), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.set_requires_grad(list(ADAPTERS), True)  # PEFT trains only the active one by default
    return model


def _run(sz: dict, steps: int, dev: torch.device, out: Path) -> int:
    import lora_kernels as lk
    from peft import PeftModel

    torch.manual_seed(0)
    model = _peft_model(sz).to(dev)
    handle = lk.patch_peft_model(model)
    print(f"lora-kernels demo --multi-train on {dev}: Llama {sz['layers']}x{sz['hidden']}, vocab "
          f"{sz['vocab']}, {len(ADAPTERS)} adapters trained jointly "
          f"({len(handle.patched)} PEFT LoRA layers patched)")
    for name, (r, alpha, drop, rslora) in ADAPTERS.items():
        cycle = " ".join(str(int(t)) for t in _cycles(sz["vocab"])[name])
        print(f"  {name:8s} task: cycle of tokens ({cycle}); r={r:2d} alpha={alpha:2d} "
              f"dropout={drop:.2f}{' rsLoRA' if rslora else ''}")
    groups = lk.adapter_param_groups(model, lr=sz["lr"], shuffle={"lr": sz["lr"] * 0.5})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    chance = math.log(sz["vocab"])
    model.train()
    first = last = None
    t0 = time.perf_counter()
    for step in range(steps):
        ids, names = _batch(sz, gen)
        ids = ids.to(dev)
        # one forward/backward over the shared base for all four adapters
        per = _per_adapter(_per_sample_loss(model(ids, adapter_names=names).logits, ids), names)
        loss = sum(per.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vals = {a: float(v.detach()) for a, v in per.items()}
        first = first or vals
        last = vals
    secs = time.perf_counter() - t0
    tokens = steps * len(TASKS) * sz["per_task"] * sz["seq"]
    print(f"trained {steps} joint steps in {secs:.1f} s ({tokens / secs:,.0f} tokens/s, "
          f"batch {len(TASKS) * sz['per_task']} x {sz['seq']})")
    print(f"per-adapter loss (chance = ln {sz['vocab']} = {chance:.2f}):")
    ok = True
    for a in TASKS:
        below = last[a] < 0.5 * chance
        ok &= below
        print(f"  {a:8s} {first[a]:.3f} -> {last[a]:.3f}  "
              f"{'well below chance' if below else 'NOT well below chance'}")

    # Each adapter is good at its own task only.
    model.eval()
    ids, names = _batch(sz, torch.Generator().manual_seed(99))
    ids = ids.to(dev)
    print("eval loss, task (rows) x adapter (columns):")
    print("  " + " " * 8 + "".join(f"{a:>10s}" for a in TASKS))
    with torch.no_grad():
        own = True
        for task in TASKS:
            rows = [i for i, n in enumerate(names) if n == task]
            cells = []
            for a in TASKS:
                lo = _per_sample_loss(model(ids[rows], adapter_names=[a] * len(rows)).logits,
                                      ids[rows]).mean()
                cells.append(float(lo))
            own &= min(range(len(cells)), key=cells.__getitem__) == list(TASKS).index(task)
            print(f"  {task:8s}" + "".join(f"{c:10.3f}" for c in cells))
        joint = model(ids, adapter_names=names).logits
    print(f"each adapter best on its own task: {'yes' if own else 'NO'}")
    ok &= own

    paths = lk.save_peft_adapters(model, out)
    handle.unpatch()
    print(f"saved {len(paths)} PEFT adapter directories under {out}")
    worst = 0.0
    for a, path in paths.items():
        # plain PEFT, unpatched, on a freshly built copy of the base model
        fresh = PeftModel.from_pretrained(_base_model(sz), path).to(dev).eval()
        rows = [i for i, n in enumerate(names) if n == a]
        with torch.no_grad():
            diff = (fresh(ids[rows]).logits - joint[rows]).abs().max().item()
        worst = max(worst, diff / joint[rows].abs().max().item())
        print(f"  {a:8s} reloaded into plain PEFT: max |logits - joint model| = {diff:.2e}")
    # fp32 on CPU; on a GPU both sides may use TF32 GEMMs
    reproduces = worst <= (1e-5 if dev.type == "cpu" else 5e-3)
    ok &= reproduces
    print(f"reload check: {'PASS' if reproduces else 'FAIL'}")
    print("multi-train demo: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1
