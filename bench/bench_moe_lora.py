"""LoRA on MoE experts (issue #18), side by side in one run, for one Qwen3-MoE-style experts
block (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, SiLU gate, top-k gate-weighted sum):

* ``base``  — the block without LoRA: ``torch._grouped_mm`` over the expert-sorted pairs
  where it runs (bf16 on sm_90), else a loop over the non-empty experts of the sorted pairs;
* ``peft``  — PEFT ``target_parameters`` LoRA (``ParamWrapper``, both projections), as PEFT runs
  it: every call folds ``W_e + s·B_e·A_e`` for all experts, then the transformers experts
  forward (its default implementation);
* ``ours``  — the same PEFT model after ``patch_peft_model``: two ``moe_lora_linear`` calls,
  the low-rank term in the grouped GEMM's accumulator, nothing expert-sized built;
* decode (``--decode``): T = 64 tokens over 16 adapters, ``moe_multi_lora_linear`` vs
  ``base`` (vLLM's ``fused_moe_lora`` is not in this environment: no column).

Modes ``fwd`` and ``fwd+bwd`` (the loss is ``y.square().mean()``; LoRA factors and x train).
Every contender's output is checked against ``base``/``peft`` before it is timed.

    python bench/bench_moe_lora.py            # GPU: E=64, top-8, H=4096, I=1536, T=8192, r=16, bf16
    python bench/bench_moe_lora.py --quick    # CPU, tiny sizes, fp32, torch backend

Writes ``bench_moe_lora.{json,md}`` under ``--out`` (default bench/results/<device>/).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (bench, env_info, env_line, md_table, results_dir,  # noqa: E402
                    results_payload, write_results)

FULL = dict(E=64, k=8, H=4096, I=1536, T=8192, r=16, dtype=torch.bfloat16)
QUICK = dict(E=8, k=2, H=64, I=48, T=64, r=4, dtype=torch.float32)


class Block(nn.Module):
    """Just the experts of a Qwen3-MoE layer (random weights from a config, no download)."""

    def __init__(self, E, H, I, k):
        super().__init__()
        import transformers
        from transformers.models.qwen3_moe import modeling_qwen3_moe as q
        cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                          num_experts_per_tok=k)
        self.experts = q.Qwen3MoeExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj, std=H ** -0.5)
        nn.init.normal_(self.experts.down_proj, std=I ** -0.5)

    def forward(self, x, ids, w):
        return self.experts(x, ids, w)


def _grouped(x_sorted, w, counts_host, offs):
    """``x_sorted [P, K]`` (expert-sorted) times each expert's ``w [E, N, K]``."""
    if x_sorted.is_cuda and hasattr(torch, "_grouped_mm") and x_sorted.dtype == torch.bfloat16:
        try:
            return torch._grouped_mm(x_sorted, w.transpose(1, 2), offs=offs)
        except RuntimeError:
            pass
    out = x_sorted.new_empty(x_sorted.shape[0], w.shape[1])
    lo = 0
    for e, n in enumerate(counts_host):
        if n:
            out[lo:lo + n] = x_sorted[lo:lo + n] @ w[e].t()
        lo += n
    return out


def base_block(ex, x, ids, w):
    """The LoRA-free block as one sorted grouped GEMM per projection."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.gate_up_proj.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    ch = counts.tolist()
    xs = x[order // k]
    gu = _grouped(xs, ex.gate_up_proj, ch, offs)
    gate, up = gu.chunk(2, dim=-1)
    ys = _grouped(torch.nn.functional.silu(gate) * up, ex.down_proj, ch, offs)
    y = torch.empty_like(ys)
    y[order] = ys
    return (y.view(x.shape[0], k, -1) * w[..., None].to(y.dtype)).sum(1)


def make(sz, dev, seed=0):
    torch.manual_seed(seed)
    import peft
    block = Block(sz["E"], sz["H"], sz["I"], sz["k"]).to(dev, sz["dtype"])
    cfg = peft.LoraConfig(r=sz["r"], lora_alpha=2 * sz["r"], target_modules=[],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          init_lora_weights=False)
    model = peft.get_peft_model(block, cfg)
    x = torch.randn(sz["T"], sz["H"], device=dev, dtype=sz["dtype"])
    logits = torch.randn(sz["T"], sz["E"], device=dev)
    w, ids = torch.topk(logits.softmax(-1), sz["k"], dim=-1)
    return model, x, ids, (w / w.sum(-1, keepdim=True)).to(sz["dtype"])


def run(sz, dev, backend, rep):
    from lora_kernels import patch_peft_model
    peft_model, x, ids, w = make(sz, dev)
    ours = copy.deepcopy(peft_model)
    patch_peft_model(ours, backend=backend)
    ex = peft_model.base_model.model.experts.get_base_layer()
    with torch.no_grad():
        y_peft = peft_model(x, ids, w)
        y_ours = ours(x, ids, w)
        y_base = base_block(ex, x, ids, w)
    err = ((y_ours.double() - y_peft.double()).norm() / y_peft.double().norm()).item()
    tol = 2e-2 if sz["dtype"] == torch.bfloat16 else 1e-4
    assert err <= tol, f"ours vs peft rel err {err:.2e}"
    rows = []

    def fwd(m):
        def f():
            with torch.no_grad():
                return m(x, ids, w)
        return f

    def step(m):
        xg = x.detach().requires_grad_()

        def f():
            m.zero_grad(set_to_none=True)
            m(xg, ids, w).float().square().mean().backward()
        return f

    def base_step():
        xg = x.detach().requires_grad_()

        def f():
            base_block(ex, xg, ids, w).float().square().mean().backward()
        return f

    cuda = dev == "cuda"
    for mode, fns in (("fwd", dict(base=lambda: base_block(ex, x, ids, w), peft=fwd(peft_model),
                                   ours=fwd(ours))),
                      ("fwd+bwd", dict(base=base_step(), peft=step(peft_model), ours=step(ours)))):
        ms = {name: bench(fn, rep=rep, cuda=cuda) for name, fn in fns.items()}
        rows.append(dict(mode=mode, **{f"{k}_ms": v for k, v in ms.items()},
                         ours_vs_base=ms["ours"] / ms["base"],
                         peft_vs_ours=ms["peft"] / ms["ours"]))
    return rows, err, float(((y_base.double() - y_peft.double()).norm()).item())


def run_decode(sz, dev, backend, rep, S=16, T=64):
    from lora_kernels import moe_multi_lora_linear
    torch.manual_seed(1)
    E, H, I, k, r, dt = sz["E"], sz["H"], sz["I"], sz["k"], sz["r"], sz["dtype"]
    T = min(T, sz["T"])
    ex = Block(E, H, I, k).to(dev, dt).experts
    x = torch.randn(T, H, device=dev, dtype=dt)
    w, ids = torch.topk(torch.randn(T, E, device=dev).softmax(-1), k, dim=-1)
    w = w.to(dt)
    slots = torch.randint(-1, S, (T,), device=dev)
    A1 = torch.randn(S, E, r, H, device=dev, dtype=dt) * H ** -0.5
    B1 = torch.randn(S, E, 2 * I, r, device=dev, dtype=dt) * 0.1
    A2 = torch.randn(S, E, r, I, device=dev, dtype=dt) * I ** -0.5
    B2 = torch.randn(S, E, H, r, device=dev, dtype=dt) * 0.1

    def ours():
        gu = moe_multi_lora_linear(x, ex.gate_up_proj, ids, A1, B1, slots, scalings=2.0,
                                   backend=backend)
        h = ex._apply_gate(gu)
        return moe_multi_lora_linear(h, ex.down_proj, ids, A2, B2, slots, scalings=2.0,
                                     topk_weights=w, backend=backend)

    with torch.no_grad():
        ms_base = bench(lambda: base_block(ex, x, ids, w), rep=rep, cuda=dev == "cuda")
        ms_ours = bench(ours, rep=rep, cuda=dev == "cuda")
    return dict(mode=f"decode T={T}, {S} adapters", base_ms=ms_base, ours_ms=ms_ours,
                ours_vs_base=ms_ours / ms_base)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny sizes, torch backend")
    p.add_argument("--out", default=None)
    p.add_argument("--no-decode", action="store_true")
    a = p.parse_args(argv)
    quick = a.quick or not torch.cuda.is_available()
    sz = QUICK if quick else FULL
    dev = "cpu" if quick else "cuda"
    backend = "torch" if quick else "triton"
    rep = 5 if quick else 200
    rows, err, _ = run(sz, dev, backend, rep)
    if not a.no_decode:
        rows.append(run_decode(sz, dev, backend, rep))
    env = env_info(sz["dtype"], quick)
    settings = {k: (str(v) if k == "dtype" else v) for k, v in sz.items()}
    settings["backend"] = backend
    payload = results_payload("bench_moe_lora", rows, env, settings, ours_vs_peft_rel_err=err)
    headers = ["mode", "base ms", "peft ms", "ours ms", "ours / base", "peft / ours"]
    table = md_table(headers, [[r["mode"], r.get("base_ms"), r.get("peft_ms"), r.get("ours_ms"),
                                r.get("ours_vs_base"), r.get("peft_vs_ours")] for r in rows])
    md = f"# MoE-LoRA experts block\n\n{env_line(env)}\n\nSettings: {settings}\n\n{table}\n"
    out = Path(a.out) if a.out else results_dir(quick)
    write_results(out, payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
