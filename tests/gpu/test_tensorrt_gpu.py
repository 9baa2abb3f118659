"""TensorRT engines on an NVIDIA GPU worker: build each recipe, run it against the FP32 model, time it.

Skipped wherever TensorRT, cuda-python or an NVIDIA GPU is missing. ``tests/gpu/run_gpu_tests.sh`` runs them and
turns what they record (``QUANTGATE_GPU_RESULTS``, one JSON object a line) into a table. Latency is recorded, never
asserted: a speedup is a benchmark figure, not a test outcome.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate.data import NpzDataset
from quantgate.model import read_model_info
from quantgate.plugins.base import Calibration, Candidate
from quantgate.plugins.onnxruntime import OrtRunner
from quantgate.plugins.tensorrt import PROFILE_BATCH, RECIPES, TensorRtBackend, TensorRtRunner
from quantgate.validators.fidelity import cosine_per_row
from quantgate.validators.latency import measure_interleaved
from tests.plugins.test_tensorrt import bert  # noqa: F401  (the tiny BERT fixture, shared)

_STATUS = TensorRtBackend().available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _STATUS.ok, reason=f"needs TensorRT and an NVIDIA GPU: {_STATUS.reason}"),
]

Record = Callable[..., None]


@pytest.fixture(scope="module")
def record() -> Record:
    """Append one result row for run_gpu_tests.sh; a no-op when QUANTGATE_GPU_RESULTS is not set."""
    target = os.environ.get("QUANTGATE_GPU_RESULTS")

    def write(**row: Any) -> None:
        if target:
            with open(target, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return write


@pytest.fixture(scope="module")
def engines(digits_onnx: Path, calib_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Candidate]:
    """The FP32 baseline engine and one engine per recipe for the digits CNN, built once."""
    backend, info = TensorRtBackend(), read_model_info(digits_onnx)
    work = tmp_path_factory.mktemp("trt-engines")
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=256)
    built = {"fp32": backend.baseline(info, work / "baseline")}
    for recipe in RECIPES:
        start = time.perf_counter()
        built[recipe.name] = backend.compress(info, recipe, calib, work / recipe.name)
        BUILD_SECONDS[recipe.name] = time.perf_counter() - start
    return built


BUILD_SECONDS: dict[str, float] = {}  # step 1 + engine build, per recipe, for the results table


def _gpu_name(cand: Candidate) -> str:
    return str(json.loads(cand.artifact.with_name(cand.artifact.name + ".json").read_text())["gpu"])


def _outputs(runner: Any, data: Path, limit: int = 10_000) -> np.ndarray:
    out = runner.run(NpzDataset.open(data).take(limit).inputs)[0]
    return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)


@pytest.mark.parametrize("name", ["fp32", *(r.name for r in RECIPES)])
def test_each_recipe_builds_an_engine_with_a_sidecar_naming_gpu_and_tensorrt(
    name: str, engines: dict[str, Candidate]
) -> None:
    import tensorrt

    cand = engines[name]
    assert cand.artifact.suffix == ".engine" and cand.artifact.stat().st_size > 0
    meta = json.loads(cand.artifact.with_name(cand.artifact.name + ".json").read_text())
    assert meta["tensorrt"] == tensorrt.__version__ and meta["gpu"] and meta["compute_capability"]
    assert meta["profile"]["input"] == [[1, 1, 32, 32], [PROFILE_BATCH[1], 1, 32, 32], [PROFILE_BATCH[2], 1, 32, 32]]
    assert any(f"TensorRT {tensorrt.__version__}" in n for n in cand.notes), cand.notes


@pytest.mark.parametrize("name", ["fp32", *(r.name for r in RECIPES)])
def test_engine_outputs_match_fp32_onnx_on_the_evaluation_set(
    name: str, engines: dict[str, Candidate], digits_onnx: Path, eval_npz: Path, record: Record
) -> None:
    """The evaluation set (360 samples) is above the profile's max batch, so the runner's batch split runs too."""
    base = _outputs(OrtRunner(digits_onnx, threads=1), eval_npz)
    out = _outputs(TensorRtBackend().runner(engines[name], threads=1), eval_npz)
    fidelity = float(np.mean(cosine_per_row(base, out)))
    agree = float(np.mean(base.argmax(1) == out.argmax(1)))
    record(kind="fidelity", model="digits-cnn", recipe=name, fidelity=fidelity, top1_agreement=agree)
    assert fidelity > (0.9999 if name == "fp32" else 0.99)


def test_run_returns_complete_outputs_after_the_stream_is_synchronized(
    engines: dict[str, Candidate], eval_npz: Path
) -> None:
    runner = TensorRtBackend().runner(engines["int8-qdq"], threads=1)
    assert isinstance(runner, TensorRtRunner)
    x = NpzDataset.open(eval_npz).take(32).inputs
    first = runner.run(x)[0].copy()
    for _ in range(50):  # an unsynchronized copy back would show as a partly written (different) array
        np.testing.assert_array_equal(runner.run(x)[0], first)
    runner.close()


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("name", [r.name for r in RECIPES])
def test_gpu_latency_against_the_fp32_engine(
    name: str, batch: int, engines: dict[str, Candidate], eval_npz: Path, record: Record
) -> None:
    backend = TensorRtBackend()
    base, cand = backend.runner(engines["fp32"], threads=1), backend.runner(engines[name], threads=1)
    x = NpzDataset.open(eval_npz).take(batch).inputs
    base_ms, cand_ms = measure_interleaved(base, cand, x, warmup=50, rounds=300)
    assert np.all(np.isfinite(cand_ms)) and np.all(cand_ms > 0) and np.all(base_ms > 0)
    record(
        kind="latency", model="digits-cnn", recipe=name, batch=batch,
        median_ms=float(np.median(cand_ms)), p90_ms=float(np.percentile(cand_ms, 90)),
        fp32_median_ms=float(np.median(base_ms)), speedup=float(np.median(base_ms) / np.median(cand_ms)),
        build_s=BUILD_SECONDS.get(name, float("nan")), gpu=_gpu_name(engines[name]),
    )  # fmt: skip


def test_transformer_int8_fp16_fallback_engine_builds_and_matches_fp32(
    bert: tuple[Path, Path, Path],  # noqa: F811
    tmp_path: Path,
    record: Record,
) -> None:
    model, calib, evaluation = bert
    backend, info = TensorRtBackend(), read_model_info(model)
    recipe = next(r for r in RECIPES if r.name == "int8-qdq-fp16-fallback")
    cand = backend.compress(info, recipe, Calibration(NpzDataset.open(calib), 16, None), tmp_path / recipe.name)
    base = _outputs(OrtRunner(model, threads=1), evaluation)
    out = _outputs(backend.runner(cand, threads=1), evaluation)
    fidelity = float(np.mean(cosine_per_row(base, out)))
    record(kind="fidelity", model="tiny-bert", recipe=recipe.name, fidelity=fidelity)
    assert fidelity > 0.99


@pytest.mark.usefixtures("prefect_harness")
def test_compress_registers_a_tensorrt_version_that_serves_from_mlflow(
    tracking_uri: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, eval_data: dict[str, np.ndarray]
) -> None:
    """The whole flow on a GPU worker: engines built and timed, a passing one registered, loaded through pyfunc."""
    import mlflow.pyfunc

    from quantgate.flows.compress import compress_model
    from tests.conftest import register_onnx, test_policy

    uri = register_onnx(tracking_uri, digits_onnx, "digits-gpu")
    policy = test_policy(
        calib_npz, eval_npz, backends=["tensorrt"], recipes=["fp16", "int8-qdq"], gate={"min_speedup": 1.0}
    )
    doc = compress_model(uri, policy, tracking_uri)
    registered = [c for c in doc["candidates"] if c["registered_uri"]]
    assert registered, [c["reasons"] for c in doc["candidates"]]
    served = mlflow.pyfunc.load_model(registered[0]["registered_uri"])
    out = served.predict({"input": eval_data["input"][:32]})
    top1 = np.argmax(next(iter(out.values())), axis=1)
    assert np.mean(top1 == eval_data["labels"][:32]) >= 0.9
