#!/usr/bin/env bash
# PEFT's own test suite, unpatched vs every LoRA model patched by lora-kernels (on demand; heavy,
# not part of CI). Usage:
#   bash tests/peft_suite/run.sh PEFT_SRC_DIR OUT_DIR [pytest args...]
# PEFT_SRC_DIR: an unpacked PEFT sdist of the installed version (it has tests/), e.g.
#   pip download --no-deps --no-binary :all: peft==$(python -c "import peft; print(peft.__version__)")
# Default pytest args: tests/test_custom_models.py -k lora. Writes OUT_DIR/{unpatched,patched}.xml
# and prints the tests that pass unpatched but not patched (tests/peft_suite/compare.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
peft_src="$(cd "$1" && pwd)"; out="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(tests/test_custom_models.py -k lora)
py="${PYTHON:-python}"
cd "$peft_src"
# The sdist ships tests/ without its __init__.py (the test modules import each other relatively).
[ -f tests/__init__.py ] || touch tests/__init__.py
for mode in unpatched patched; do
  flag=1; [ "$mode" = unpatched ] && flag=0
  LK_PEFT_PATCH=$flag PYTHONPATH="$here:$repo${PYTHONPATH:+:$PYTHONPATH}" \
    "$py" -m pytest -p lk_patch_plugin -p no:cacheprovider -o addopts="" -q \
    --junitxml="$out/$mode.xml" "${args[@]}" > "$out/$mode.log" 2>&1 || true
  tail -n 3 "$out/$mode.log"
done
"$py" "$here/compare.py" "$out/unpatched.xml" "$out/patched.xml"
