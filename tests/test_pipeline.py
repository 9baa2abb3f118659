from pathlib import Path
from typing import Any

import pytest

from quantgate import faults, pipeline
from quantgate.build import BuildWorker
from quantgate.data import NpzDataset
from quantgate.errors import BackendUnavailable, InfrastructureError
from quantgate.hardware import detect
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import Calibration, Candidate, Recipe
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend
from quantgate.policy import parse_policy
from quantgate.search import Budget
from quantgate.validators.base import (
    CheckSpec,
    Measurement,
    Threshold,
    check_declarations,
    collect_outputs,
    load_validators,
)
from tests.conftest import FAST_LATENCY, test_policy


class NeedsGpu(OnnxRuntimeBackend):
    """A backend whose second step needs hardware this host lacks (as TensorRT's engine build does)."""

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        raise BackendUnavailable("gpu-thing", "needs an NVIDIA GPU worker", "route it to the nvidia-gpu pool")


def test_a_recipe_that_cannot_run_here_fails_alone_with_the_reason(
    digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    policy = parse_policy(test_policy(calib_npz, eval_npz))
    model = read_model_info(digits_onnx)
    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    backend = NeedsGpu()
    cand = backend.baseline(model, tmp_path)
    runner = backend.runner(cand, threads=1)
    base = pipeline.Baseline(backend, cand, runner, collect_outputs(runner, data.evaluation, None))
    recipe = Recipe.make("gpu-thing", "int8-qdq", "int8")
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path)
    assert not run.result.passed
    assert run.result.verdict.reasons == [
        "backend 'gpu-thing' is unavailable: needs an NVIDIA GPU worker (route it to the nvidia-gpu pool)"
    ]


def test_a_candidate_whose_runtime_crashes_fails_alone_and_the_next_one_is_measured(
    digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime that dies in native code on one artifact (OpenVINO did, with SIGSEGV, on an INT8 MobileNetV2 at
    batch 1) meets it in the build worker first: the candidate fails saying how the process died, this process
    goes on, and the next candidate builds and runs in a fresh worker. The crash is injected (a real SIGSEGV of the
    worker at its first calls): no runtime crashes on demand on every host. A worker killed from outside is not the
    artifact's fault: that stays infrastructure."""
    policy = parse_policy(test_policy(calib_npz, eval_npz))
    model = read_model_info(digits_onnx)
    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    backend = OnnxRuntimeBackend()
    cand = backend.baseline(model, tmp_path / "fp32")
    runner = backend.runner(cand, threads=1)
    base = pipeline.Baseline(backend, cand, runner, collect_outputs(runner, data.evaluation, None))
    recipe = next(r for r in backend.recipes(model) if r.name == "int8-static-qdq-minmax-perchannel")
    state = pipeline.SearchState(Budget(None))
    sizes = pipeline.trial_batch_sizes(data.evaluation.n_samples, [None], policy.latency.batch_sizes)
    with BuildWorker() as worker:
        state.worker = worker
        monkeypatch.setenv(faults.SEGV_ENV, "candidate_trial")  # the worker is spawned with it
        crashed = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path / "a", state=state)
        monkeypatch.delenv(faults.SEGV_ENV)
        measured = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path / "b", state=state)
        # Killed from outside (SIGKILL: the out-of-memory killer, an operator) is the host's trouble: the run's.
        worker.kill()
        monkeypatch.setenv(faults.ENV, "candidate_trial")
        with pytest.raises(InfrastructureError, match=r"the build process died \(exit status -9\)"):
            pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path / "c", state=state)
    assert not crashed.result.passed and not crashed.result.verdict.skipped
    assert crashed.result.verdict.reasons == [
        "onnxruntime crashed running its int8-static-qdq-minmax-perchannel artifact (signal 11 (SIGSEGV)), tried at "
        f"batch sizes {', '.join(map(str, sizes))} in the build process first, so not run in this one"
    ]
    assert "accuracy" in measured.result.metrics and "latency_p50_ms" in measured.result.metrics


def test_a_candidate_is_tried_at_every_batch_size_it_will_be_called_with() -> None:
    # Evaluation batches of 64 and the remainder, for the quick check's 100 samples and all 300; latency's sizes.
    assert pipeline.trial_batch_sizes(300, [None, 100], [1, 8]) == (1, 8, 36, 44, 64)
    assert pipeline.trial_batch_sizes(40, [None, 100], [1]) == (1, 40)  # a limit above the samples there are


def test_accuracy_control_tunes_on_calibration_data_unless_top1_needs_labels_it_lacks(
    calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    import numpy as np

    calib, evaluation = NpzDataset.open(calib_npz), NpzDataset.open(eval_npz)
    plain = pipeline.DataSets(calib, evaluation, "c", "e")
    assert pipeline.accuracy_control_data(plain, "fidelity") == (calib, "")
    chosen, caveat = pipeline.accuracy_control_data(plain, "accuracy")
    assert chosen is evaluation and "accuracy check is optimistic" in caveat

    with np.load(eval_npz) as f:
        np.savez(tmp_path / "labelled.npz", input=f["input"][:64], labels=f["labels"][:64])
    labelled = NpzDataset.open(tmp_path / "labelled.npz")
    apart = pipeline.DataSets(labelled, evaluation, "c", "e")
    assert pipeline.accuracy_control_data(apart, "accuracy") == (labelled, "")


def test_with_both_quality_thresholds_the_float_restoring_searches_hold_fidelity(
    calib_npz: Path, eval_npz: Path
) -> None:
    from quantgate.policy import parse_policy

    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    both = parse_policy({"gate": {"max_accuracy_drop": 0.01, "min_fidelity": 0.99}})
    control = pipeline.tuning_for(data, both)
    assert control is not None and control.metric == "fidelity" and abs(control.max_drop - 0.01) < 1e-12
    assert control.validation is data.calibration and control.caveat == ""  # never the samples the gate scores
    top1 = pipeline.tuning_for(data, parse_policy({"gate": {"max_accuracy_drop": 0.02}}))
    assert top1 is not None and top1.metric == "accuracy" and top1.max_drop == 0.02


def test_latency_figures_name_the_block_length_and_carry_cold_start_and_runner_overhead(
    digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    policy = parse_policy(test_policy(calib_npz, eval_npz))
    model = read_model_info(digits_onnx)
    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    backend = OnnxRuntimeBackend()
    cand = backend.baseline(model, tmp_path)
    runner = backend.runner(cand, threads=1)
    base = pipeline.Baseline(backend, cand, runner, collect_outputs(runner, data.evaluation, None))
    recipe = next(r for r in backend.recipes(model) if r.name == "int8-static-qdq-minmax-perchannel")
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path)
    m, latency = run.result.metrics, run.result.details["latency"]
    assert isinstance(latency, dict)
    assert m["block_calls"] >= 2 and latency["block_calls"][1] == int(m["block_calls"])  # per runner: base, candidate
    assert latency["block_calls"][0] == int(m["baseline_block_calls"])
    assert all(1 <= skip < calls for skip, calls in zip(latency["warm_skip"], latency["block_calls"], strict=True))
    assert len(latency["rounds_ms"]["candidate"]) == latency["blocks"] == int(m["rounds"])
    assert m["first_call_ms"] > 0 and m["baseline_first_call_ms"] > 0 and m["load_ms"] > 0
    assert m["first_call_speedup"] > 0
    assert 0 <= m["runner_overhead_ms"] < m["runner_trivial_call_ms"] + 1e-9
    assert f"warm blocks of {int(m['block_calls'])} calls" in run.result.verdict.checks[-2].detail


class Loud:
    """A third-party validator that reports a metric named like the latency validator's and gates on it."""

    name = "loud"

    def applies(self, ctx: Any) -> bool:
        return True

    def checks(self) -> tuple[CheckSpec[Any], ...]:
        return (CheckSpec("claimed", "speedup", "max", Threshold),)

    def measure(self, ctx: Any) -> Measurement:
        return Measurement(self.name, {"speedup": 99.0})


def test_built_in_metrics_keep_their_documented_names_and_a_third_partys_cannot_overwrite_them(
    digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    latency = {**FAST_LATENCY, "batch_sizes": [1, 4], "cold_starts": 1}
    gate = {"min_speedup": 0.1, "checks": {"loud": {"claimed": 100}}}
    policy = parse_policy(test_policy(calib_npz, eval_npz, latency=latency, gate=gate))
    model = read_model_info(digits_onnx)
    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    backend = OnnxRuntimeBackend()
    cand = backend.baseline(model, tmp_path)
    runner = backend.runner(cand, threads=1)
    base = pipeline.Baseline(backend, cand, runner, collect_outputs(runner, data.evaluation, None))
    recipe = next(r for r in backend.recipes(model) if r.name == "int8-static-qdq-minmax-perchannel")
    validators = [*load_validators(), Loud()]
    check_declarations(validators)
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, validators)
    m = run.result.metrics
    assert [k for k in m if "." in k] == ["loud.speedup"]  # every built-in figure under its own, documented name
    assert m["loud.speedup"] == 99.0 and 0 < m["speedup"] < 99.0
    assert {"speedup_b4", "latency_p50_ms_b4", "first_call_ms", "accuracy_drop", "fidelity_min", "size_ratio"} <= set(m)
    claimed = next(c for c in run.result.verdict.checks if c.name == "claimed")
    assert claimed.passed and claimed.detail == "loud.speedup 99, at most 100 allowed"
