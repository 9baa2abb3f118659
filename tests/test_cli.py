"""The real `quantgate` command in a subprocess: exit codes, one-line errors, nothing registered on bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from quantgate.testing import run_quantgate as run_cli
from quantgate.testing import write_policy
from tests.conftest import model_versions, register_onnx, register_pytorch, test_policy

__all__ = ["assert_clean_failure", "run_cli", "write_policy"]  # shared with the other CLI tests


def snapshot(tracking_uri: str) -> list[tuple[str, str, dict[str, str]]]:
    return model_versions(tracking_uri)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("quantgate: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.fixture()
def digits_uri(tracking_uri: str, digits_onnx: Path) -> str:
    return register_onnx(tracking_uri, digits_onnx, "digits")


def _artifact_digest(tracking_uri: str) -> str:
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version("digits", "1")
    root = Path(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()


def test_compress_json_happy_path_exit_0(
    tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    policy = write_policy(tmp_path / "p.yaml", test_policy(calib_npz, eval_npz))
    before = _artifact_digest(tracking_uri)
    proc = run_cli(["compress", digits_uri, "--policy", str(policy), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == ""
    doc = json.loads(proc.stdout)
    assert doc["source"] == {"name": "digits", "version": "1", "uri": "models:/digits/1"}
    assert doc["promoted_uri"] == "models:/digits-onnxruntime-int8/1"
    for cand in doc["candidates"]:
        assert {"backend", "recipe", "passed", "reasons", "metrics", "registered_uri"} <= set(cand)
        assert {"speedup", "size_ratio", "latency_p50_ms", "accuracy_drop", "fidelity"} <= set(cand["metrics"])
    assert _artifact_digest(tracking_uri) == before  # the source model is never touched


def test_compress_exit_1_when_no_candidate_passes(
    tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    policy = write_policy(
        tmp_path / "p.yaml",
        test_policy(calib_npz, eval_npz, recipes=["int8-dynamic"], gate={"max_accuracy_drop": 0.01}),
    )
    proc = run_cli(["compress", digits_uri, "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "no candidate passed the gate" in proc.stdout and "speedup" in proc.stdout
    assert [v[0] for v in model_versions(tracking_uri)] == ["digits"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad-policy", "invalid policy p.yaml: gate.min_speedup"),
        ("bad-uri", "not a registered model URI"),
        ("no-model", "registered model 'nope' does not exist"),
        ("no-version", "registered model 'digits' has no version 9"),
        ("no-alias", "registered model 'digits' has no alias '@prod'"),
        ("data-names", "calibration data"),
        ("data-dtype", "has dtype float64, the model input 'input' needs float32"),
        ("data-shape", "[N,1,28,28]"),
        ("no-data", "no calibration data"),
    ],
)
def test_bad_input_exit_2_one_line_nothing_registered(
    case: str, message: str, tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path,
    tmp_path: Path, qg_home: Path,
) -> None:  # fmt: skip
    uri = digits_uri
    policy = test_policy(calib_npz, eval_npz)
    bad = tmp_path / "bad.npz"
    if case == "bad-policy":
        policy["gate"] = {"min_speedup": "fast"}
    elif case == "bad-uri":
        uri = "digits/1"
    elif case == "no-model":
        uri = "models:/nope/1"
    elif case == "no-version":
        uri = "models:/digits/9"
    elif case == "no-alias":
        uri = "models:/digits@prod"
    elif case == "data-names":
        np.savez(bad, pixels=np.zeros((4, 1, 32, 32), np.float32))
        policy["data"]["calibration"] = str(bad)
    elif case == "data-dtype":
        np.savez(bad, input=np.zeros((4, 1, 32, 32), np.float64))
        policy["data"]["calibration"] = str(bad)
    elif case == "data-shape":
        np.savez(bad, input=np.zeros((4, 1, 28, 28), np.float32))
        policy["data"]["calibration"] = str(bad)
    elif case == "no-data":
        del policy["data"]
    before, digest = snapshot(tracking_uri), _artifact_digest(tracking_uri)
    proc = run_cli(["compress", uri, "--policy", str(write_policy(tmp_path / "p.yaml", policy))],
                   tracking_uri, qg_home, tmp_path)  # fmt: skip
    assert_clean_failure(proc, message)
    assert snapshot(tracking_uri) == before
    assert _artifact_digest(tracking_uri) == digest


def test_corrupt_onnx_in_the_registry_exit_2(
    tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version("digits", "1")
    root = Path(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    onnx_file = root / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:2048])
    policy = write_policy(tmp_path / "p.yaml", test_policy(calib_npz, eval_npz))
    before = snapshot(tracking_uri)
    proc = run_cli(["compress", digits_uri, "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
    assert_clean_failure(proc, "is not a valid ONNX model")
    assert snapshot(tracking_uri) == before


def test_unsupported_flavor_exit_2(tracking_uri: str, tmp_path: Path, qg_home: Path) -> None:
    import mlflow

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context: Any, model_input: Any) -> Any:
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Echo(), registered_model_name="echo", pip_requirements=[])
    proc = run_cli(["compress", "models:/echo/1"], tracking_uri, qg_home, tmp_path)
    assert_clean_failure(proc, "model flavor 'python_function only' is not supported")


def test_unreachable_tracking_server_exit_2(tmp_path: Path, qg_home: Path) -> None:
    proc = run_cli(
        ["compress", "models:/digits/1", "--tracking-uri", "http://127.0.0.1:9"], "sqlite:///x.db", qg_home, tmp_path
    )
    assert_clean_failure(proc, "cannot reach the MLflow tracking server at http://127.0.0.1:9")


def test_backends_lists_every_backend_and_why_tensorrt_is_not_available_here(tmp_path: Path, qg_home: Path) -> None:
    proc = run_cli(["backends"], "sqlite:///x.db", qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ ")}
    assert "yes" in rows["onnxruntime"] and "yes" in rows["openvino"]
    assert " no " in rows["tensorrt"] and "TensorRT is not installed" in rows["tensorrt"]
    assert "quantgate[tensorrt]" in proc.stdout.replace("│", "").replace("\n", "")
    assert "reference runtime" in rows["onnxruntime"]


def test_validators_lists_every_installed_validator(tmp_path: Path, qg_home: Path) -> None:
    proc = run_cli(["validators"], "sqlite:///x.db", qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ ")}
    for name in ("accuracy", "fidelity", "latency", "size"):
        assert "yes" in rows[name], proc.stdout
    assert "quantgate.validators.latency:LatencyValidator" in rows["latency"]


def test_tensorrt_on_a_cpu_host_prepares_and_checks_step_1_registers_nothing_exit_1(
    tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    policy = write_policy(
        tmp_path / "p.yaml", test_policy(calib_npz, eval_npz, backends=["tensorrt"], recipes=["int8-qdq", "fp16"])
    )
    proc = run_cli(["compress", digits_uri, "--policy", str(policy), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["outcome"] == "none_passed" and doc["promoted_uri"] is None
    for cand in doc["candidates"]:
        checks = {c["name"]: c for c in cand["checks"]}
        assert checks["accuracy"]["passed"], cand  # step 1's ONNX was run and scored here
        assert "needs an NVIDIA GPU worker" in checks["target"]["detail"]
    assert [v[0] for v in model_versions(tracking_uri)] == ["digits"]


def test_prefects_own_ephemeral_mode_runs_quietly(
    tracking_uri: str, digits_uri: str, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    """Prefect's temporary server (no server configured, no quantgate server): same result, no telemetry noise."""
    policy = write_policy(
        tmp_path / "p.yaml", test_policy(calib_npz, eval_npz, recipes=["int8-static-qdq-minmax-perchannel"])
    )
    proc = run_cli(
        ["compress", digits_uri, "--policy", str(policy), "--json", "--prefect", "ephemeral"],
        tracking_uri, qg_home, tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # in particular no "database is locked" traceback from the server's telemetry
    assert json.loads(proc.stdout)["promoted_uri"] == "models:/digits-onnxruntime-int8/1"


def test_local_prefect_start_status_stop(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("qghome-own")
    try:
        started = run_cli(["local-prefect", "start"], "sqlite:///x.db", home, tmp_path)
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        status = run_cli(["local-prefect", "status"], "sqlite:///x.db", home, tmp_path)
        assert json.loads(status.stdout)["url"] == url
    finally:
        stopped = run_cli(["local-prefect", "stop"], "sqlite:///x.db", home, tmp_path)
    assert stopped.stdout.strip() == "stopped"


def test_pytorch_model_compresses_with_nothing_on_stderr(
    tracking_uri: str, digits_cnn: Any, digits: Any, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    """The demo's path: a pt2-format pytorch model, exported during the run (mlflow.pytorch is imported mid-flow)."""
    register_pytorch(digits_cnn, digits, "pt")
    policy = write_policy(
        tmp_path / "p.yaml", test_policy(calib_npz, eval_npz, recipes=["int8-static-qdq-minmax", "int8-dynamic"])
    )
    proc = run_cli(["compress", "models:/pt/1", "--policy", str(policy), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["flavor"] == "pytorch" and doc["promoted_uri"] == "models:/pt-onnxruntime-int8/1"
