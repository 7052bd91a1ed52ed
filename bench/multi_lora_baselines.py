"""The peer contenders of bench_multi_lora.py — everything that is not ours or the bare GEMM:

* ``loop_delta`` — the per-adapter loop (index tensors precomputed, graph-capturable);
* ``peft_layer`` — PEFT's ``adapter_names=`` mixed-batch forward, written out so it runs
  without PEFT;
* ``gather_delta`` — gather each token's A_i/B_i, two batched GEMVs (``torch.bmm``);
* ``load_sglang`` / ``make_sgl`` — SGLang's Triton chunked-SGMV kernels from the installed
  wheel, with the ``sglang.srt`` helpers they import stubbed when the full package won't import.

Each contender is ``fn(inputs, j)`` for rotation ``j`` (common.Inputs); LoRA-part
ones add into ``inputs.ys[j]``, which holds the base output.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
import torch

from common import Case, Inputs


# ------------------------------------------------------------------------------------------
# SGLang's kernels (optional)
# ------------------------------------------------------------------------------------------
@dataclass
class _SglBatchInfo:
    """The fields of sglang.srt.lora.utils.LoRABatchInfo its chunked kernels read."""
    use_cuda_graph: bool
    bs: int
    num_segments: int
    seg_indptr: torch.Tensor
    weight_indices: torch.Tensor
    lora_ranks: torch.Tensor
    scalings: torch.Tensor
    max_len: int
    seg_lens: torch.Tensor
    permutation: torch.Tensor
    expected_tokens: int = None
    has_active_lora: bool = True
    is_prefill: bool = False


def load_sglang():
    """``(shrink, expand, how)`` or ``(None, None, why not)``. Never imports SGLang code into
    this repository: the installed wheel is used as is, only ``sglang.srt`` helpers it imports
    are replaced in this process when the full package cannot be imported."""
    names = ("sglang.kernels.ops.lora.dense.chunked_sgmv_shrink",
             "sglang.kernels.ops.lora.dense.chunked_sgmv_expand")
    try:
        mods = [importlib.import_module(n) for n in names]
        return (mods[0].chunked_sgmv_lora_shrink_forward,
                mods[1].chunked_sgmv_lora_expand_forward, "sglang (full import)")
    except Exception as exc:  # noqa: BLE001 - any failure means: try the stubbed route
        first = f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, None, "sglang not installed"
    root = Path(list(spec.submodule_search_locations)[0])

    def package(name, path):  # a namespace stand-in that does not run the real __init__
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
        return mod

    for sub in ("", "kernels", "kernels/ops", "kernels/ops/lora", "kernels/ops/lora/dense",
                "srt", "srt/lora"):
        package("sglang" + ("." + sub.replace("/", ".") if sub else ""), root / sub)

    class _Flag:
        def get(self):
            return False

    environ = types.ModuleType("sglang.srt.environ")
    environ.envs = types.SimpleNamespace(SGLANG_ENABLE_LORA_CSGMV_SPLIT_K=_Flag(),
                                         SGLANG_ENABLE_DETERMINISTIC_INFERENCE=_Flag())
    utils = types.ModuleType("sglang.srt.utils")
    utils.cached_triton_kernel = lambda key_fn=None: (lambda fn: fn)
    utils.get_device_name = lambda i=0: (torch.cuda.get_device_name(i)
                                         if torch.cuda.is_available() else "cpu")
    lora_utils = types.ModuleType("sglang.srt.lora.utils")
    lora_utils.LoRABatchInfo = _SglBatchInfo
    sys.modules.update({"sglang.srt.environ": environ, "sglang.srt.utils": utils,
                        "sglang.srt.lora.utils": lora_utils})
    try:
        mods = [importlib.import_module(n) for n in names]
    except Exception as exc:  # noqa: BLE001
        return None, None, f"sglang not importable ({first}; stubbed: {type(exc).__name__}: {exc})"
    return (mods[0].chunked_sgmv_lora_shrink_forward, mods[1].chunked_sgmv_lora_expand_forward,
            "sglang (kernels only, sglang.srt helpers stubbed)")


def sgl_batch_info(ids: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor):
    """SGLang's chunked-SGMV metadata for per-token adapter ids (no -1 in these benchmarks):
    tokens stably sorted by adapter, cut into chunks of at most ``chunk`` tokens, chunk size
    picked from T the way SGLang's chunked backend does (16 / 32 / 128)."""
    T = ids.numel()
    chunk = 16 if T < 64 else (32 if T < 256 else 128)
    ids_cpu = ids.cpu()
    perm = torch.argsort(ids_cpu, stable=True)
    sorted_ids = ids_cpu[perm]
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    weights, lens = [], []
    for w, c in zip(uniq.tolist(), counts.tolist()):
        n = -(-c // chunk)
        weights += [w] * n
        lens += [chunk] * (n - 1) + [c - (n - 1) * chunk]
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    dev = ids.device
    i32 = dict(dtype=torch.int32, device=dev)
    return _SglBatchInfo(use_cuda_graph=False, bs=len(lens), num_segments=len(lens),
                         seg_indptr=torch.tensor(indptr, **i32),
                         weight_indices=torch.tensor(weights, **i32),
                         lora_ranks=ranks.to(**i32), scalings=scalings.to(dev, torch.float32),
                         max_len=chunk, seg_lens=torch.tensor(lens, **i32),
                         permutation=perm.to(**i32), expected_tokens=T)


# ------------------------------------------------------------------------------------------
# Per-adapter loop, PEFT's mixed batch, gather + bmm
# ------------------------------------------------------------------------------------------
def _bounds(slices):
    edges = [0]
    for w in slices:
        edges.append(edges[-1] + w)
    return list(zip(edges[:-1], edges[1:]))


def loop_delta(inp: Inputs, j: int):
    x, y, R, bounds = inp.xs[j], inp.ys[j], inp.case.r_max, _bounds(inp.case.slices)
    for slot, rows, rk in inp.groups[j]:
        xs = x.index_select(0, rows)
        parts = []
        for k, (c0, c1) in enumerate(bounds):
            xa = (xs @ inp.A[slot, k * R:k * R + rk].t()) * inp.scal[slot]
            parts.append(xa @ inp.B[slot, c0:c1, :rk].t())
        y.index_add_(0, rows, parts[0] if len(parts) == 1 else torch.cat(parts, 1))


def peft_layer(inp: Inputs, j: int):
    """PEFT's ``LoraLayer._mixed_batch_forward`` with ``adapter_names=`` (peft 0.13–0.17),
    written out so it runs without PEFT: per call, one Python scan of the sample names per
    unique adapter, then list-indexed gathers, two ``F.linear`` and an indexed add. Timed
    eagerly (its host work is part of what it costs)."""
    F = torch.nn.functional
    names, R, bounds = inp.names[j], inp.case.r_max, _bounds(inp.case.slices)
    x = inp.xs[j].view(len(names), -1, inp.case.K)
    result = F.linear(x, inp.Ws[j % len(inp.Ws)])
    unique = set(names)
    sub_batches = [[i for i, item in enumerate(names) if item == a] for a in unique]
    for adapter, idx in zip(unique, sub_batches):
        slot = int(adapter[1:])
        rk = int(inp.ranks_host[slot])
        sub = x[idx]
        outs = [F.linear(F.linear(sub, inp.A[slot, k * R:k * R + rk]), inp.B[slot, c0:c1, :rk])
                for k, (c0, c1) in enumerate(bounds)]
        result[idx] += (outs[0] if len(outs) == 1 else torch.cat(outs, -1)) * inp.scal_host[slot]
    inp.ys[j] = result.view(inp.case.T, -1)


def gather_delta(inp: Inputs, j: int):
    x, y, ids, R = inp.xs[j], inp.ys[j], inp.ids[j], inp.case.r_max
    a = inp.A.index_select(0, ids)                                   # [T, n·R, K]
    xa = torch.bmm(a, x[:, :, None]) * inp.scal[ids][:, None, None]  # [T, n·R, 1]
    b = inp.B.index_select(0, ids)                                   # [T, N, R]
    for k, (c0, c1) in enumerate(_bounds(inp.case.slices)):
        y[:, c0:c1] += torch.bmm(b[:, c0:c1], xa[:, k * R:(k + 1) * R]).squeeze(2)


def gather_fits(case: Case, dtype) -> bool:
    elem = torch.finfo(dtype).bits // 8
    return case.T * case.r_max * (len(case.slices) * case.K + sum(case.slices)) * elem < 4 << 30


def make_sgl(inp: Inputs, shrink, expand):
    inp.sgl = [sgl_batch_info(ids, inp.ranks, inp.scal) for ids in inp.ids]
    edges = [0]
    for w in inp.case.slices:
        edges.append(edges[-1] + w)
    offsets = torch.tensor(edges, dtype=torch.int32, device=inp.A.device)
    n_sl, max_w, R = len(inp.case.slices), max(inp.case.slices), inp.case.r_max
    a_sgl = inp.A
    if n_sl > 1 and inp.case.rank == "mixed":
        # SGLang's pool packs the slices of a rank-r adapter at stride r (rows j·r .. j·r + r),
        # ours at stride r_max (rows j·R ..): same weights, re-laid for its kernels.
        a_sgl = torch.zeros_like(inp.A)
        for slot, rk in enumerate(inp.ranks.tolist()):
            a_sgl[slot, :n_sl * rk] = inp.A[slot].view(n_sl, R, -1)[:, :rk].reshape(n_sl * rk, -1)

    def delta(inp_, j):
        xa = shrink(inp_.xs[j], a_sgl, inp_.sgl[j], n_sl)
        expand(xa, inp_.B, inp_.sgl[j], offsets, max_w, inp_.ys[j])
    return delta
