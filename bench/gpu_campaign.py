"""The whole GPU campaign in one budgeted call (run through ``bash bench/gpu.sh``).

A lent H100/H200 comes with ~15 minutes of device time in all, machine start and idle time
included, so the campaign is one call of at most ``GPU_BUDGET_S`` seconds (default 480) of
wall clock. Stages run in priority order; each has an estimate (what the plan adds up), a
floor (below that much time left it is skipped, with a line saying so) and a cap; a stage gets
``min(cap, time left − reserve)`` and is killed at its deadline. Every stage writes into the
work folder as it goes, and after every stage ``$OUT`` is refreshed:

* ``$OUT/summary.md``    — device, commit, budget; one line per stage (ran / skipped / timed out);
                           smoke results, benchmark targets, test counts, sanitizer verdict;
* ``$OUT/gpu.log``       — this script's log, with the tail of any failing command;
* ``$OUT/gpu-results.tgz`` — the whole work folder (logs, junit, results JSON/MD/PNG, the
                           candidate dispatch table), replaced atomically after each stage.

Three files: the device tool brings back at most 8, and a call killed at its limit still
brings back what the last finished stage packed.

    bash bench/gpu.sh --plan            # CPU: the stages, their estimates, `total: N s`
    bash bench/gpu.sh                   # everything that fits in GPU_BUDGET_S
    bash bench/gpu.sh headline tests    # some stages (names below; old names build/test/bench work)
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = os.environ.get("PYTHON", sys.executable or "python3")
RESERVE_S = 10          # kept back for the last summary + tarball
PACK_EVERY_S = 30       # re-pack $OUT this often while a stage runs
HEADLINE_CONFIGS = int(os.environ.get("GPU_HEADLINE_CONFIGS", "4"))  # autotune configs per kernel

# GPU test files, most important first: the CUDA extension has never run anywhere, then the
# cuBLAS floor (the dispatch table needs its validation), then the Triton kernels, then the rest.
TEST_PRIORITY = ["tests/test_ext.py", "tests/test_cutlass.py", "tests/test_cublas_backend.py",
                 "tests/test_triton_lora_linear.py", "tests/test_triton_multi_lora.py",
                 "tests/test_numerics_edges.py", "tests/test_bad_input.py",
                 "tests/test_properties.py", "tests/test_concurrency.py"]
# memcheck on a short subset (14 tests of tests/test_ext.py: every CUDA kernel once in fp16,
# the dX dropout path, empty batches, NaN, misuse); the sanitizer slows launches 10-100x.
SANITIZE_K = ("(case0 and fp16 and (fused_gemm or shrink or expand or multi_lora_fwd)) "
              "or empty or bad_input or nan_propagates")
MODEL_BENCHES = ("serving", "training", "table1")  # lora-kernels bench --only, in this order
# tests/test_ext.py runs in two chunks, each with its own junit: the tests that validate the
# single-adapter CUDA kernels for the dispatch table (bench/dispatch_table.py OP_TESTS and
# COMMON_TESTS) first, so a stage cut short still validates what it finished.
EXT_FIRST = ("empty_batches or bad_input or fused_gemm or lora_linear_backend or "
             "public_lora_linear or dropout_mask")
EXT_CHUNKS = (("single", EXT_FIRST), ("rest", f"not ({EXT_FIRST})"))
PER_TEST_TIMEOUT_S = 120  # pytest-timeout (on the device image): a hung test fails, the rest run


@dataclass
class Stage:
    name: str
    est: int          # seconds expected on an H100/H200 with 16 cores (what --plan adds up)
    floor: int        # skip when less than this is left
    cap: int          # never more than this
    what: str
    notes: list = field(default_factory=list)


def _autotune_note() -> str:
    """What autotuning costs, from the config lists themselves (bench/autotune_budget.py)."""
    try:
        sys.path.insert(0, str(REPO / "bench"))
        os.environ.setdefault("TRITON_INTERPRET", "1")  # import-only, no GPU needed
        import autotune_budget as ab
        head, how = ab.plan_cost({"fused_gemm._TUNED[large]": 6, "fused_gemm._TUNED[small]": 2,
                                  "multi_fused": 1}, max_configs=HEADLINE_CONFIGS)
        smoke, _ = ab.plan_cost({"fused_gemm._TUNED[large]": 3, "fused_gemm._TUNED[small]": 1,
                                 "fused_gemm._TUNED[medium]": 1, "multi_fused": 1}, max_configs=1)
        return (f"autotuning: headline ≈ {head:.0f} s ({how}, ≤ {HEADLINE_CONFIGS} configs each, "
                f"~{ab.COMPILE_S_PER_CONFIG + ab.BENCH_S_PER_CONFIG:.2f} s per config); smoke ≈ "
                f"{smoke:.0f} s (1 config per kernel); later stages reuse both through "
                f"TRITON_CACHE_DIR + TRITON_CACHE_AUTOTUNING=1")
    except Exception as exc:  # noqa: BLE001 - the plan must print even without triton
        return f"autotuning: estimate unavailable ({type(exc).__name__}: {exc})"


def stages() -> list[Stage]:
    return [
        Stage("env", 15, 0, 60, "nvidia-smi, versions, wheels from .whl/ into /tmp/site, "
              "editable install (metadata only)"),
        Stage("build+smoke", 110, 45, 240, "CUDA extension build (setup.py build_ext --inplace, "
              "16 jobs) in the background | Triton bf16 smoke test vs float64 (bench/gpu_smoke.py)"),
        Stage("headline", 170, 60, 260, "one process (bench/headline.py): fused fwd, fwd+bwd vs "
              "cuBLAS/PEFT/floor at M=8192 K=N=4096 r=16; multi-adapter decode T=64 vs SGLang; "
              "prefill T=8192 64 adapters; then p=0.05 and M=1"),
        Stage("tests", 110, 30, 300, "pytest -m gpu by priority: " + ", ".join(
              Path(t).stem for t in TEST_PRIORITY) + ", then any other gpu-marked file"),
        Stage("sanitize", 45, 25, 90, "compute-sanitizer memcheck on 14 tests of test_ext.py"),
        Stage("dispatch", 5, 3, 30, "bench/dispatch_table.py on the results + junit + sanitizer "
              "logs -> candidate dispatch_table.json (not installed)"),
        Stage("models", 120, 45, 400, "model-level benches: lora-kernels bench --only " +
              ",".join(MODEL_BENCHES) + " (one process each)"),
    ]


ALIASES = {"build": ["build+smoke"], "smoke": ["build+smoke"], "test": ["tests"],
           "bench": ["headline", "models"]}


def plan(budget: int, selected: list[str]) -> int:
    print(f"GPU campaign plan: budget {budget} s (GPU_BUDGET_S), H100/H200 with 16 cores; "
          f"estimates, not measurements")
    used = 0
    for st in stages():
        if st.name not in selected:
            continue
        fits = used + st.est <= budget - RESERVE_S
        tag = "" if fits else "  [does not fit the budget by estimate: runs only if earlier stages finish early]"
        print(f"  {st.name:<12} {st.est:>4} s  (floor {st.floor} s, cap {st.cap} s)  {st.what}{tag}")
        if fits:
            used += st.est
    print(f"  {'pack':<12} {RESERVE_S:>4} s  summary + tarball after every stage, reserve at the end")
    print(f"  {_autotune_note()}")
    print(f"total: {used + RESERVE_S} s")
    return 0


# ---------------------------------------------------------------------------------------------
class Campaign:
    def __init__(self, budget: int, out: Path, work: Path):
        self.t0 = time.monotonic()
        self.budget, self.out, self.work = budget, out, work
        self.rows: list[tuple] = []   # (stage, status, seconds, estimate, note)
        self.sections: dict[str, str] = {}
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.log").write_text("")  # one campaign per log (the device empties $OUT anyway)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", TRITON_INTERPRET="0",
                        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),  # a: wgmma/TMA
                        MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
                        CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                        TRITON_CACHE_DIR=str(work / "triton-cache"), TRITON_CACHE_AUTOTUNING="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        commit = os.environ.get("LORA_KERNELS_GIT_COMMIT") or _git_head()
        self.env["LORA_KERNELS_GIT_COMMIT"] = commit or ""
        self.commit = commit or "unknown (pass LORA_KERNELS_GIT_COMMIT)"

    # -- time ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[gpu.sh {time.strftime('%H:%M:%S')} +{self.elapsed():5.0f}s] {msg}"
        print(line, flush=True)
        with open(self.out / "gpu.log", "a") as fh:
            fh.write(line + "\n")

    # -- processes ----------------------------------------------------------------------------
    def start(self, cmd: str, logname: str, env=None) -> subprocess.Popen:
        fh = open(self.work / "logs" / logname, "ab")
        return subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=env or self.env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, proc: subprocess.Popen, deadline: float) -> str:
        """'rc=N' or 'timed out' (the whole process group is killed at the deadline). While it
        runs, $OUT is re-packed every PACK_EVERY_S, so a call killed mid-stage still returns
        what that stage had written (bench results are written shape by shape)."""
        while True:
            left = deadline - time.monotonic()
            try:
                return f"rc={proc.wait(timeout=max(min(left, PACK_EVERY_S), 0.1))}"
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    self.pack()
                    continue
                break
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        return "timed out"

    def run(self, cmd: str, logname: str, deadline: float, env=None) -> str:
        self.log(f"  $ {cmd}")
        status = self.wait(self.start(cmd, logname, env), deadline)
        if status != "rc=0":
            tail = _tail(self.work / "logs" / logname, 25)
            self.log(f"  -> {status}; last lines of logs/{logname}:\n{tail}")
        return status

    # -- packing ------------------------------------------------------------------------------
    def pack(self) -> None:
        self.write_summary()
        tmp = self.out / ".gpu-results.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(self.work.iterdir()):
                if p.name in ("triton-cache",):
                    continue
                tar.add(p, arcname=p.name)
        os.replace(tmp, self.out / "gpu-results.tgz")

    def write_summary(self) -> None:
        lines = ["# GPU campaign summary", "",
                 f"commit `{self.commit}`, budget {self.budget} s, elapsed {self.elapsed():.0f} s, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
        if "env" in self.sections:
            lines += ["```", self.sections["env"], "```", ""]
        lines += ["| stage | status | seconds | estimate | note |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {st} | {sec:.0f} | {est} | {note} |" for s, st, sec, est, note in self.rows]
        for name, text in self.sections.items():
            if name != "env" and text.strip():
                lines += ["", f"## {name}", "", text.strip()]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")

    # -- stages -------------------------------------------------------------------------------
    def stage_env(self, st: Stage, deadline: float) -> str:
        whl = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
        if whl:
            self.run(f"{PY} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                     f"--upgrade --target /tmp/site .whl/*.whl", "env.log", deadline)
            self.env["PYTHONPATH"] = os.pathsep.join(("/tmp/site", self.env["PYTHONPATH"]))
        st.notes.append(f"{len(whl)} wheels from .whl/")
        # metadata only (entry points, e.g. the SGLang plugin); the extension builds next stage.
        # GPU_NO_INSTALL=1 skips it (a dry run on a development machine must not re-point its
        # venv's editable install).
        if os.environ.get("GPU_NO_INSTALL", "0") != "1":
            env = dict(self.env, LORA_KERNELS_SKIP_CUDA_BUILD="1")
            self.run(f"{PY} -m pip install -q --no-deps --no-build-isolation --no-index -e .",
                     "env.log", deadline, env)
        info = ("nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm "
                "--format=csv,noheader; " + f"{PY} -c " + shlex.quote(
                    "import json,sys; sys.path.insert(0,'bench'); import common; "
                    "print(json.dumps(common.env_info(), indent=1))"))
        status = self.run(info, "env.txt", deadline)
        self.sections["env"] = _tail(self.work / "logs" / "env.txt", 40)
        return status

    def stage_build_smoke(self, st: Stage, deadline: float) -> str:
        build = self.start(f"{PY} setup.py -q build_ext --inplace", "build.log")
        self.log(f"  build started in the background (MAX_JOBS={self.env['MAX_JOBS']})")
        smoke = self.run(f"{PY} bench/gpu_smoke.py --out {self.work}/smoke.json --max-configs 1",
                         "smoke.log", deadline)
        st.notes.append(f"smoke {smoke}")
        self.sections["smoke"] = "\n".join(
            ln for ln in _tail(self.work / "logs" / "smoke.log", 40).splitlines() if ln.startswith("[smoke]"))
        b = self.wait(build, deadline)
        st.notes.append(f"build {b}")
        check = self.run(f"{PY} -c " + shlex.quote(
            "import lora_kernels._ext as e; print('extension:', e.why_unavailable() or 'loaded')"),
            "build.log", deadline)
        ext = _tail(self.work / "logs" / "build.log", 1)
        self.log(f"  {ext}")
        st.notes.append(ext.replace("|", "/")[:120])
        return "ok" if (smoke == "rc=0" and b == "rc=0" and check == "rc=0") else "failures"

    def stage_headline(self, st: Stage, deadline: float) -> str:
        budget = max(int(deadline - time.monotonic()) - 5, 10)
        status = self.run(f"{PY} bench/headline.py --out {self.work}/results --budget {budget} "
                          f"--max-configs {HEADLINE_CONFIGS}", "headline.log", deadline)
        self.sections["headline targets"] = _targets(self.work / "results")
        return status

    def stage_tests(self, st: Stage, deadline: float) -> str:
        files = [f for f in TEST_PRIORITY if (REPO / f).exists()]
        files += [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))
                  if str(p.relative_to(REPO)) not in files and "mark.gpu" in p.read_text()]
        (self.work / "junit").mkdir(exist_ok=True)
        timeout = (f"--timeout {PER_TEST_TIMEOUT_S} "
                   if importlib.util.find_spec("pytest_timeout") is not None else "")
        runs = []
        for f in files:
            chunks = EXT_CHUNKS if f.endswith("test_ext.py") else ((None, None),)
            runs += [(f, tag, k) for tag, k in chunks]
        done, report = [], []
        for f, tag, k in runs:
            label = f + (f" [{tag}]" if tag else "")
            if deadline - time.monotonic() < 10:
                report.append(f"{label}: SKIPPED, {deadline - time.monotonic():.0f} s left in the stage")
                continue
            stem = Path(f).stem + (f"-{tag}" if tag else "")
            sel = f"-k {shlex.quote(k)} " if k else ""
            status = self.run(f"{PY} -m pytest -m gpu -q -rfE -p no:cacheprovider {timeout}{sel}"
                              f"--junitxml={self.work}/junit/{stem}.xml {f}", f"tests-{stem}.log",
                              deadline)
            if status == "rc=5":  # pytest: nothing collected (no gpu-marked test selected)
                status = "rc=0 (no gpu tests)"
            report.append(f"{label}: {status}: {_tail(self.work / 'logs' / f'tests-{stem}.log', 1)}")
            done.append(stem)
        _merge_junit(sorted((self.work / "junit").glob("*.xml")), self.work / "gpu-tests.xml")
        self.sections["gpu tests"] = "\n".join(f"* {r}" for r in report)
        st.notes.append(f"{len(done)}/{len(runs)} runs")
        if any(": rc=" in r and ": rc=0" not in r for r in report):
            return "failures"
        return "partial" if any("SKIPPED" in r for r in report) else "ok"

    def stage_sanitize(self, st: Stage, deadline: float) -> str:
        budget = max(int(deadline - time.monotonic()) - 5, 10)
        env = dict(self.env, OUT=str(self.work / "sanitize"), TOOLS="memcheck",
                   SANITIZE_BUDGET=str(budget), SANITIZE_K=SANITIZE_K)
        status = self.run("bash bench/sanitize.sh", "sanitize.log", deadline, env)
        self.sections["sanitizer"] = "\n".join(
            ln for ln in _tail(self.work / "logs" / "sanitize.log", 10).splitlines() if "[sanitize]" in ln)
        return status

    def stage_dispatch(self, st: Stage, deadline: float) -> str:
        if not (self.work / "gpu-tests.xml").exists():
            st.notes.append("no junit (tests did not run)")
            return "skipped"
        san = f"--sanitizer-dir {self.work}/sanitize" if (self.work / "sanitize").is_dir() else ""
        status = self.run(f"{PY} bench/dispatch_table.py --results {self.work}/results "
                          f"--junit {self.work}/gpu-tests.xml {san} --out {self.work}/dispatch_table.json",
                          "dispatch.log", deadline)
        self.sections["dispatch table (candidate)"] = "```\n" + _tail(self.work / "logs" / "dispatch.log", 30) + "\n```"
        return status

    def stage_models(self, st: Stage, deadline: float) -> str:
        out = []
        for name in MODEL_BENCHES:
            if deadline - time.monotonic() < st.floor:
                out.append(f"{name}: SKIPPED ({deadline - time.monotonic():.0f} s left, needs {st.floor})")
                continue
            status = self.run(f"{PY} -m lora_kernels.cli bench --out {self.work}/results --only {name}",
                              f"models-{name}.log", deadline)
            out.append(f"{name}: {status}")
        self.sections["model benches"] = "\n".join(f"* {o}" for o in out)
        return "ok" if all(o.endswith("rc=0") for o in out) else "partial"

    def go(self, selected: list[str]) -> int:
        self.log(f"GPU campaign: budget {self.budget} s, commit {self.commit}, work {self.work}")
        for st in stages():
            if st.name not in selected:
                continue
            left = self.left() - RESERVE_S
            if left < st.floor or left <= 0:
                msg = f"SKIPPED: needs >= {st.floor} s, {max(left, 0):.0f} s left of the budget"
                self.log(f"stage {st.name}: {msg}")
                self.rows.append((st.name, "skipped", 0.0, st.est, msg))
                self.pack()
                continue
            limit = min(st.cap, left)
            self.log(f"stage {st.name}: up to {limit:.0f} s (estimate {st.est} s) — {st.what}")
            t = time.monotonic()
            try:
                status = getattr(self, "stage_" + st.name.replace("+", "_"))(st, t + limit)
            except Exception as exc:  # noqa: BLE001 - one broken stage must not lose the others
                status = f"crashed: {type(exc).__name__}: {exc}"
            sec = time.monotonic() - t
            self.log(f"stage {st.name}: {status} after {sec:.0f} s")
            self.rows.append((st.name, status, sec, st.est, "; ".join(st.notes).replace("|", "/")))
            self.pack()
        self.log(f"done in {self.elapsed():.0f} s; results in {self.out}/gpu-results.tgz")
        self.pack()
        return 0


# ---------------------------------------------------------------------------------------------
def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _targets(results: Path) -> str:
    """The target lines the bench markdown files print (``* ...: **x** (target ...) — met``)."""
    lines = []
    for md in sorted(results.glob("*.md")):
        hits = [ln for ln in md.read_text(errors="replace").splitlines()
                if re.search(r"target", ln, re.I) and ln.lstrip().startswith(("*", "-", "|"))]
        if hits:
            lines += [f"**{md.stem}**", *hits, ""]
    return "\n".join(lines) or "no target lines found (did the headline bench run?)"


def _merge_junit(parts, dest: Path) -> None:
    """One junit file from the per-file ones (bench/dispatch_table.py reads one)."""
    import xml.etree.ElementTree as ET
    root = ET.Element("testsuites")
    for p in parts:
        try:
            tree = ET.parse(p).getroot()
        except ET.ParseError:
            continue  # a file cut off by the deadline
        for suite in ([tree] if tree.tag == "testsuite" else tree.iter("testsuite")):
            root.append(suite)
    ET.ElementTree(root).write(dest, encoding="unicode")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the stages and estimates (CPU)")
    ap.add_argument("stages", nargs="*", help="stage names (default: all)")
    args = ap.parse_args(argv)
    names = [s.name for s in stages()]
    selected = []
    for s in args.stages or names:
        for n in ALIASES.get(s, [s]):
            if n not in names:
                ap.error(f"unknown stage {s!r}; stages: {', '.join(names)} (aliases: {', '.join(ALIASES)})")
            selected.append(n)
    budget = int(os.environ.get("GPU_BUDGET_S", "480"))
    if args.plan:
        return plan(budget, selected)
    out = Path(os.environ.get("OUT") or REPO / "gpu-out").resolve()
    work = Path(os.environ.get("GPU_WORK") or "/tmp/lora-kernels-gpu-work").resolve()
    if work.exists():
        shutil.rmtree(work)
    return Campaign(budget, out, work).go(selected)


if __name__ == "__main__":
    sys.exit(main())
