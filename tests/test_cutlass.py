"""The CUTLASS sm90 fused LoRA GEMM (csrc/kernels/cutlass/, lora_kernels/_ext/cutlass_gemm.py).

CPU (CI): where CUTLASS's headers are installed the built extension has the kernels; their SASS
(``cuobjdump`` on the built .so) holds wgmma (HGMMA) and TMA loads (UTMALDG), and ptxas's own
resource record in the cubin says no stack and no local memory (no spills), with no local loads or
stores in the code; the op's own shape/stride rule agrees with CUTLASS's ``can_implement``
(host code compiled from tests/cuda/, ~20 s of nvcc); setup.py finds the headers or says why
not; the operand helpers pad and scale exactly; the fake kernel checks shapes.

GPU (``@pytest.mark.gpu``): the op against float64 and against Triton (fp16/bf16, M/N/K off the
tile grid, r = 0 and r off the 8 grid, bias or not, forward and the transposed dX views, strided
views), and the ``cuda`` backend's lora_linear forward/backward routed through it, with dropout.
bench/dispatch_table.py lets ``auto`` pick CUDA for lora_linear only where these passed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lora_kernels import _ext, reference as ref
from lora_kernels._ext import cutlass_gemm
from lora_kernels.ops import backend as B
from helpers import f64, randn, rel_err, tol

HALF = [torch.float16, torch.bfloat16]
_DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_TAG = "LowRankMainloop"  # in the mangled name of every CUTLASS fused-GEMM kernel
N_KERNELS = 4  # (fp16, bf16) x (forward, dX)
DROPOUT_TAG = "Sm90LowRankDropoutAdd"  # the dX-with-dropout kernels' epilogue node
N_DROPOUT_KERNELS = 2  # fp16, bf16


def _headers_installed() -> bool:
    return importlib.util.find_spec("cutlass_library") is not None


@pytest.fixture(scope="module")
def so_path():
    if _ext.why_unavailable() is not None:
        pytest.skip(_ext.why_unavailable())
    import lora_kernels._C as ext
    return ext.__file__


@pytest.fixture(scope="module")
def built(so_path):
    why = _ext.why_no_cutlass()
    if why is not None:
        if _headers_installed():
            pytest.fail(f"CUTLASS headers are installed but the extension lacks the kernels: {why}")
        pytest.skip(why)
    return so_path


def _cuobjdump():
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             shutil.which("cuobjdump") or ""]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled one)")


def _per_function(text: str, header: str) -> dict:
    """Split cuobjdump output into {mangled function name: its text}."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(header, line.strip())
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


# =============================================================================================
# CPU
# =============================================================================================
def test_kernels_built_where_headers_are_installed(built):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::cuda_cutlass_lora_gemm", "CUDA")


# (tag, kernels, TMA load sites): the fused GEMMs have two descriptor pairs, (x, W0) and (u, v),
# each an A and a B load; the dX-with-dropout kernel one pair (dy, W0): u and A are read by the
# epilogue with plain loads.
SASS_CASES = [(KERNEL_TAG, N_KERNELS, 4), (DROPOUT_TAG, N_DROPOUT_KERNELS, 2)]


@pytest.mark.parametrize("tag,count,min_tma_loads", SASS_CASES, ids=["fused", "dx-dropout"])
def test_sass_has_wgmma_and_tma_and_no_spills(built, tag, count, min_tma_loads):
    tool = _cuobjdump()
    sass = subprocess.run([tool, "-sass", built], capture_output=True, text=True, check=True).stdout
    funcs = {k: v for k, v in _per_function(sass, r"Function : (\S+)").items() if tag in k}
    assert len(funcs) == count, sorted(funcs)
    for name, code in funcs.items():
        assert len(re.findall(r"\bHGMMA\.", code)) > 0, f"no wgmma in {name}"
        assert len(re.findall(r"\bUTMALDG\b", code)) >= min_tma_loads, f"too few TMA load sites in {name}"
        assert len(re.findall(r"\bUTMASTG\b", code)) > 0, f"no TMA store in the epilogue of {name}"
        assert not re.search(r"\b(LDL|STL)(\.\S+)?\s", code), f"local-memory traffic (spills) in {name}"
    # ptxas's resource record, stored in the cubin: stack frame and local memory per thread
    res = subprocess.run([tool, "-res-usage", built], capture_output=True, text=True, check=True).stdout
    usage = {k: v for k, v in _per_function(res, r"Function (\S+):").items() if tag in k}
    assert len(usage) == count
    for name, line in usage.items():
        fields = dict(re.findall(r"(\w+):(\d+)", line))
        assert fields.get("STACK") == "0" and fields.get("LOCAL") == "0", f"{name}: {line.strip()}"
        assert 0 < int(fields["REG"]) <= 255


def _setup_functions() -> dict:
    """setup.py's helper functions, without running setup()."""
    path = Path(__file__).resolve().parents[1] / "setup.py"
    src = path.read_text().split("ext_modules, cmdclass = _cuda_extension()")[0]
    ns = {"__file__": str(path), "__name__": "lk_setup"}
    exec(compile(src, str(path), "exec"), ns)
    return ns


def test_setup_finds_cutlass_or_says_why_not(monkeypatch, tmp_path):
    ns = _setup_functions()
    monkeypatch.delenv("CUTLASS_INCLUDE_DIR", raising=False)
    monkeypatch.delenv("LORA_KERNELS_SKIP_CUTLASS", raising=False)
    srcs, inc, why = ns["_cutlass_sources"]("9.0")
    assert (srcs, inc) == ([], None) and "lacks 9.0a" in why
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cutlass_library" else real(name, *a))
    srcs, inc, why = ns["_cutlass_sources"]("9.0a")
    assert (srcs, inc) == ([], None) and "nvidia-cutlass==" in why and "CUTLASS_INCLUDE_DIR" in why
    (tmp_path / "cutlass").mkdir()
    (tmp_path / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", str(tmp_path))
    srcs, inc, why = ns["_cutlass_sources"]("8.0;9.0a")
    assert inc == str(tmp_path) and why is None
    assert sorted(Path(s).name for s in srcs) == [f"lora_gemm_{d}_{k}.cu" for d in ("bf16", "f16")
                                                  for k in ("dx", "dx_dropout", "fwd")]
    monkeypatch.setenv("LORA_KERNELS_SKIP_CUTLASS", "1")
    assert ns["_cutlass_sources"]("9.0a")[1] is None


def test_op_rule_matches_cutlass_can_implement(built, tmp_path):
    """lowrank_gemm_sm90_supported (what the op checks before launching) accepts exactly what
    CUTLASS's can_implement accepts (and refuses K = 0, which would fail at descriptor
    encoding), the kernel needs no workspace and fits in shared memory.
    Host code only: compiled here with nvcc, run without a GPU."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        pytest.skip("no nvcc")
    spec = importlib.util.find_spec("cutlass_library")
    inc = os.environ.get("CUTLASS_INCLUDE_DIR") or os.path.join(spec.submodule_search_locations[0],
                                                                 "source", "include")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "can_implement"
    subprocess.run([nvcc, "-std=c++17", "-O0", "-arch=sm_90a", "--expt-relaxed-constexpr",
                    "-DNDEBUG", "-w", "-I", str(root / "csrc"), "-I", inc,
                    str(root / "tests" / "cuda" / "cutlass_can_implement.cu"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=900)
    shapes = [(8192, 4096, 4096, 16), (1, 264, 136, 8), (129, 264, 136, 16), (130, 1024, 520, 0),
              (1000, 776, 200, 72), (2051, 1544, 4104, 64), (7, 64, 8, 8),    # accepted
              (129, 264, 136, 13), (129, 260, 136, 16), (129, 264, 132, 16),  # r, N, K off 8
              (64, 64, 0, 8)]                                                  # K = 0
    lines = "".join(f"{m} {n} {k} {r} {tb}\n" for m, n, k, r in shapes for tb in (0, 1))
    out = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    assert len(out) == 2 * len(shapes)
    for line in out:
        f = dict(kv.split("=") for kv in line.split()[5:])
        m, n, k, r, _ = map(int, line.split()[:5])
        want = k > 0 and k % 8 == 0 and n % 8 == 0 and r % 8 == 0
        assert f["supported"] == str(int(want)), line
        if k > 0:  # K = 0 passes can_implement but no TMA descriptor has a 0 extent: ours refuses
            assert f["can_implement"] == f["supported"], line
        assert f["workspace"] == "0" and 0 < int(f["smem"]) <= 227 * 1024, line


def _compile_host_check(tmp_path, source: str):
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        pytest.skip("no nvcc")
    spec = importlib.util.find_spec("cutlass_library")
    inc = os.environ.get("CUTLASS_INCLUDE_DIR") or os.path.join(spec.submodule_search_locations[0],
                                                                 "source", "include")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / Path(source).stem
    subprocess.run([nvcc, "-std=c++17", "-O0", "-arch=sm_90a", "--expt-relaxed-constexpr",
                    "-DNDEBUG", "-w", "-I", str(root / "csrc"), "-I", inc,
                    str(root / "tests" / "cuda" / source), "-o", str(exe)],
                   check=True, capture_output=True, timeout=900)
    return exe


def test_dx_dropout_mask_and_rule_on_the_host(built, tmp_path):
    """The CUTLASS dX-with-dropout epilogue's per-element term (dx_dropout_term: the kernel's
    own __host__ __device__ function, run on the CPU) keeps exactly
    lora_kernels.reference.dropout_keep_mask's elements, scaled by 1/(1-p); its rule
    (lowrank_dx_dropout_sm90_supported) agrees with CUTLASS's can_implement wherever r >= 1, and
    the kernel needs no workspace and fits in shared memory (~40 s of nvcc)."""
    exe = _compile_host_check(tmp_path, "cutlass_dx_dropout_check.cu")
    grids = [(5, 37, 0, 0.05), (9, 64, 2**40 + 17, 0.1), (3, 136, 2**63 + 5, 0.1), (4, 8, 123, 0.5)]
    lines = "".join(f"mask {r} {c} {s} {p!r}\n" for r, c, s, p in grids)
    out = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    at = 0
    for rows, cols, seed, p in grids:
        got = torch.tensor([[ch == "1" for ch in out[at + i]] for i in range(rows)])
        at += rows
        assert torch.equal(got, ref.dropout_keep_mask(seed, rows, cols, p)), (rows, cols, seed, p)
    assert at == len(out)
    shapes = [(8192, 4096, 4096, 16), (129, 264, 136, 13), (1, 264, 136, 1), (333, 1032, 520, 72),
              (129, 260, 136, 16), (129, 264, 132, 16),   # N, K off 8
              (129, 264, 136, 0), (64, 64, 0, 8)]          # r = 0 (the plain kernel's), K = 0
    lines = "".join(f"impl {m} {n} {k} {r}\n" for m, n, k, r in shapes)
    res = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    assert len(res) == len(shapes)
    for line in res:
        f = dict(kv.split("=") for kv in line.split()[4:])
        m, n, k, r = map(int, line.split()[:4])
        want = k > 0 and k % 8 == 0 and n % 8 == 0 and r >= 1
        assert f["supported"] == str(int(want)), line
        if k > 0 and r >= 1:
            assert f["can_implement"] == f["supported"], line
        assert f["workspace"] == "0" and 0 < int(f["smem"]) <= 227 * 1024, line


def test_dx_dropout_routing_rule():
    t = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    dy, w, dx, a = t(256, 64), t(64, 48), t(256, 48), t(5, 48)
    ok = cutlass_gemm.usable_dx_dropout
    if _ext.why_no_cutlass() is not None:
        assert not ok(dy, w, dx, 0.1, a)
        return
    assert ok(dy, w, dx, 0.1, a) and ok(dy, w, dx, 0.05, a)
    assert not ok(dy, w, dx, 0.0, a)                      # p = 0: the fused kernel's
    assert not ok(dy, w, dx, 1.0, a)
    assert not ok(dy, w, dx, 0.1, t(0, 48))               # r = 0
    assert not ok(dy, w, dx, 0.1, t(48, 5).t())           # A not unit inner stride
    assert not ok(t(100, 64), w, t(100, 48), 0.1, a)      # below one 128-row tile
    assert not ok(dy, t(64, 44), t(256, 44), 0.1, a)      # N off 8


def test_operand_helpers_scale_pad_and_round_once():
    t = randn(5, 13)
    u = cutlass_gemm.lowrank_rows(t, 0.7, torch.float16)
    assert u.shape == (5, 16) and u.dtype == torch.float16
    assert torch.equal(u[:, 13:], torch.zeros(5, 3, dtype=torch.float16))
    assert torch.equal(u[:, :13], (t * 0.7).to(torch.float16))  # fp32 product, one rounding
    v = randn(9, 13).half()
    vp = cutlass_gemm.pad_ranks(v)
    assert vp.shape == (9, 16) and torch.equal(vp[:, :13], v) and not vp[:, 13:].any()
    v8 = randn(9, 16).half()
    assert cutlass_gemm.pad_ranks(v8) is v8  # already TMA-shaped: no copy
    a = randn(13, 24).half()  # dX's A [r, K]: zero rows up to r8
    ap = cutlass_gemm.pad_rank_rows(a)
    assert ap.shape == (16, 24) and torch.equal(ap[:13], a) and not ap[13:].any()
    a8 = randn(8, 24).half()
    assert cutlass_gemm.pad_rank_rows(a8) is a8
    assert cutlass_gemm.lowrank_rows(randn(4, 0), 2.0, torch.bfloat16).shape == (4, 0)
    assert [cutlass_gemm.rank_padded(r) for r in (0, 1, 8, 13, 64)] == [0, 8, 8, 16, 64]


def test_tma_operand_rule():
    ok = cutlass_gemm._row_ok
    assert ok(torch.empty(4, 24, dtype=torch.float16))
    assert not ok(torch.empty(4, 20, dtype=torch.float16))          # row stride 40 bytes
    assert not ok(torch.empty(24, 4, dtype=torch.float16).t())      # not unit inner stride
    big = torch.empty(4, 40, dtype=torch.float16)
    assert ok(big[:, 8:32]) and not ok(big[:, 3:27])                # aligned vs unaligned start
    assert ok(torch.empty(1, 20, dtype=torch.float16))              # one row: stride unused


def test_fake_kernel_checks_shapes(so_path):
    from torch._subclasses.fake_tensor import FakeTensorMode
    C = torch.ops.lora_kernels
    with FakeTensorMode():
        def t(*s):
            return torch.empty(*s, device="cuda", dtype=torch.bfloat16)
        C.cuda_cutlass_lora_gemm(t(8, 16), t(32, 16), t(32), t(8, 8), t(32, 8), False, t(8, 32))
        C.cuda_cutlass_lora_gemm(t(8, 32), t(32, 16), None, t(8, 8), t(8, 16), True, t(8, 16))
        with pytest.raises(RuntimeError, match="out must be"):
            C.cuda_cutlass_lora_gemm(t(8, 16), t(32, 16), None, t(8, 8), t(32, 8), False, t(8, 31))
        with pytest.raises(RuntimeError, match="v must be"):
            C.cuda_cutlass_lora_gemm(t(8, 16), t(32, 16), None, t(8, 8), t(32, 16), False, t(8, 32))
        C.cuda_cutlass_lora_dx_dropout(t(8, 32), t(32, 16), t(8, 5), t(5, 16), 0.1, 3, t(8, 16))
        with pytest.raises(RuntimeError, match="v must be"):
            C.cuda_cutlass_lora_dx_dropout(t(8, 32), t(32, 16), t(8, 5), t(4, 16), 0.1, 3, t(8, 16))
        with pytest.raises(RuntimeError, match="dropout_p"):
            C.cuda_cutlass_lora_dx_dropout(t(8, 32), t(32, 16), t(8, 5), t(5, 16), 0.0, 3, t(8, 16))


def test_backend_traces_the_cutlass_route(built, monkeypatch):
    """Under FakeTensorMode a CUTLASS-shaped call (M >= 128, K, N multiples of 8) takes the
    CUTLASS route without touching data pointers, forward and dX, odd r padded."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []
    real = cutlass_gemm.gemm
    monkeypatch.setattr(cutlass_gemm, "gemm", lambda *a: calls.append(a[5]) or real(*a))
    M, K, N, r = 130, 64, 48, 5
    with FakeTensorMode():
        def t(*s):
            return torch.empty(*s, device="cuda", dtype=torch.bfloat16)
        y, xa = _ext.lora_linear_fwd(t(M, K), t(N, K), t(N), t(r, K), t(N, r), 2.0, 0.0, 7)
        assert y.shape == (M, N) and xa.shape == (M, r)
        dx = _ext.lora_linear_bwd(t(M, N), t(M, K), t(N, K), t(r, K), t(N, r), xa, 2.0, 0.0, 7,
                                  (True, False, False, False, False))[0]
        assert dx.shape == (M, K)
        dxd = []
        real_dxd = cutlass_gemm.dx_dropout  # the real op on fake tensors: its fake runs
        monkeypatch.setattr(cutlass_gemm, "dx_dropout", lambda *a: dxd.append(a[4]) or real_dxd(*a))
        dx = _ext.lora_linear_bwd(t(M, N), t(M, K), t(N, K), t(r, K), t(N, r), xa, 2.0, 0.1, 7,
                                  (True, False, False, False, False))[0]
        assert dx.shape == (M, K) and dxd == [0.1], "dX with dropout takes the CUTLASS route"
    assert calls == [False, True]


# =============================================================================================
# GPU
# =============================================================================================
gpu = pytest.mark.gpu
DEV = "cuda"

# (M, N, K, r): M, N, K off the 128x256x64 tile grid (K, N multiples of 8: TMA), r = 0, r < BLK_K,
# r spanning two low-rank k-tiles, one row, many tiles (persistent loop revisits SMs)
CASES = [(1, 264, 136, 8), (129, 264, 136, 16), (333, 520, 1032, 8), (130, 1024, 520, 0),
         (1000, 776, 200, 72), (2051, 1544, 4104, 64)]


def _ref(a, w, bias, u, v, trans_b):
    a, w, u, v = f64(a, grad=False), f64(w, grad=False), f64(u, grad=False), f64(v, grad=False)
    wt, vt = (w, v) if trans_b else (w.t(), v.t())
    out = a @ wt + u @ vt
    return out if bias is None else out + f64(bias, grad=False)


@gpu
@pytest.mark.parametrize("trans_b,bias", [(False, False), (False, True), (True, False)],
                         ids=["fwd", "fwd-bias", "dx"])  # bias is forward-only
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DT_ID[d])
@pytest.mark.parametrize("case", CASES)
def test_gpu_cutlass_lora_gemm(built, case, dtype, trans_b, bias):
    M, N, K, r = case
    C = torch.ops.lora_kernels
    a = randn(M, K, dtype=dtype, device=DEV)
    w = randn(*((K, N) if trans_b else (N, K)), dtype=dtype, device=DEV, scale=K ** -0.5)
    u = randn(M, r, dtype=dtype, device=DEV)
    v = randn(*((r, N) if trans_b else (N, r)), dtype=dtype, device=DEV, scale=0.3)
    b = randn(N, dtype=dtype, device=DEV) if bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    C.cuda_cutlass_lora_gemm(a, w, b, u, v, trans_b, out)
    want = _ref(a, w, b, u, v, trans_b)
    assert not out.isnan().any(), "every output element must be written"
    assert rel_err(out, want) <= tol(dtype, DEV)
    wt, vt = (w, v) if trans_b else (w.t(), v.t())
    comp = a @ wt + u @ vt + (0 if b is None else b)  # same-dtype torch composition
    assert rel_err(out, want) <= 2 * rel_err(comp, want) + 1e-6
    # the hand-written kernel computes the same thing (scaling 1, no dropout)
    hand = torch.empty_like(out)
    C.cuda_fused_lora_gemm(a, w, b, u, v, 1.0, 0.0, 0, trans_b, hand)
    assert rel_err(out, hand.double()) <= 2 * tol(dtype, DEV)


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DT_ID[d])
def test_gpu_cutlass_lora_gemm_strided_views(built, dtype):
    M, N, K, r = 300, 264, 192, 16
    C = torch.ops.lora_kernels
    a = randn(M, K, dtype=dtype, device=DEV)
    w_big = randn(N, K + 40, dtype=dtype, device=DEV, scale=K ** -0.5)
    w = w_big[:, 8:8 + K]  # row stride K + 40, 16-byte aligned start
    u = randn(M, r, dtype=dtype, device=DEV)
    v = randn(N, r, dtype=dtype, device=DEV)
    big = torch.zeros(M, N + 24, dtype=dtype, device=DEV)
    out = big[:, 8:8 + N]
    C.cuda_cutlass_lora_gemm(a, w, None, u, v, False, out)
    assert rel_err(out, _ref(a, w, None, u, v, False)) <= tol(dtype, DEV)
    assert not big[:, :8].any() and not big[:, 8 + N:].any(), "TMA store stayed inside the view"
    with pytest.raises(RuntimeError, match="TMA-compatible"):  # 2-byte offset start
        C.cuda_cutlass_lora_gemm(a, w_big[:, 1:1 + K], None, u, v, False, out)


# (M, N, K, r) of dX with dropout: out [M, N] = dy [M, K]·W0 [K, N] + keep∘(u·A)/(1-p); M, N, K
# off the 128x128x64 tile grid (N, K multiples of 8: TMA), r = 1, odd r, r > 64, many tiles.
DX_DROPOUT_CASES = [(129, 136, 264, 13), (1, 264, 136, 1), (333, 1032, 520, 16), (1000, 776, 200, 72),
                    (2051, 1544, 4104, 64)]


@gpu
@pytest.mark.parametrize("p", [0.05, 0.1])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DT_ID[d])
@pytest.mark.parametrize("case", DX_DROPOUT_CASES)
def test_gpu_cutlass_dx_dropout(built, case, dtype, p):
    M, N, K, r = case
    C = torch.ops.lora_kernels
    seed = 2**40 + 17
    dy = randn(M, K, dtype=dtype, device=DEV)
    w = randn(K, N, dtype=dtype, device=DEV, scale=K ** -0.5)
    u = randn(M, r, dtype=dtype, device=DEV)
    v = randn(r, N, dtype=dtype, device=DEV, scale=0.3)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    C.cuda_cutlass_lora_dx_dropout(dy, w, u, v, p, seed, out)
    keep = ref.dropout_keep_mask(seed, M, N, p, DEV)
    d = lambda t: f64(t, grad=False)  # noqa: E731
    want = d(dy) @ d(w) + keep * (d(u) @ d(v)) / (1 - p)
    assert not out.isnan().any(), "every output element must be written"
    assert rel_err(out, want) <= tol(dtype, DEV)
    # the mask is where it should be: the low-rank part alone, measured on the dropped elements
    base = d(dy) @ d(w)
    assert rel_err(out.double()[~keep], base[~keep]) <= tol(dtype, DEV)
    # the hand-written mma.sync kernel computes the same thing (scaling 1)
    hand = torch.empty_like(out)
    C.cuda_fused_lora_gemm(dy, w, None, u, v, 1.0, p, seed, True, hand)
    assert rel_err(out, hand.double()) <= 2 * tol(dtype, DEV)


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DT_ID[d])
def test_gpu_cutlass_dx_dropout_refuses_with_its_rule(built, dtype):
    C = torch.ops.lora_kernels
    dy = randn(256, 72, dtype=dtype, device=DEV)
    big = randn(72, 80, dtype=dtype, device=DEV)
    u, v = randn(256, 4, dtype=dtype, device=DEV), randn(4, 64, dtype=dtype, device=DEV)
    out = torch.zeros(256, 64, dtype=dtype, device=DEV)
    with pytest.raises(RuntimeError, match="lowrank_dx_dropout_sm90_supported"):  # 2-byte offset start
        C.cuda_cutlass_lora_dx_dropout(dy, big[:, 1:65], u, v, 0.1, 3, out)
    assert not out.any(), "a refused call writes nothing"


@gpu
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.2])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DT_ID[d])
@pytest.mark.parametrize("shape", [(129, 136, 264, 13), (520, 1032, 776, 16), (300, 64, 128, 1)])
def test_gpu_cutlass_lora_linear(built, monkeypatch, shape, dtype, p):
    """The cuda backend's lora_linear on the CUTLASS kernels (forward; dX on the fused kernel
    without dropout, on the dX-with-dropout kernel with it), against float64 and Triton."""
    M, K, N, r = shape
    calls = []
    real, real_dxd = cutlass_gemm.gemm, cutlass_gemm.dx_dropout
    monkeypatch.setattr(cutlass_gemm, "gemm", lambda *a: calls.append(a[5]) or real(*a))
    monkeypatch.setattr(cutlass_gemm, "dx_dropout", lambda *a: calls.append("dx_dropout") or real_dxd(*a))
    x = randn(M, K, dtype=dtype, device=DEV)
    W = randn(N, K, dtype=dtype, device=DEV, scale=K ** -0.5)
    b = randn(N, dtype=dtype, device=DEV)
    A = randn(r, K, dtype=dtype, device=DEV, scale=K ** -0.5)
    Bm = randn(N, r, dtype=dtype, device=DEV)
    seed = 2**40 + 17
    y, xa = _ext.lora_linear_fwd(x, W, b, A, Bm, 0.5, p, seed)
    d = lambda t: f64(t, grad=False)  # noqa: E731
    y64, xa64 = ref.lora_linear_forward(d(x), d(W), d(b), d(A), d(Bm), 0.5, p, seed)
    assert rel_err(y, y64) <= tol(dtype, DEV)
    dy = randn(M, N, dtype=dtype, device=DEV)
    got = _ext.lora_linear_bwd(dy, x, W, A, Bm, xa, 0.5, p, seed, (True,) * 5)
    want = ref.lora_linear_backward(d(dy), d(x), d(W), d(A), d(Bm), xa64, 0.5, p, seed, (True,) * 5)
    for g, w_ in zip(got, want):
        assert rel_err(g, w_) <= 2 * tol(dtype, DEV)
    assert calls == [False, True if p == 0.0 else "dx_dropout"], "routed through the CUTLASS kernels"
    if os.environ.get("LORA_KERNELS_TEST_NO_TRITON") != "1":
        tri_y, _ = B.kernel("triton", "lora_linear_fwd")(x, W, b, A, Bm, 0.5, p, seed, None)
        assert rel_err(y, tri_y) <= 2 * tol(dtype, DEV)
        tri_dx = B.kernel("triton", "lora_linear_bwd")(dy, x, W, A, Bm, xa, 0.5, p, seed,
                                                       (True, False, False, False, False))[0]
        assert rel_err(got[0], tri_dx.double()) <= 2 * tol(dtype, DEV)
