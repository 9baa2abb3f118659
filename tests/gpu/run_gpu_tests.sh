#!/usr/bin/env bash
# Run the TensorRT GPU tests on an NVIDIA GPU worker and write a results table.
#
#   tests/gpu/run_gpu_tests.sh [OUTDIR]      (default: gpu-results)
#
# Needs: the project's venv (PYTHON, default .venv/bin/python) with `pip install -e .[dev,tensorrt]`, i.e. tensorrt
# and cuda-python, and an NVIDIA driver. Writes OUTDIR/results.md (the table), results.jsonl (raw rows),
# junit.xml, pytest.log and gpu.csv. Exit status: pytest's, or 2 when this is no GPU worker, 3 when every test
# was skipped (a GPU without TensorRT or cuda-python, say): a run that tested nothing must not look green.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-gpu-results}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "run_gpu_tests: nvidia-smi not found; run this on an NVIDIA GPU worker" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv >"$OUT/gpu.csv"
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
    echo "run_gpu_tests: tensorrt is not importable with $PY; pip install -e '.[tensorrt]'" >&2
    exit 2
fi

export QUANTGATE_GPU_RESULTS="$OUT/results.jsonl"
rm -f "$QUANTGATE_GPU_RESULTS"
set +e
"$PY" -m pytest tests/gpu -m gpu -q -rs --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e

"$PY" - "$OUT" <<'PYEOF'
import csv, json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
import tensorrt
gpu = next(csv.DictReader((out / "gpu.csv").open()), {})
suite = ET.parse(out / "junit.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] if (out / "results.jsonl").exists() else []
lines = [
    "# quantgate TensorRT GPU tests",
    "",
    f"GPU: {', '.join(f'{k.strip()}={v.strip()}' for k, v in gpu.items())}  ",
    f"TensorRT {tensorrt.__version__}; tests: {suite.get('tests')}, failures: {suite.get('failures')}, "
    f"errors: {suite.get('errors')}, skipped: {suite.get('skipped')}",
    "",
    "| model | recipe | batch | median ms | p90 ms | FP32 engine median ms | speedup | engine build s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in (r for r in rows if r["kind"] == "latency"):
    lines.append(
        f"| {r['model']} | {r['recipe']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
        f"{r['fp32_median_ms']:.3f} | {r['speedup']:.2f}x | {r['build_s']:.1f} |"
    )
lines += ["", "| model | recipe | fidelity vs FP32 ONNX | top-1 agreement |", "| --- | --- | --- | --- |"]
for r in (r for r in rows if r["kind"] == "fidelity"):
    agree = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
    lines.append(f"| {r['model']} | {r['recipe']} | {r['fidelity']:.6f} | {agree} |")
lines += ["", "Latency: one run() = host-to-device copy, execute, device-to-host copy, stream synchronize; "
          "baseline and candidate interleaved round by round (quantgate.validators.latency)."]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
if suite.get("tests") == suite.get("skipped"):
    print("run_gpu_tests: every test was skipped; see pytest.log for the reason", file=sys.stderr)
    sys.exit(3)
PYEOF
exit "$status"
