"""Triton bf16 smoke test on a GPU: one shape per kernel family against the float64 reference.

The first thing bench/gpu.sh runs (while the CUDA extension builds in the background): it
answers "do the Triton kernels compute the right thing on real hardware, in bf16" in well under
a minute, before any benchmark spends device time on them. Autotuning is bounded to
``--max-configs`` configs per kernel (default 1: correctness, not speed, is asked here), so the
cost is one compile per kernel variant.

Families: the fused single-adapter GEMM (large-M forward + backward, with and without dropout,
and the M=1 split-K decode path), the multi-adapter decode (T=64, all distinct) and prefill
(runs of tokens, with the backward), the public shrink/expand pair, and the dropout mask.
Error = ‖out − ref‖ / ‖ref‖ against float64 on the same inputs; bf16 passes at ≤ 1e-2
(docs: DESIGN.md "Numerics"); the dropout mask must be bit-identical.

    python bench/gpu_smoke.py [--out smoke.json] [--max-configs 1]

Exit status 1 if any check fails (the campaign goes on either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import autotune_budget  # noqa: E402
import lora_kernels as lk  # noqa: E402
from lora_kernels import reference as ref  # noqa: E402

TOL_BF16 = 1e-2
DEV = "cuda"


def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)


def rel_err(out, want) -> float:
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - want).norm() / want.norm().clamp_min(1e-30))


def _errors(y, y64, leaves, leaves64, dy, grads):
    """Relative errors of ``y`` against ``y64`` and, with ``grads``, of the gradients of the
    leaves (x, A, B) for one upstream ``dy`` (sent to the device in bf16)."""
    errs = {"y": rel_err(y, y64)}
    if grads:
        want = torch.autograd.grad(y64, leaves64, dy)
        got = torch.autograd.grad(y, leaves, dy.to(DEV, torch.bfloat16))
        errs.update({n: rel_err(gt, wt) for n, gt, wt in zip(("dx", "dA", "dB"), got, want)})
    return errs


def _single(M, K, N, r, p, grads, seed=0):
    """lora_linear (Triton) in bf16 vs float64, output and (optionally) dx, dA, dB."""
    g = torch.Generator().manual_seed(1000 + M + K + N + r)
    x, w = _rand(g, M, K), _rand(g, N, K, scale=K ** -0.5)
    b, a, bb = _rand(g, N), _rand(g, r, K, scale=K ** -0.5), _rand(g, N, r, scale=r ** -0.5)
    dy = _rand(g, M, N)
    s, dseed = 2.0, 1234 + seed
    leaves64 = [t.clone().requires_grad_(grads) for t in (x, a, bb)]
    y64 = ref.lora_linear(leaves64[0], w, b, leaves64[1], leaves64[2], s, p, dseed)
    leaves = [t.to(DEV, torch.bfloat16).requires_grad_(grads) for t in (x, a, bb)]
    y = lk.lora_linear(leaves[0], w.to(DEV, torch.bfloat16), b.to(DEV, torch.bfloat16), leaves[1],
                       leaves[2], scaling=s, dropout_p=p, dropout_seed=dseed, backend="triton")
    return _errors(y, y64, leaves, leaves64, dy, grads)


def _multi(T, S, K, N, r, dist, grads):
    """multi_lora_linear (Triton) in bf16 vs float64; dist 'distinct' (decode) or 'runs'."""
    g = torch.Generator().manual_seed(2000 + T + S)
    if dist == "distinct":
        ids = torch.randperm(S, generator=g)[:T].to(torch.int32)
    else:  # runs of 128 tokens per adapter, some tokens on the base model only
        ids = (torch.arange(T) // 128 % (S + 1) - 1).to(torch.int32)
    x, w, b = _rand(g, T, K), _rand(g, N, K, scale=K ** -0.5), _rand(g, N)
    A, B = _rand(g, S, r, K, scale=K ** -0.5), _rand(g, S, N, r, scale=r ** -0.5)
    sc = torch.rand(S, generator=g, dtype=torch.float64) + 0.5
    dy = _rand(g, T, N)
    leaves64 = [t.clone().requires_grad_(grads) for t in (x, A, B)]
    y64 = ref.multi_lora_linear(leaves64[0], w, b, leaves64[1], leaves64[2], ids.long(), sc)
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), num_slots=S)
    leaves = [t.to(DEV, torch.bfloat16).requires_grad_(grads) for t in (x, A, B)]
    y = lk.multi_lora_linear(leaves[0], w.to(DEV, torch.bfloat16), b.to(DEV, torch.bfloat16),
                             leaves[1], leaves[2], batch, scalings=sc.to(DEV, torch.float32),
                             backend="triton")
    return _errors(y, y64, leaves, leaves64, dy, grads)


def _shrink_expand(T=96, S=5, K=700, N=900, r=16):
    g = torch.Generator().manual_seed(3000)
    ids = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    x, A, B = _rand(g, T, K), _rand(g, S, r, K, scale=K ** -0.5), _rand(g, S, N, r, scale=r ** -0.5)
    y0, sc = _rand(g, T, N), torch.rand(S, generator=g, dtype=torch.float64) + 0.5
    xa64 = ref.lora_shrink(x, A, ids.long(), sc)
    y64 = ref.lora_expand(y0.clone(), xa64, B, ids.long())
    batch = lk.LoRABatch.from_adapter_ids(ids.to(DEV), num_slots=S)
    xa = lk.lora_shrink(x.to(DEV, torch.bfloat16), A.to(DEV, torch.bfloat16), batch,
                        scalings=sc.to(DEV, torch.float32))
    y = lk.lora_expand(y0.to(DEV, torch.bfloat16), xa, B.to(DEV, torch.bfloat16), batch)
    return {"xa": rel_err(xa, xa64), "y": rel_err(y, y64)}


def _mask(rows=67, cols=333, p=0.1, seed=2**63 + 11):
    from lora_kernels.ops import backend
    got = backend.kernel("triton", "dropout_keep_mask")(seed, rows, cols, p, DEV)
    same = torch.equal(got.cpu(), ref.dropout_keep_mask(seed, rows, cols, p))
    return {"bit_identical": 0.0 if same else 1.0}


CHECKS = [
    ("lora_linear large-M fwd+bwd", lambda: _single(1000, 1000, 1100, 16, 0.0, True)),
    ("lora_linear large-M fwd+bwd, dropout 0.1", lambda: _single(513, 1000, 1100, 16, 0.1, True)),
    ("lora_linear M=1 decode (split-K)", lambda: _single(1, 4096, 1100, 16, 0.0, False)),
    ("multi_lora decode T=64 distinct", lambda: _multi(64, 64, 1024, 1100, 16, "distinct", False)),
    ("multi_lora prefill runs fwd+bwd", lambda: _multi(2048, 8, 1024, 1100, 16, "runs", True)),
    ("lora_shrink + lora_expand", _shrink_expand),
    ("dropout mask vs reference", _mask),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON with every check's errors")
    ap.add_argument("--max-configs", type=int, default=1, help="autotune configs kept per kernel")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; nothing to check")
        return 0
    limited = autotune_budget.limit_configs(args.max_configs)
    results, failed = [], 0
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            errs = fn()
            torch.cuda.synchronize()
            ok = all(v <= (0.0 if k == "bit_identical" else TOL_BF16) for k, v in errs.items())
            res = {"check": name, "ok": ok, "errors": errs}
        except Exception as exc:  # noqa: BLE001 - report every family, not only the first failure
            res = {"check": name, "ok": False, "exception": f"{type(exc).__name__}: {exc}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        failed += not res["ok"]
        results.append(res)
        detail = res.get("errors") or res.get("exception")
        print(f"[smoke] {'ok  ' if res['ok'] else 'FAIL'} {name} ({res['seconds']} s): {detail}",
              flush=True)
    payload = {"tolerance_bf16": TOL_BF16, "autotune_configs_per_kernel": args.max_configs,
               "autotuners_limited": limited, "autotune_s": autotune_budget.tuning_seconds(),
               "checks": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
    print(f"[smoke] {len(results) - failed}/{len(results)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
