#!/usr/bin/env bash
# The one GPU script: the whole campaign in ONE budgeted device call (bench/gpu_campaign.py).
#
#   bash bench/gpu.sh --plan          # on any CPU: each stage, its estimated seconds, `total: N s`
#   bash bench/gpu.sh                 # on a lent H100/H200: every stage that fits GPU_BUDGET_S
#   bash bench/gpu.sh headline tests  # some stages: env build+smoke headline tests sanitize
#                                     # dispatch models (old names build / test / bench work too)
#
# GPU_BUDGET_S (default 480) is the wall-clock budget of the whole call; stages run in priority
# order, each killed at its deadline, and what no longer fits is skipped with a line saying so.
# $OUT (default ./gpu-out) gets three files, refreshed after every stage, so a call cut short
# still returns everything finished before it: summary.md, gpu.log, gpu-results.tgz.
#
# The device's copy of the tree has no .git: pass the commit in, and carry the wheels
# (e.g. sglang for the peer column; nvidia-cutlass headers for the CUTLASS kernels:
# `pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl`, 6.4 MB; bitsandbytes 0.50 for the
# NF4 columns and QLoRA GPU tests, 43 MB — the three must stay under the 64 MiB carry) in
# .whl/ — in one device call:
#   run(command="LORA_KERNELS_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu.sh",
#       carry=[".whl"], timeout_s=540)          # with the hash written out by the caller
# Only the repo travels: nothing here may depend on ../shared.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_campaign.py "$@"
