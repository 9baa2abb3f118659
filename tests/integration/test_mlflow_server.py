"""Against a real `mlflow server` process on 127.0.0.1: register, compress with the CLI, serve the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quantgate.testing import predict_rest as _invoke
from quantgate.testing import serve_model as _served
from tests.conftest import register_onnx, test_policy

pytestmark = pytest.mark.slow


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
        both = test_policy(
            calib_npz,
            eval_npz,
            backends=["onnxruntime", "openvino"],
            recipes=["int8-static-qdq-minmax-perchannel", "int8-ptq-performance"],
            gate={"min_speedup": None},  # both register (INT8 may not beat FP32 on this CPU); which wins is not asked
            registry={"register_all_passing": True},
            search={"specialize_shapes": False},  # one version per backend (tests/serving covers the shape variant)
        )
        policy.write_text(yaml.safe_dump(both))
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
        registered = {c["backend"]: c["registered_uri"] for c in doc["candidates"]}
        assert registered == {
            "onnxruntime": "models:/digits-server-onnxruntime-int8/1",
            "openvino": "models:/digits-server-openvino-int8/1",
        }, [c["reasons"] for c in doc["candidates"]]
        promoted = doc["promoted_uri"]
        name = promoted.split("/")[1]
        client = MlflowClient(mlflow_server)
        assert str(client.get_model_version_by_alias(name, "compressed").version) == "1"

        x = eval_data["input"][:16]
        in_process = {}
        for backend, uri in registered.items():
            served = mlflow.pyfunc.load_model(uri)
            out = served.predict({"input": x})["output"]
            accuracy = float(np.mean(np.argmax(out, axis=1) == eval_data["labels"][:16]))
            assert accuracy >= 0.8, backend
            in_process[backend] = out
            # Exact pins, so the version loads the same in a fresh environment.
            reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
            assert reqs and all("==" in r for r in reqs), reqs
            assert any(r.startswith("openvino==" if backend == "openvino" else "onnxruntime==") for r in reqs)

        # `mlflow models serve` answers REST predictions that match the in-process ones, for both formats.
        with (
            _served(registered["onnxruntime"], mlflow_server, tmp_path / "ort") as ort_url,
            _served(registered["openvino"], mlflow_server, tmp_path / "ov") as ov_url,
        ):
            for backend, url in (("onnxruntime", ort_url), ("openvino", ov_url)):
                rest = _invoke(url, {"inputs": {"input": x.tolist()}})
                np.testing.assert_allclose(np.asarray(rest["predictions"]["output"]), in_process[backend], atol=1e-4)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
