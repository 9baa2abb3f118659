"""Against a real `mlflow server` process on 127.0.0.1: register, compress with the CLI, serve the result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import register_onnx, test_policy

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with open(d / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [mlflow_exe, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_compress_against_a_real_tracking_server_registers_a_servable_version(
    mlflow_server: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, eval_data: dict[str, np.ndarray],
    tmp_path: Path, qg_home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    mlflow.set_experiment("training")
    try:
        source_uri = register_onnx(mlflow_server, digits_onnx, "digits-server")
        MlflowClient(mlflow_server).set_registered_model_alias("digits-server", "champion", "1")
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(test_policy(calib_npz, eval_npz)))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env["QUANTGATE_HOME"] = str(qg_home)
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("quantgate")), "compress", "models:/digits-server@champion",
             "--policy", str(policy), "--tracking-uri", mlflow_server, "--json"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # no library chatter, no traceback
        assert proc.stdout.startswith("{"), proc.stdout[:2000]
        doc = json.loads(proc.stdout)
        assert doc["source"]["uri"] == source_uri  # the alias was pinned to a version
        promoted = doc["promoted_uri"]
        assert promoted == "models:/digits-server-onnxruntime-int8/1"

        client = MlflowClient(mlflow_server)
        assert str(client.get_model_version_by_alias("digits-server-onnxruntime-int8", "compressed").version) == "1"
        served = mlflow.pyfunc.load_model(promoted)
        out = served.predict({"input": eval_data["input"][:16]})["output"]
        accuracy = float(np.mean(np.argmax(out, axis=1) == eval_data["labels"][:16]))
        assert accuracy >= 0.8
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
