"""What a user gets elsewhere with the tools' DEFAULTS: the anchors quantgate's results are compared with.

For one ONNX model and its calibration set (quantgate's .npz contract), each anchor is a runnable artifact plus a
runner with one thread (``run(inputs) -> list of outputs``, graph order):

- ``openvino_default``: the ONNX file compiled by ``ov.Core().compile_model(model, "CPU")`` with no precision
  hint (so OpenVINO picks it: BF16 on CPUs with AVX512_BF16 or AMX, FP32 elsewhere), latency hint, one thread.
- ``nncf_int8_default``: ``nncf.quantize(ov.convert_model(onnx), nncf.Dataset(samples))`` with every default
  (preset performance, subset_size 300, fast bias correction), calibrated one sample per item, saved with
  ``ov.save_model`` defaults and compiled like ``openvino_default``.
- ``ort_int8_static_default``: ``onnxruntime.quantization.quantize_static(..., per_channel=True)`` with every other
  default (QDQ, signed INT8 activations and weights, MinMax over the whole calibration set; no pre-processing),
  run on ONNX Runtime's CPU provider.

Quality only: ``fidelity`` (mean and minimum cosine similarity of one output to ONNX Runtime FP32, sample by
sample, with quantgate's own ``cosine_per_row``) and top-1 ``accuracy`` where the evaluation set has labels.
Latency is measured elsewhere (quantgate's latency validator).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantgate.data import NpzDataset
from quantgate.validators.fidelity import cosine_per_row

THREADS = 1
EVAL_BATCH = 16


class Runner(Protocol):
    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Anchor:
    """A built anchor: its artifact on disk, a one-thread runner, and what the tool chose by itself."""

    name: str  # the name of the function that built it: ort_fp32, openvino_default, ...
    artifact: Path
    runner: Runner
    build_s: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Quality:
    fidelity: float
    fidelity_min: float
    accuracy: float | None = None
    per_output_fidelity: tuple[float, ...] = field(default_factory=tuple)


# -- runners --------------------------------------------------------------------------------------------------------


class OvDefaultRunner:
    """An OpenVINO compiled model with the CPU plugin's defaults except the thread count and the latency hint."""

    def __init__(self, model: Path | Any) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        config = {props.inference_num_threads(): THREADS, hints.performance_mode(): hints.PerformanceMode.LATENCY}
        self.compiled = ov.Core().compile_model(str(model) if isinstance(model, Path) else model, "CPU", config)
        self.inference_precision = str(self.compiled.get_property(hints.inference_precision()).to_string())
        self._request = self.compiled.create_infer_request()

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # Zero-copy in and out, one copy of the outputs: the same call pattern as quantgate's OvRunner.
        result = self._request.infer(dict(inputs), share_inputs=True, share_outputs=True)
        return [np.array(v, copy=True) for v in result.to_tuple()]


def _ort_runner(path: Path) -> Runner:
    from quantgate.plugins.onnxruntime import OrtRunner  # the runner quantgate times its own candidates with

    return OrtRunner(path, threads=THREADS)


def _timed(name: str, artifact: Path, make: Callable[[], tuple[Runner, tuple[str, ...]]]) -> Anchor:
    start = time.perf_counter()
    runner, notes = make()
    return Anchor(name, artifact, runner, time.perf_counter() - start, notes)


# -- the anchors ----------------------------------------------------------------------------------------------------


def ort_fp32(onnx: Path) -> Anchor:
    """The reference: the ONNX file on ONNX Runtime's CPU provider, FP32."""
    return _timed("ort_fp32", onnx, lambda: (_ort_runner(onnx), ()))


def openvino_default(onnx: Path) -> Anchor:
    """``compile_model`` on the ONNX file with no precision hint (the precision OpenVINO chose is in the notes)."""

    def make() -> tuple[Runner, tuple[str, ...]]:
        runner = OvDefaultRunner(onnx)
        return runner, (f"inference precision chosen by OpenVINO: {runner.inference_precision}",)

    return _timed("openvino_default", onnx, make)


def _samples(calibration: Path) -> Iterator[dict[str, np.ndarray]]:
    """Calibration samples one at a time (batch 1), as NNCF's examples feed them."""
    for batch in NpzDataset.open(calibration).batches(1):
        yield batch.inputs


class _Reiterable:
    """NNCF iterates its data set more than once (statistics, then bias correction)."""

    def __init__(self, calibration: Path) -> None:
        self.calibration = calibration
        self.n = NpzDataset.open(calibration).n_samples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return _samples(self.calibration)

    def __len__(self) -> int:
        return self.n


def nncf_int8_default(onnx: Path, calibration: Path, workdir: Path) -> Anchor:
    """``nncf.quantize`` with every default on the converted model, saved as IR, compiled with OpenVINO defaults."""
    import nncf
    import openvino as ov

    workdir.mkdir(parents=True, exist_ok=True)
    xml = workdir / "nncf-int8-default.xml"

    def make() -> tuple[Runner, tuple[str, ...]]:
        data = _Reiterable(calibration)
        quantized = nncf.quantize(ov.convert_model(str(onnx)), nncf.Dataset(data))
        ov.save_model(quantized, str(xml))
        runner = OvDefaultRunner(xml)
        used = min(300, data.n)
        return runner, (f"calibrated on {used} samples", f"float layers run in {runner.inference_precision}")

    return _timed("nncf_int8_default", xml, make)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the .npz, in batches (MinMax gives the same ranges either way)."""

    def __init__(self, calibration: Path) -> None:
        self._batches = (b.inputs for b in NpzDataset.open(calibration).batches(EVAL_BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def ort_int8_static_default(onnx: Path, calibration: Path, workdir: Path) -> Anchor:
    """``quantize_static(per_channel=True)`` with every other default; the QDQ model on ONNX Runtime."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "ort-int8-static-default.onnx"

    class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]
        pass

    def make() -> tuple[Runner, tuple[str, ...]]:
        # MinMax keeps only per-batch ReduceMin/ReduceMax outputs, so the whole set fits in memory. (Its
        # CalibMaxIntermediateOutputs option would drop ranges in onnxruntime 1.32: it clears without merging.)
        quantize_static(onnx, out, Reader(calibration), per_channel=True)
        n = NpzDataset.open(calibration).n_samples
        return _ort_runner(out), (f"calibrated on {n} samples",)

    return _timed("ort_int8_static_default", out, make)


def build_all(onnx: Path, calibration: Path, workdir: Path) -> list[Anchor]:
    """The reference and the three anchors, in that order."""
    return [
        ort_fp32(onnx),
        openvino_default(onnx),
        nncf_int8_default(onnx, calibration, workdir),
        ort_int8_static_default(onnx, calibration, workdir),
    ]


# -- quality ----------------------------------------------------------------------------------------------------------


def outputs(runner: Runner, evaluation: Path, limit: int | None = None) -> list[np.ndarray]:
    """Every output of ``runner`` over the evaluation set, one row per sample: (N, -1) float32 each."""
    rows: list[list[np.ndarray]] = []
    for batch in NpzDataset.open(evaluation).batches(EVAL_BATCH, limit=limit):
        outs = runner.run(batch.inputs)
        rows.append([np.asarray(o, dtype=np.float32).reshape(o.shape[0], -1) for o in outs])
    return [np.concatenate(parts) for parts in zip(*rows, strict=True)]


def labels(evaluation: Path) -> np.ndarray | None:
    dataset = NpzDataset.open(evaluation)
    return dataset.take(dataset.n_samples).labels if dataset.has_labels else None


def quality(reference: list[np.ndarray], candidate: list[np.ndarray], truth: np.ndarray | None) -> Quality:
    """Fidelity of the first output (quantgate's definition) and of every output; top-1 of the first output."""
    cos = cosine_per_row(reference[0], candidate[0])
    per_output = tuple(float(np.mean(cosine_per_row(r, c))) for r, c in zip(reference, candidate, strict=True))
    acc = None if truth is None else float(np.mean(np.argmax(candidate[0], axis=1) == truth))
    return Quality(float(np.mean(cos)), float(np.min(cos)), acc, per_output)
