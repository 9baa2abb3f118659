"""Does quantgate's latency figure agree with the runtimes' own tools? One run, real pretrained models.

For each model (benchmarks/realmodels.py) and artifact (ONNX Runtime FP32, OpenVINO FP32 IR, NNCF default INT8 IR,
and that INT8 IR compiled for its static input shape as quantgate's ``-static`` variants are):

- quantgate: the latency validator's measurement, warm blocks rotating between the three runners in one process
  (``measure_blocked`` with the block length it chooses), p50 per runner and speedups over ONNX Runtime FP32;
- ONNX Runtime: a plain tight loop over ``InferenceSession.run`` (same options: 1 intra-op thread, sequential);
- OpenVINO: ``benchmark_app`` (its own process; 1 thread, 1 stream, 1 synchronous request: what the latency hint
  gives with one thread, but benchmark_app accepts -nthreads only with -hint none; the same input shape and
  precision quantgate compiles with; ``-shape`` for the static-shape artifact), its median latency;
- the tools' figures are taken in alternating rounds and their medians kept, so the host's drift during the run
  does not land in their ratios.

The targets (issue 15): per artifact within 5%; for OpenVINO candidates the speedup over ONNX Runtime FP32 within 5%
of the ratio benchmark_app and the tight loop give. Nothing is asserted: the table says what was measured.

    python benchmarks/bench_latency.py [--models craft crnn onet rnet] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import realmodels

from quantgate.plugins.onnxruntime import OrtRunner
from quantgate.plugins.openvino import OvRunner
from quantgate.policy import LatencyPolicy
from quantgate.validators.latency import choose_blocks, measure_blocked

THREADS = 1


def tight_loop_ms(path: Path, inputs: dict[str, np.ndarray], seconds: float) -> float:
    """Median per-call ms of a bare ``InferenceSession.run`` loop, in chunks of 20 calls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(20):
        sess.run(None, inputs)
    chunks: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter_ns()
        for _ in range(20):
            sess.run(None, inputs)
        chunks.append((time.perf_counter_ns() - t0) / 1e6 / 20)
    return float(np.median(chunks))


def benchmark_app_ms(
    xml: Path, shape: tuple[int, ...], input_name: str, precision: str, seconds: float, *, static: bool = False
) -> float:
    """OpenVINO's own tool, in its own process: the median latency it reports.

    ``-data_shape`` on the dynamic-batch IR, as quantgate compiles and serves the IRs by default; for a
    shape-specialized artifact (quantgate's ``-static`` variants), ``-shape``: benchmark_app reshapes the model to
    that static shape first, as the static runner does.
    """
    tool = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    dims = ",".join(str(d) for d in shape)
    cmd = [
        tool, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nthreads", str(THREADS), "-nstreams", "1",
        "-nireq", "1", "-api", "sync", "-t", str(max(int(seconds), 1)),
        "-shape" if static else "-data_shape", f"{input_name}[{dims}]", "-infer_precision", precision,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Median:\s+([\d.]+) (ms|us)", out)  # it switches to microseconds below 1 ms
    if match is None:
        raise RuntimeError(f"benchmark_app printed no median latency:\n{out[-2000:]}")
    return float(match.group(1)) / (1000.0 if match.group(2) == "us" else 1.0)


# The tools' measurements are taken in this many alternating rounds (ORT loop, then each benchmark_app) and the
# median kept: one long measurement per tool, minutes apart, puts the host's drift between them into their ratio.
TOOL_ROUNDS = 3


def one_model(name: str, seconds: float, workdir: Path) -> list[dict[str, Any]]:
    import anchors
    import openvino as ov

    prepared = realmodels.prepare(name)
    spec = prepared.spec
    x = prepared.latency_inputs()  # the model's latency batch (1 for the detectors, 16-128 windows for MTCNN)
    fp32_xml = workdir / f"{name}-fp32.xml"
    ov.save_model(ov.convert_model(str(prepared.onnx)), str(fp32_xml), compress_to_fp16=False)
    int8 = anchors.nncf_int8_default(prepared.onnx, prepared.calibration, workdir / f"{name}-nncf")
    irs = {  # label -> (IR, static shapes)
        "openvino fp32 IR (f32)": (fp32_xml, False),
        "openvino NNCF INT8 IR (f32 float parts)": (int8.artifact, False),
        "openvino NNCF INT8 IR, static shape": (int8.artifact, True),
    }
    artifacts: dict[str, Any] = {"onnxruntime fp32": OrtRunner(prepared.onnx, THREADS)}
    artifacts |= {label: OvRunner(xml, THREADS, "f32", static_shapes=static) for label, (xml, static) in irs.items()}
    runners = list(artifacts.values())
    block = choose_blocks(runners, x, LatencyPolicy().min_block_ms, LatencyPolicy().switch_ms)
    timed = measure_blocked(runners, x, warmup=20, rounds=150, block_calls=block)
    p50 = {label: float(np.median(t.block_ms)) for label, t in zip(artifacts, timed, strict=True)}
    t_calls = {label: t.block_calls for label, t in zip(artifacts, timed, strict=True)}
    taken: dict[str, list[float]] = {label: [] for label in artifacts}
    share = seconds / TOOL_ROUNDS
    for _ in range(TOOL_ROUNDS):
        taken["onnxruntime fp32"].append(tight_loop_ms(prepared.onnx, x, share))
        for label, (xml, static) in irs.items():
            ms = benchmark_app_ms(xml, spec.input_shape, spec.input_name, "f32", share, static=static)
            taken[label].append(ms)
    tool = {label: float(np.median(v)) for label, v in taken.items()}
    ref_q, ref_t = p50["onnxruntime fp32"], tool["onnxruntime fp32"]
    rows = []
    for label in artifacts:
        rows.append(
            {
                "model": name,
                "artifact": label,
                "block_calls": t_calls[label],
                "quantgate_p50_ms": p50[label],
                "tool": "tight loop" if label.startswith("onnxruntime") else "benchmark_app",
                "tool_ms": tool[label],
                "tool_rounds_ms": taken[label],
                "diff": p50[label] / tool[label] - 1,
                "quantgate_speedup": ref_q / p50[label],
                "tool_speedup": ref_t / tool[label],
                "speedup_diff": (ref_q / p50[label]) / (ref_t / tool[label]) - 1,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(realmodels.MODELS))
    parser.add_argument("--seconds", type=float, default=10.0, help="per tool measurement")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=realmodels.CACHE / "bench-latency")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models for row in one_model(name, args.seconds, args.workdir)]
    print("| model | artifact | quantgate p50 (blocks) | runtime's own tool | tool ms | diff | "
          "speedup vs ORT FP32: quantgate / tools | diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['artifact']} | {r['quantgate_p50_ms']:.3f} ms ({r['block_calls']} calls) | "
            f"{r['tool']} | {r['tool_ms']:.3f} | {r['diff']:+.1%} | "
            f"{r['quantgate_speedup']:.2f}x / {r['tool_speedup']:.2f}x | {r['speedup_diff']:+.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
