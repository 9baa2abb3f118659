"""Smoke check of the real-model suite: prepare every model, run it, build the anchors, print one table.

    make bench-env && .venv/bin/python benchmarks/check_realmodels.py [--models craft,crnn,rnet,onet]

Per model: ONNX size, the latency input shape, a rough FP32 time (ONNX Runtime, one thread, median of 20 calls at
the latency batch: not a benchmark), a task check of FP32 on the evaluation data (is the data what the model
expects?), and the quality of each anchor (benchmarks/anchors.py) against ONNX Runtime FP32: fidelity of the first
output and, where the evaluation set has labels, top-1 accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import anchors
import numpy as np
import realmodels
import realnets
import textdata


def _rough_ms(runner: anchors.Runner, inputs: dict[str, np.ndarray], calls: int = 20) -> float:
    for _ in range(3):
        runner.run(inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner.run(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _task_check(prepared: realmodels.PreparedModel, fp32: list[np.ndarray], truth: np.ndarray | None) -> str:
    """What FP32 makes of the evaluation data: evidence that inputs are preprocessed the way the model expects."""
    name = prepared.spec.name
    if truth is not None:
        return f"top-1 {np.mean(np.argmax(fp32[0], axis=1) == truth):.3f} ({prepared.spec.labels})"
    texts = prepared.facts.get("evaluation_texts") or []
    if name == "crnn":
        logits = fp32[0].reshape(len(fp32[0]), -1, len(realnets.ENGLISH_G2_CHARACTERS) + 1)
        chars = realnets.ENGLISH_G2_CHARACTERS
        known = [(t, textdata.ctc_greedy(row, chars)) for t, row in zip(texts, logits, strict=True) if t is not None]
        return f"reads {sum(t == read for t, read in known)}/{len(known)} rendered phrases exactly"
    if name == "craft":
        peak = fp32[0].reshape(len(fp32[0]), -1, 2)[:, :, 0].max(axis=1)
        kinds = np.array(prepared.facts.get("evaluation_kinds") or [])
        found = ", ".join(f"{np.mean(peak[kinds == k] > 0.7):.0%} of {k}" for k in ("rendered", "scan", "no-text"))
        return f"region score > 0.7 (easyocr text_threshold) in {found}"
    return "-"


def check(name: str, workroot: Path) -> list[str]:
    prepared = realmodels.prepare(name)
    spec = prepared.spec
    print(f"{name}: prepared ({prepared.facts.get('prepare_s', 'cached')} s); building anchors", flush=True)
    built = anchors.build_all(prepared.onnx, prepared.calibration, workroot / name)
    reference = anchors.outputs(built[0].runner, prepared.evaluation)
    truth = anchors.labels(prepared.evaluation)
    ms = _rough_ms(built[0].runner, prepared.latency_inputs())
    cells = []
    for anchor in built[1:]:
        q = anchors.quality(reference, anchors.outputs(anchor.runner, prepared.evaluation), truth)
        acc = "" if q.accuracy is None else f", top-1 {q.accuracy:.3f}"
        cells.append(f"{q.fidelity:.4f} (min {q.fidelity_min:.3f}{acc})")
        print(f"  {anchor.name}: built in {anchor.build_s:.1f} s; {'; '.join(anchor.notes)}", flush=True)
    size_mb = prepared.onnx.stat().st_size / 1e6
    shape = "x".join(str(d) for d in spec.input_shape)
    return [spec.name, f"{size_mb:.1f}", shape, f"{ms:.1f}", _task_check(prepared, reference, truth), *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(realmodels.MODELS), help="comma-separated names")
    parser.add_argument("--workdir", type=Path, default=realmodels.CACHE / "anchors", help="where anchors are built")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" warnings
    rows = [check(name, args.workdir) for name in args.models.split(",")]
    header = [
        "model",
        "ONNX MB",
        "input (latency batch)",
        "FP32 ms (ORT, 1 thread)",
        "FP32 task check",
        "OpenVINO default: fidelity",
        "NNCF INT8 default",
        "ORT INT8 static per-channel default",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average {os.getloadavg()[0]:.2f}; fidelity = mean cosine of the first output vs ONNX Runtime FP32")


if __name__ == "__main__":
    main()
