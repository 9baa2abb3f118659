"""A target pool's step and the parent's side of it, in-process: real MLflow store, real Prefect harness, real
quantization. The step's flow run is called directly here (no worker); tests/integration/test_stack.py runs it
in its own work pool through a real worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from quantgate import pipeline, registry, targets, tracking
from quantgate.flows.compress import compress_model
from quantgate.flows.step import compress_step
from quantgate.hardware import detect
from quantgate.intake import to_onnx
from quantgate.policy import parse_policy
from quantgate.result import CompressionResult
from tests.conftest import register_onnx, test_policy

pytestmark = pytest.mark.usefixtures("prefect_harness")

OV_RECIPE = "int8-ptq-performance"
ORT_RECIPE = "int8-static-qdq-minmax-perchannel"


def _routed(calib: Path, evaluation: Path, **target: Any) -> dict[str, Any]:
    return test_policy(
        calib,
        evaluation,
        backends=["onnxruntime", "openvino"],
        recipes=[ORT_RECIPE, OV_RECIPE],
        targets={"openvino": {"pool": "cpu-test-step", "timeout_s": 60, **target}},
        search={"specialize_shapes": False},  # one candidate per step: the shape variant is tested elsewhere
        # What is tested is where a step logs and who gates it, not this host's INT8 speed: on a Zen 2 EPYC (AVX2,
        # no dot-product instructions) OpenVINO's INT8 digits CNN ran 0.96x ONNX Runtime FP32 and failed 1.1x.
        gate={"min_speedup": None},
    )


def test_a_pool_without_a_step_deployment_fails_only_its_backend(
    tracking_uri: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path
) -> None:
    uri = register_onnx(tracking_uri, digits_onnx, "digits")
    doc = compress_model(uri, _routed(calib_npz, eval_npz), tracking_uri)
    by_backend = {c["backend"]: c for c in doc["candidates"]}
    assert by_backend["onnxruntime"]["promoted"]
    assert all(c["name"] != "hardware" for c in by_backend["onnxruntime"]["checks"])  # no target, no check
    ov = by_backend["openvino"]
    assert not ov["passed"] and ov["registered_uri"] is None
    assert ov["reasons"] == [
        "no deployment compress-step/cpu-test-step on the Prefect server: run `quantgate deploy` for pool cpu-test-step"
    ]
    client = MlflowClient(tracking_uri)
    assert client.get_run(doc["parent_run_id"]).info.status == "FINISHED"
    logged = json.loads(Path(client.download_artifacts(doc["parent_run_id"], "result.json")).read_text())
    assert {"candidates_s", "steps_s", "compress_s"} <= set(logged["timings_s"])  # timed up to the gate


def _parent(tracking_uri: str, uri: str, policy_doc: dict[str, Any]) -> tuple[Any, str, Any]:
    client = registry.connect(tracking_uri)
    source = registry.resolve(client, registry.parse_model_uri(uri))
    policy = parse_policy(policy_doc)
    data_uris = {"calibration": policy.data.calibration or "", "evaluation": policy.data.evaluation or ""}
    parent_id = tracking.start_parent(client, source, policy, detect(), data_uris)
    return source, parent_id, policy


@pytest.mark.parametrize("requirement", ["met", "unmet"])
def test_a_step_logs_under_the_parent_and_the_parent_gates_and_registers_it(
    tracking_uri: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path, requirement: str
) -> None:
    here = detect()
    # A flag this host lacks, whatever it is: an x86 AMX or AVX-512 one, or the ARM FP16 one on x86.
    lacking = [f for f in ("amx_int8", "avx512_fp16", "avx512_vnni", "avx2", "asimdhp") if f not in here.isa_flags]
    requires = {"isa": list(here.isa_flags[:1])} if requirement == "met" else {"isa": lacking[:1]}
    uri = register_onnx(tracking_uri, digits_onnx, "digits")
    policy_doc = _routed(calib_npz, eval_npz, requires=requires)
    source, parent_id, policy = _parent(tracking_uri, uri, policy_doc)

    summary = compress_step(uri, policy_doc, tracking_uri, parent_id, "cpu-test-step", ["openvino"])
    assert summary["hardware"] == here.fingerprint()
    assert [c["recipe"] for c in summary["candidates"]] == [f"openvino/{OV_RECIPE}"]

    client = registry.connect(tracking_uri)
    outcome = targets.read_step_document("cpu-test-step", tracking.read_step(client, parent_id, "cpu-test-step"))
    (cand,) = outcome.checked(policy)
    assert cand.verdict.checks[-1].name == "hardware"
    if requirement == "unmet":
        assert not cand.passed and f"CPU lacks {lacking[0]}" in cand.verdict.reasons[-1]
    else:
        assert cand.passed, cand.verdict.reasons
    assert cand.run_id and cand.logged_model_uri  # the step logged the child run and the model, registered nothing
    assert registry.connect(tracking_uri).search_registered_models("name = 'digits-openvino-int8'") == []

    pipeline.promote([cand])
    model, flavor = to_onnx(registry.download(source, tmp_path / "src"), tmp_path / "intake")
    result = CompressionResult(source, flavor, policy.digest(), detect(), [cand], "quantgate")
    tracking.record(client, result, policy, model, {}, parent_id)

    child = client.get_run(cand.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["quantgate.passed"] == str(requirement == "met").lower()
    assert client.get_run(parent_id).info.status == "FINISHED"
    registered = client.search_model_versions("name = 'digits-openvino-int8'")
    if requirement == "met":
        (mv,) = registered
        assert mv.tags["quantgate.hardware"] == here.fingerprint() and mv.run_id == cand.run_id
        assert client.get_model_version_by_alias("digits-openvino-int8", "compressed").version == mv.version
    else:
        assert registered == []
        assert client.get_model_version("digits", "1").tags["quantgate.outcome"] == "none_passed"
