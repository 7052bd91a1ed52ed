#!/usr/bin/env bash
# compute-sanitizer over the CUDA extension's GPU tests (tests/test_ext.py, tests/test_cutlass.py -m gpu):
# memcheck (out-of-bounds / misaligned accesses), racecheck (shared-memory hazards) and
# initcheck (reads of uninitialised device memory), one log per tool:
#
#   OUT=gpu-out bash bench/sanitize.sh            # all three tools
#   TOOLS=memcheck bash bench/sanitize.sh         # one
#   SANITIZE_K='fp16 and shrink' bash bench/sanitize.sh
#
# Logs: $OUT/sanitize-<tool>.log (the sanitizer's report, ending in "ERROR SUMMARY: N errors")
# and $OUT/sanitize-<tool>.pytest.txt. bench/dispatch_table.py --sanitizer-dir $OUT vetoes the
# CUDA backend unless every log is complete and clean.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOOLS=${TOOLS:-memcheck racecheck initcheck}
# Per tool, in seconds: a device call is capped at 10 minutes for all three.
BUDGET=${SANITIZE_BUDGET:-180}
# The sanitizer slows every launch 10-100x: one dtype family, our kernels only (no Triton
# comparisons, no public-op autograd), plus the cheap edge/misuse tests.
SUBSET=${SANITIZE_K:-"(fp16 or dropout or empty or bad_input) and not slow and not public"}

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CS=$(command -v compute-sanitizer || true)
for cand in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  [ -z "$CS" ] && [ -x "$cand" ] && CS=$cand
done
if [ -z "$CS" ]; then
  echo "compute-sanitizer not found (PATH, $CUDA_HOME/bin, $CUDA_HOME/compute-sanitizer)" | tee "$OUT/sanitize-missing.txt"
  exit 2
fi

# Without the caching allocator every tensor is its own allocation, so memcheck sees an
# out-of-bounds access even when it would land inside a cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 LORA_KERNELS_TEST_NO_TRITON=1 TRITON_INTERPRET=0

status=0
for tool in $TOOLS; do
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  echo "[sanitize] $tool: -k \"$SUBSET\" (budget ${BUDGET}s)"
  timeout "$BUDGET" "$CS" --tool "$tool" "${extra[@]}" --print-limit 50 \
      --log-file "$OUT/sanitize-$tool.log" \
      "$PY" -m pytest -q -m gpu tests/test_ext.py tests/test_cutlass.py -k "$SUBSET" -p no:cacheprovider \
      >"$OUT/sanitize-$tool.pytest.txt" 2>&1
  rc=$?
  summary=$(grep -h "ERROR SUMMARY" "$OUT/sanitize-$tool.log" | tail -1)
  echo "[sanitize] $tool exit $rc: ${summary:-no summary (timed out or crashed)}; $(tail -1 "$OUT/sanitize-$tool.pytest.txt")"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
