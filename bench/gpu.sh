#!/usr/bin/env bash
# The one GPU script: on a lent H100/H200 (or any CUDA box) it installs the package (building
# the CUDA extension with the machine's nvcc), runs the GPU tests, the benchmarks and the
# sanitizers, and writes logs + results under $OUT (default ./gpu-out).
#
#   bash bench/gpu.sh                 # all stages: build test bench
#   bash bench/gpu.sh build test      # some stages (each device call is capped at 10 min)
#   bash bench/gpu.sh sanitize        # compute-sanitizer memcheck/racecheck/initcheck
#
# Only the repo travels to the device: nothing here may depend on ../shared. Extra wheels
# (e.g. sglang for the peer column) travel in .whl/ and are installed into /tmp/site.
# The CUTLASS kernels need the headers wheel there too (`pip download --no-deps
# nvidia-cutlass==4.2.0.0 -d .whl`); without it the build skips them and their tests skip.
# The device tool brings back at most 8 files from $OUT, so logs and results are written to
# $OUT/work/ and packed into $OUT/gpu-results.tgz at the end; the summary files stay beside it.
# The device's copy of the tree has no .git: pass the commit in, e.g. (expanded by the caller)
#   LORA_KERNELS_GIT_COMMIT=<output of `git rev-parse HEAD` here> bash bench/gpu.sh
# Results record git_commit null when it is neither passed nor readable from git.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-$PWD/gpu-out}
OUT=$FINAL/work
mkdir -p "$OUT"
export LORA_KERNELS_GIT_COMMIT=${LORA_KERNELS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
export PYTHONUNBUFFERED=1
STAGES=${*:-build test bench}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # "a": wgmma/TMA (CUTLASS kernels)
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TRITON_INTERPRET=0

log() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu.log"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$OUT/gpu.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi || true
  # the same record every results JSON carries (bench/common.env_info)
  $PY -c 'import json, sys; sys.path.insert(0, "bench"); import common; print(json.dumps(common.env_info(), indent=2))'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/gpu.log"

for stage in $STAGES; do
  case $stage in
    build)
      log "build: pip install -e . (CUDA extension, arch $TORCH_CUDA_ARCH_LIST)"
      start=$(date +%s)
      $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
        || { log "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; }
      log "build took $(( $(date +%s) - start )) s"
      $PY -c "import lora_kernels._ext as e; print('extension:', e.why_unavailable() or 'loaded', '| CUTLASS sm90 GEMM:', e.why_no_cutlass() or 'built')" 2>&1 | tee -a "$OUT/gpu.log"
      ;;
    test)
      log "test: pytest -m gpu"
      $PY -m pytest -m gpu -q -rA --junitxml="$OUT/gpu-tests.xml" -p no:cacheprovider \
        >"$OUT/gpu-tests.txt" 2>&1
      log "gpu tests exit $? : $(tail -1 "$OUT/gpu-tests.txt")"
      ;;
    bench)
      mkdir -p "$OUT/results"
      for script in bench/bench_lora_linear.py bench/bench_multi_lora.py; do
        [ -f "$script" ] || continue
        log "bench: $script"
        $PY "$script" --out "$OUT/results" >"$OUT/$(basename "$script" .py).log" 2>&1
        log "$script exit $?"
      done
      log "bench: lora-kernels bench (paper table, training, serving)"
      $PY -m lora_kernels.cli bench --out "$OUT/results" --only paper_table1,training,serving \
        >"$OUT/bench_suite.log" 2>&1
      log "suite exit $?"
      ;;
    sanitize)
      if [ -f bench/sanitize.sh ]; then
        log "sanitize"
        OUT="$OUT" bash bench/sanitize.sh >"$OUT/sanitize.log" 2>&1
        log "sanitize exit $?"
      fi
      ;;
    *) log "unknown stage $stage";;
  esac
done
log "done"
tar czf "$FINAL/gpu-results.tgz" -C "$OUT" . 2>/dev/null
for f in gpu.log env.txt gpu-tests.txt; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"; done
echo "results packed in $FINAL/gpu-results.tgz"
