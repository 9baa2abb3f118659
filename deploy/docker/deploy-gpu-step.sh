#!/usr/bin/env bash
# Create the nvidia-gpu work pool (if missing) and its step deployment compress-step/nvidia-gpu from
# deploy/prefect.yaml: where a compress-model run sends the backends its policy targets at nvidia-gpu. Not needed when
# `quantgate deploy --config` runs with a config whose policies name that pool (it creates both). Idempotent. Needs
# PREFECT_API_URL and an environment where quantgate is importable (prefect deploy loads the flow to read its
# parameters): the CPU or GPU image, or the project's venv.
#
#   QUANTGATE_GPU_POOL_LIMIT (default 1: one engine build/timing at a time per GPU), QUANTGATE_SRC (default: the
#   repository this script is in; /opt/quantgate in the images). The pool name is fixed: the deployment's name is the
#   pool's, and runs find it as compress-step/<pool>.
set -euo pipefail

POOL=nvidia-gpu
LIMIT="${QUANTGATE_GPU_POOL_LIMIT:-1}"
cd "${QUANTGATE_SRC:-$(dirname "$0")/../..}"

if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
    prefect work-pool create "$POOL" --type process
fi
prefect work-pool set-concurrency-limit "$POOL" "$LIMIT"
prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --name compress-step/nvidia-gpu
