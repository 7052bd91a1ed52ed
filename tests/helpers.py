"""Shared test utilities: tolerances from docs (DESIGN.md numerics), error metric, devices."""

from __future__ import annotations

import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ‖out − ref‖ / ‖ref‖ against the float64 reference.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_GPU_FP32 = 5e-4  # tf32 tensor cores


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def tol(dtype: torch.dtype, device) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return TOL_GPU_FP32
    return TOL[dtype]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device() -> str | None:
    """Where Triton kernels can run in this process: 'cuda', 'cpu' (interpreter) or None."""
    if torch.cuda.is_available() and not interpreting():
        return "cuda"
    if interpreting():
        return "cpu"
    return None


def triton_dtypes(device: str) -> list:
    # The interpreter gets bfloat16 wrong: bf16 only on a GPU.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False,
          generator=None):
    """Normal values drawn in float64 (from ``generator`` if given), scaled, then rounded to
    ``dtype``: the float64 reference sees exactly the values the op sees."""
    t = (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)
    return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def f64(t, grad=None):
    """``t`` as a float64 CPU leaf for the reference (None stays None); it requires grad as
    ``t`` does, or as ``grad`` says."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad if grad is None else grad)


def assert_within_contract(name, got, want64, comp, dtype, device, context="") -> None:
    """The accuracy contract (DESIGN.md numerics): ``rel_err(got, want64)`` is within the dtype's
    tolerance or within 2x the error of ``comp``, the same computation composed from torch ops in
    ``dtype`` (None: the tolerance alone)."""
    err = rel_err(got, want64)
    bound = tol(dtype, device)
    if comp is not None:
        bound = max(bound, 2 * rel_err(comp, want64))
    assert err <= bound, f"{name}: rel_err {err:.3g} > {bound:.3g}" + (f" ({context})" if context else "")


# Prefix of the subprocess scripts that compile the Triton kernels for an H100 (sm_90) on a
# machine without one: Triton asks its driver only for these when it compiles (warmup=True).
SM90_FAKE_DRIVER = r'''
import os, sys, torch, triton
sys.path.insert(0, "bench")
from sass_report import install_fake_sm90_driver
install_fake_sm90_driver()
'''


def tiny_gpt2(n_embd=32, n_head=2, vocab=64, n_layer=2, n_positions=16, seed=None):
    """A GPT-2 built from a config with random weights (no download), its own dropout off so
    outputs are comparable between runs and implementations."""
    import transformers
    if seed is not None:
        torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                  n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def run_sm90_compile(script: str) -> str:
    """Run a compile-only script (prefixed by SM90_FAKE_DRIVER) in a process without the
    interpreter; skip when the triton wheel ships no ptxas. Returns its stdout."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout
    return proc.stdout


def capture_cuda_graph(fn):
    """``(graph, out)``: ``fn()`` run once on a side stream (what capture needs first), then
    captured; ``out`` holds the graph's outputs, rewritten by every ``graph.replay()``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _gloo_worker(rank: int, world: int, init_file: str, out_file: str, run, modes) -> None:
    """One gloo process: ``{mode: run(mode, rank)}`` for every mode, saved by rank 0; a failure
    leaves its traceback in ``out_file.err<rank>`` for the parent to show."""
    import traceback

    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        results = {mode: run(mode, rank) for mode in modes}
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(out_file + f".err{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    # Done and saved: leave without the interpreter's teardown. Once, in CI on a loaded 2-core
    # box, rank 1 aborted *after* destroy_process_group ("terminate called without an active
    # exception", exit -6) while its results were complete; what the tests check is the
    # results, not how torch's C++ threads unwind at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(run, modes, world: int, tmp, timeout: float):
    """Spawn ``world`` CPU processes over gloo, each running ``run(mode, rank)`` for every mode
    (one set of processes for all modes: spawning costs more than training here), and return
    rank 0's ``{mode: result}``. ``run`` must be a module-level function (spawn pickles it).
    Skips when torch.distributed has no gloo."""
    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file, out_file = str(tmp / "rendezvous"), str(tmp / "result.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gloo_worker, args=(r, world, init_file, out_file, run, modes))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    errs = [open(out_file + f".err{r}").read() for r in range(world)
            if os.path.exists(out_file + f".err{r}")]
    assert not errs, errs[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return torch.load(out_file)


def assert_entry_point_declared(group: str, value: str, register) -> None:
    """pyproject.toml declares ``lora_kernels = "<value>"`` under the entry-point ``group``,
    and that entry point loads ``register`` (whether or not the package was reinstalled)."""
    from importlib import metadata
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'[project.entry-points."{group}"]' in text
    assert f'lora_kernels = "{value}"' in text
    ep = metadata.EntryPoint("lora_kernels", value, group)
    assert ep.load() is register


def load_bench_tool(name: str):
    """Import ``bench/<name>.py`` (bench/ is not a package) as module ``name``; registered in
    sys.modules because dataclasses look their module up there."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class MLP(torch.nn.Module):
    """The small PEFT test model: Linear(13, 24) -> ReLU -> Linear(24, 11, no bias)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(13, 24)
        self.down = torch.nn.Linear(24, 11, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def count_calls(monkeypatch, module, names=("lora_linear", "multi_lora_linear")) -> dict:
    """``{name: calls}``, counting every call of ``module.<name>`` (monkeypatched wrappers):
    which fused op a patched layer reached."""
    calls = {name: 0 for name in names}
    for name in calls:
        orig = getattr(module, name)

        def wrap(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(module, name, wrap)
    return calls


def _own_op_body(func):
    """The Python body of a ``lora_kernels::`` custom op, or None for any other op."""
    if getattr(func, "namespace", None) != "lora_kernels":
        return None
    from torch._library.custom_ops import OPDEFS  # torch.library.custom_op's registry
    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


class LargestTensor(TorchDispatchMode):
    """``.biggest``: the most elements of any tensor an op made inside the mode — the probe of
    the "no N×K temporary" structure tests (a whole dequantized weight would show up here).
    A custom op's body is invisible to a mode (its call is one dispatch), so the body of each
    of *our* ops (``lora_kernels::*``, torch.library.custom_op) is run here with the mode on:
    its temporaries count too. ``floating``: count floating-point tensors only, by storage
    (FP8 codes are N×K bytes themselves, the Triton interpreter copies kernel arguments as
    uint8 bytes; an expanded 0-d placeholder is one value)."""

    def __init__(self, floating: bool = True):
        super().__init__()
        self.biggest, self.floating = 0, floating

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _own_op_body(func)
        if body is not None:
            with self:  # the mode is off inside its own handler: on again for the op's body
                out = body(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            if not self.floating:
                self.biggest = max(self.biggest, t.numel())
            elif t.is_floating_point() and t.element_size() > 1 and \
                    t.untyped_storage().data_ptr() not in seen:
                # a new floating tensor of ≥ 2 bytes per element (a view of an input, such as
                # the float8 view of the codes, is no temporary; 1-byte codes are no decode)
                n = t.untyped_storage().nbytes() // t.element_size()
                self.biggest = max(self.biggest, n)
        return out


def nf4_linear(n: int, k: int, dtype: torch.dtype, nested: bool, seed: int = 0):
    """A bitsandbytes NF4 ``Linear4bit`` [n, k] (no bias) quantized on the CPU, in bitsandbytes'
    portable storage layout (callers have checked that bitsandbytes is importable)."""
    import bitsandbytes as bnb
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=nested)
    return layer.to(dtype).to("cpu")


def lora_grads(model) -> dict:
    """The LoRA parameters' gradients of ``model`` by name (those that have one)."""
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def peft_step(model, x):
    """One step under the loss ``mean(y²)``: ``(y, the LoRA gradients by name)``; every LoRA
    parameter must have one."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.float() ** 2).mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def check_patched_step_matches_peft(model, x, backend, tol):
    """``patch_peft_model`` fuses both layers (q, o; a fallback warning is an error) and its
    training step, then its eval forward, equal PEFT's own; unpatched, PEFT's forward comes
    back bit for bit."""
    import warnings
    from lora_kernels import patch_peft_model
    from lora_kernels.integrations.peft import LoRAKernelsFallbackWarning
    want_y, want_g = peft_step(model, x)
    with patch_peft_model(model, backend=backend) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", LoRAKernelsFallbackWarning)  # fused, not PEFT's forward
        assert sorted(handle.patched) == ["base_model.model.o", "base_model.model.q"]
        assert not handle.skipped
        y, g = peft_step(model, x)
        assert y.dtype == want_y.dtype
        assert rel_err(y, want_y) <= tol
        for name in want_g:
            assert rel_err(g[name], want_g[name]) <= tol, name
        model.eval()
        with torch.no_grad():
            assert rel_err(model(x), want_y) <= tol  # inference (plain eager path)
        model.train()
    again, _ = peft_step(model, x)
    assert torch.equal(again, want_y)


def check_patched_dropout_trains(model, x, tol=1e-5):
    """With dropout the mask is ours (PEFT's nn.Dropout draws its own): under
    ``patch_peft_model`` (torch backend) training gives the same gradients for the same seed
    and every LoRA factor moves, and eval outputs equal PEFT's. Returns ``(training y, PEFT's
    eval y)``."""
    from lora_kernels import patch_peft_model
    model.eval()
    with torch.no_grad():
        want = model(x)
    model.train()
    with patch_peft_model(model, backend="torch"):
        torch.manual_seed(5)
        y1, g1 = peft_step(model, x)
        torch.manual_seed(5)
        _, g2 = peft_step(model, x)
        assert all(torch.equal(g1[n], g2[n]) and g1[n].abs().sum() > 0 for n in g1)
        model.eval()
        with torch.no_grad():
            assert rel_err(model(x), want) <= tol
    return y1, want


def patched_joint_step(model, x, names, backend):
    """A joint-training step ``model(x, adapter_names=names)`` of the patched model in training
    mode, fused (a fallback warning is an error): ``(y, the LoRA gradients by name)``."""
    import warnings
    from lora_kernels import patch_peft_model
    from lora_kernels.integrations.peft import LoRAKernelsFallbackWarning
    model.train()
    with patch_peft_model(model, backend=backend), warnings.catch_warnings():
        warnings.simplefilter("error", LoRAKernelsFallbackWarning)
        model.zero_grad(set_to_none=True)
        y = model(x, adapter_names=names)
        (y.float() ** 2).mean().backward()
        got = lora_grads(model)
    return y.detach(), got


def peft_mixed_oracle(model, x, names):
    """PEFT's answer for a mixed batch ``model(x, adapter_names=names)`` and its gradients under
    the loss ``mean(y²)``. The output is PEFT's own mixed forward (eval, no_grad: PEFT refuses
    adapter_names while training, and over a bitsandbytes Linear4bit its mixed forward cannot
    backward); the gradients are PEFT's single-adapter step on each adapter's own samples (the
    loss, a mean over the whole batch, is a sum over samples, which the model treats
    independently). Leaves "default" active and every LoRA factor trainable."""
    model.eval()
    with torch.no_grad():
        y = model(x, adapter_names=names)
    model.zero_grad(set_to_none=True)
    for name in sorted(set(names) - {"__base__"}):
        rows = [i for i, n in enumerate(names) if n == name]
        model.base_model.set_adapter(name)
        ((model(x[rows]).float() ** 2).sum() / y.numel()).backward()
    model.base_model.set_adapter("default")
    for n, p in model.named_parameters():  # set_adapter froze the inactive adapters
        if "lora_" in n:
            p.requires_grad_(True)
    return y, lora_grads(model)


class DecodeSpy:
    """Counts ``nf4_slabs.decode_slab`` calls (NF4 and FP8 slabs) by the slab shape's cut
    (rows of W = forward, all rows = dX) and records the largest workspace it was handed."""

    def __init__(self, monkeypatch, N):
        from lora_kernels.triton import nf4_slabs
        self.fwd = self.dx = self.biggest = 0
        real = nf4_slabs.decode_slab

        def spy(w, out, n0, n1, c0, c1):
            if n0 == 0 and n1 == N and (c0, c1) != (0, w.shape[1]):
                self.dx += 1
            else:
                self.fwd += 1
            self.biggest = max(self.biggest, out.numel())
            return real(w, out, n0, n1, c0, c1)
        monkeypatch.setattr(nf4_slabs, "decode_slab", spy)


def slab_inputs(m, n, k, r, dtype, seed=1):
    """``x [m, k], bias [n], lora_a [r, k], lora_b [n, r], dy [m, n]`` (fresh normals)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype)
    return rnd(m, k), rnd(n), rnd(r, k, sc=0.3), rnd(n, r, sc=0.3), rnd(m, n)


def check_slab_route_op(monkeypatch, op, weight, W64, dtype, p, bias, tol):
    """A quantized op (``op(x, weight, bias, a, b, ...)``) on the slab route — threshold 1, a
    workspace of 64 rows/columns so W is cut in 2+ slabs both ways, the last ragged: y and the
    grads of x, bias, lora_a, lora_b against float64 of the dequantized ``W64`` [n, k], dropout
    in training included (dX's mask from the packed bits, sliced per column slab)."""
    from lora_kernels import reference
    from lora_kernels.triton import nf4_slabs
    n, k = W64.shape
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "1")
    monkeypatch.setattr(nf4_slabs, "SLAB_BYTES", 64 * max(n, k) * 4)
    spy = DecodeSpy(monkeypatch, n)
    m, r, s = 37, 5, 0.5
    x, b, a, bb, dy = slab_inputs(m, n, k, r, dtype)
    b = b if bias else None
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, b, a, bb)]
    y = op(leaves[0], weight, leaves[1], leaves[2], leaves[3], scaling=s, dropout_p=p,
           backend="triton", dropout_seed=99)
    y.backward(dy)
    assert spy.fwd >= 2 and spy.dx >= 2, "both passes took the slab route"
    assert spy.biggest < n * k
    d = lambda t: None if t is None else t.detach().double().requires_grad_(True)
    x64, b64, a64, bb64 = d(x), d(b), d(a), d(bb)
    want = reference.lora_linear(x64, W64, b64, a64, bb64, s, p, 99)
    want.backward(dy.double())
    assert rel_err(y, want) <= tol
    for t, t64 in zip(leaves, (x64, b64, a64, bb64)):
        if t is not None:
            assert rel_err(t.grad, t64.grad) <= tol


def check_slab_probe(monkeypatch, w, n, k):
    """A training step's forward and backward of a quantized ``w`` [n, k] (NF4 or FP8,
    ``n·k`` larger than every activation) on the slab route, called at the backend functions
    (threshold 1, 64-row slabs): the probe sees the slab workspace and nothing as big as N×K."""
    from lora_kernels.triton import nf4_slabs
    from lora_kernels.triton import quant_lora as T
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_MIN_M", "1")
    monkeypatch.setattr(nf4_slabs, "SLAB_BYTES", 64 * k * 4)
    spy = DecodeSpy(monkeypatch, n)
    x, b, a, bb, dy = slab_inputs(33, n, k, 4, torch.float32)
    with LargestTensor(floating=True) as probe:
        y, xa = T.quant_lora_fwd(x, w, b, a, bb, 0.5, 0.1, 3)
        T.quant_lora_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 3, (True,) * 4)
    assert spy.fwd >= 2 and spy.dx >= 2
    assert 64 * k <= probe.biggest < n * k, "the probe saw the slab workspace, nothing larger"


def check_slab_dx_first_slab(monkeypatch, w, W64, p):
    """At large M (forced: the in-loop bound at 0) the first dX slab's GEMM of a quantized
    ``w`` runs the panel-shared mode (on the CPU's tiles schedule: in-loop) on Bᵀ and writes
    dyb and dB itself, so no shrink and no dB reduction read dY; dropout reads the packed bits
    in its epilogue. dX, dA and dB against float64 of the dequantized ``W64`` [130, 150]."""
    from lora_kernels import reference
    from lora_kernels.triton import lora_linear, lowrank, nf4_slabs
    from lora_kernels.triton import quant_lora as T
    monkeypatch.setattr(lora_linear, "FUSED_SHRINK_MAX_MR", 0)
    monkeypatch.setattr(nf4_slabs, "SLAB_BYTES", 16 * 130 * 4)
    (n, k), m, r, s = W64.shape, 33, 6, 0.5
    x, _, a, bb, dy = slab_inputs(m, n, k, r, torch.float32, seed=8)
    xa = reference.apply_dropout(x.double(), 9, p) @ a.double().t()
    shrinks = []
    real = lowrank.shrink
    monkeypatch.setattr(T, "shrink", lambda *args, **kw: shrinks.append(1) or real(*args, **kw))
    dx, _, da, dbb = T.quant_lora_bwd(dy, x, w, a, bb, xa.float(), s, p, 9,
                                      (True, False, True, True), route="slabs")
    assert not shrinks, "dyb came from the first slab's GEMM"
    dyb = dy.double() @ bb.double()
    want_dx = dy.double() @ W64 + reference.apply_dropout(s * dyb @ a.double(), 9, p)
    assert rel_err(dx, want_dx) <= 1e-5
    assert rel_err(da, s * dyb.t() @ reference.apply_dropout(x.double(), 9, p)) <= 1e-5
    assert rel_err(dbb, s * dy.double().t() @ xa) <= 1e-5

