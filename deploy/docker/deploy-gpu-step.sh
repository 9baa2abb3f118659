#!/usr/bin/env bash
# Create the GPU work pool (if missing) and the compress-model/compress-step-gpu deployment from deploy/prefect.yaml.
# Idempotent: run it again after changing prefect.yaml. Needs PREFECT_API_URL and an environment where quantgate is
# importable (prefect deploy loads the flow to read its parameters): the CPU or GPU image, or the project's venv.
#
#   QUANTGATE_GPU_POOL (default nvidia-gpu), QUANTGATE_GPU_POOL_LIMIT (default 1: one engine build/timing at a time
#   per GPU), QUANTGATE_SRC (default: the repository this script is in; /opt/quantgate in the images)
set -euo pipefail

POOL="${QUANTGATE_GPU_POOL:-nvidia-gpu}"
LIMIT="${QUANTGATE_GPU_POOL_LIMIT:-1}"
cd "${QUANTGATE_SRC:-$(dirname "$0")/../..}"

if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
    prefect work-pool create "$POOL" --type process
fi
prefect work-pool set-concurrency-limit "$POOL" "$LIMIT"
prefect --no-prompt deploy --prefect-file deploy/prefect.yaml --name compress-step-gpu --pool "$POOL"
