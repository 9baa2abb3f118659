"""Every bad-input class of issue 11 through the real `quantgate` command: exit 2, one line naming the problem, no
traceback, nothing registered, nothing created."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import model_versions, register_onnx, test_policy
from tests.test_cli import assert_clean_failure, run_cli, write_policy


@pytest.fixture()
def digits_uri(tracking_uri: str, digits_onnx: Path) -> str:
    return register_onnx(tracking_uri, digits_onnx, "digits")


@pytest.fixture()
def not_mlflow() -> Iterator[str]:
    """An HTTP server that answers everything, as a web app at the wrong URL would."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>welcome</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" * 50, "not UTF-8 text"),
        (b"[" * 5000 + b"]" * 5000, "nested more than 32 levels deep"),
        (b"gate: {min_speedup: 1e400}\n", "gate.min_speedup: Input should be a finite number"),
        (b"latency: {rounds: 1e23}\n", "latency.rounds"),
        (b"gate: {checks: {fidelty: {x: 0.9}}}\n", "gate.checks.fidelty: unknown validator 'fidelty'; did you mean"),
        (b"gate: {checks: {size: {size: 0.5}}}\n", "gate.checks.size.size: this check is set with gate.max_size_ratio"),
    ],
    ids=["binary", "5000-deep", "min_speedup-1e400", "rounds-1e23", "check-of-a-typo", "built-in-check-twice"],
)
def test_a_bad_policy_file_is_exit_2(
    tracking_uri: str, digits_uri: str, tmp_path: Path, qg_home: Path, content: bytes, message: str
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_bytes(content)
    before = model_versions(tracking_uri)
    proc = run_cli(["compress", digits_uri, "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
    assert_clean_failure(proc, message)
    assert model_versions(tracking_uri) == before


def test_an_http_server_that_is_not_mlflow_is_exit_2(not_mlflow: str, tmp_path: Path, qg_home: Path) -> None:
    proc = run_cli(["compress", "models:/m/1", "--tracking-uri", not_mlflow], not_mlflow, qg_home, tmp_path)
    assert_clean_failure(proc, "is not an MLflow tracking server (GET /health answered 200)")


@pytest.mark.parametrize("command", [["compress", "models:/m/1"], ["report", "models:/m/1"], ["history", "m"]])
def test_a_tracking_uri_with_an_unknown_scheme_is_exit_2(command: list[str], tmp_path: Path, qg_home: Path) -> None:
    proc = run_cli([*command, "--tracking-uri", "foo://bar"], "foo://bar", qg_home, tmp_path)
    assert_clean_failure(proc, "tracking URI foo://bar: MLflow has no store for this scheme")


def test_a_sqlite_store_in_a_missing_directory_is_exit_2_and_creates_nothing(tmp_path: Path, qg_home: Path) -> None:
    uri = "sqlite:////nonexistent/dir/x.db"
    proc = run_cli(["compress", "models:/m/1", "--tracking-uri", uri], uri, qg_home, tmp_path)
    assert_clean_failure(proc, "the directory /nonexistent/dir does not exist")
    assert not Path("/nonexistent").exists()
    missing = f"sqlite:///{tmp_path}/none.db"
    proc = run_cli(["compress", "models:/m/1", "--tracking-uri", missing], missing, qg_home, tmp_path)
    assert_clean_failure(proc, "no MLflow database at")
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "mlruns").exists()


def _data_with(tmp_path: Path, source: Path, edit: str) -> Path:
    with np.load(source) as f:
        arrays = {k: f[k].copy() for k in f.files}
    if edit == "labels-1000":
        arrays["labels"][3] = 1000
    elif edit == "labels-negative":
        arrays["labels"][0] = -5
    else:
        arrays["input"][7, 0, 3, 3] = np.nan if edit == "nan" else np.inf
    path = tmp_path / f"eval-{edit}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("labels-1000", "'labels' range from 0 to 1000, but the model outputs 10 classes"),
        ("labels-negative", "'labels' range from -5 to 9, but the model outputs 10 classes"),
        ("nan", "evaluation data has NaN or Inf in 'input' (1 values)"),
        ("inf", "evaluation data has NaN or Inf in 'input' (1 values)"),
    ],
)
def test_garbage_labels_and_non_finite_inputs_are_exit_2_and_register_nothing(
    tracking_uri: str,
    digits_uri: str,
    calib_npz: Path,
    eval_npz: Path,
    tmp_path: Path,
    qg_home: Path,
    edit: str,
    message: str,
) -> None:
    evaluation = _data_with(tmp_path, eval_npz, edit)
    policy = write_policy(tmp_path / "p.yaml", test_policy(calib_npz, evaluation))
    proc = run_cli(["compress", digits_uri, "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
    assert_clean_failure(proc, message)
    assert [v[0] for v in model_versions(tracking_uri)] == ["digits"]
    assert not any(k.startswith("quantgate.") for k in model_versions(tracking_uri)[0][2])


def _serve_webhooks(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QUANTGATE_"))}
    full.update(
        {"QUANTGATE_HOME": str(tmp_path / "home"), "QUANTGATE_WEBHOOK_SECRET": "a-real-secret-of-32-characters!!"}
    )
    full.update(env)
    exe = str(Path(sys.executable).with_name("quantgate"))
    argv = [exe, "serve-webhooks", "--port", "1", "--tracking-uri", f"sqlite:///{tmp_path}/x.db"]
    return subprocess.run(argv, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUANTGATE_WEBHOOK_MAX_BODY_BYTES": "1MB"}, "QUANTGATE_WEBHOOK_MAX_BODY_BYTES must be an integer"),
        ({"QUANTGATE_WEBHOOK_MAX_BODY_BYTES": "0"}, "QUANTGATE_WEBHOOK_MAX_BODY_BYTES must be positive"),
        ({"QUANTGATE_WEBHOOK_SECRET": "CHANGE-ME"}, "QUANTGATE_WEBHOOK_SECRET is a placeholder"),
    ],
)
def test_the_bridge_refuses_bad_settings_at_start_with_exit_2(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    assert_clean_failure(_serve_webhooks(env, tmp_path), message)


def test_webhooks_register_turns_mlflows_refusal_into_one_line_exit_2(tracking_uri: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "QUANTGATE_WEBHOOK_SECRET": "a-real-secret-of-32-characters!!"})
    exe = str(Path(sys.executable).with_name("quantgate"))
    proc = subprocess.run(
        [exe, "webhooks", "register", "--url", "ftp://bridge.example.com/hook"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_failure(proc, "MLflow refused the webhook for ftp://bridge.example.com/hook")
