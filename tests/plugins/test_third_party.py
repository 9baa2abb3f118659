"""A third party's backend, built into a wheel and pip-installed here, goes through the real CLI end to end.

Nothing in quantgate names it: it is found through its entry point, checked against the protocol, timed against the
reference runtime, logged by its own ``log_model`` and served by MLflow. Two broken backends in the same wheel are
refused at load, in one line, while the run with the built-in backend beside them succeeds.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import model_versions, register_onnx, test_policy
from tests.test_cli import run_cli, write_policy

pytestmark = pytest.mark.slow

PACKAGE = "qg_tiny_backend"

# The plugin's whole source: only quantgate's public plugin API, onnxruntime and mlflow.
MODULE = '''
"""A tiny backend: ONNX Runtime's dynamic INT8 on matrix products only, served by its own pyfunc model."""

import warnings

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.models import Model
from onnxruntime.quantization import quantize_dynamic

from quantgate.plugins.base import PLUGIN_API_VERSION, Availability, Candidate, Recipe, model_files
from quantgate.serving import pins


def _session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class TinyRunner:
    def __init__(self, path, threads):
        self._session = _session(path, threads)

    def run(self, inputs):
        return self._session.run(None, dict(inputs))


class TinyModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self._session = _session(context.artifacts["model"], 1)

    def predict(self, context, model_input, params=None):
        # A signature with named tensors hands predict a dict by name; a bare array is the one input.
        name = self._session.get_inputs()[0].name
        feed = model_input if isinstance(model_input, dict) else {name: model_input}
        return self._session.run(None, {k: np.asarray(v, dtype=np.float32) for k, v in feed.items()})[0]


class TinyBackend:
    name = "tiny"
    plugin_api = PLUGIN_API_VERSION

    def available(self):
        return Availability(True)

    def recipes(self, model):
        return [Recipe.make(self.name, "int8-matmul", "int8")]

    def baseline(self, model, workdir):
        return Candidate(Recipe.make(self.name, "fp32", "fp32"), model.path, files=model_files(model.path))

    def compress(self, model, recipe, calib, workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "int8-matmul.onnx"
        quantize_dynamic(str(model.path), str(out), op_types_to_quantize=["MatMul", "Gemm"])
        return Candidate(recipe, out, notes=("dynamic INT8 on MatMul/Gemm by the tiny backend",))

    def runner(self, candidate, *, threads):
        return TinyRunner(candidate.artifact, threads)

    def log_model(self, request):
        with warnings.catch_warnings():  # MLflow asks for type hints on predict; its input is the signature's tensor
            warnings.simplefilter("ignore", UserWarning)
            info = self._log(request)
        return str(info.model_uri)

    def _log(self, request):
        return Model.log(
            flavor=mlflow.pyfunc,
            python_model=TinyModel(),
            artifacts={"model": str(request.artifact)},
            pip_requirements=pins(request.libraries, ("mlflow", "onnxruntime", "numpy")),
            **request.mlflow_args,
        )


class NoLogModel(TinyBackend):
    name = "tiny-nolog"
    log_model = None


class FutureApi(TinyBackend):
    name = "tiny-future"
    plugin_api = PLUGIN_API_VERSION + 1
'''

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{PACKAGE.replace("_", "-")}"
version = "0.1.0"
dependencies = ["quantgate"]

[tool.setuptools]
py-modules = ["{PACKAGE}"]

[project.entry-points."quantgate.backends"]
tiny = "{PACKAGE}:TinyBackend"
tiny-nolog = "{PACKAGE}:NoLogModel"
tiny-future = "{PACKAGE}:FutureApi"
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_backend_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    src = tmp_path_factory.mktemp("tiny-src")
    (src / f"{PACKAGE}.py").write_text(textwrap.dedent(MODULE))
    (src / "pyproject.toml").write_text(PYPROJECT)
    dist = tmp_path_factory.mktemp("tiny-dist")
    # No build isolation and no index: the wheel is built from this venv's setuptools, offline.
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src))
    (wheel,) = dist.glob("*.whl")
    _pip("install", "--no-deps", "--no-index", str(wheel))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        _pip("uninstall", "-y", PACKAGE.replace("_", "-"))
        importlib.invalidate_caches()
        sys.modules.pop(PACKAGE, None)


def test_backends_lists_the_installed_plugin_and_refuses_the_broken_ones_in_one_line(
    tiny_backend_installed: None, tmp_path: Path, qg_home: Path
) -> None:
    proc = run_cli(["backends"], "sqlite:///x.db", qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    flat = proc.stdout.replace("│", " ").replace("\n", " ")
    flat = " ".join(flat.split())
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ ")}
    assert "yes" in rows["tiny"]
    assert "backend plugin 'tiny-nolog' (qg_tiny_backend:NoLogModel) refused: it lacks log_model" in flat
    assert "backend plugin 'tiny-future' (qg_tiny_backend:FutureApi) refused: written for plugin API 2" in flat


def test_a_third_party_backend_compresses_gates_registers_and_serves(
    tiny_backend_installed: None,
    tracking_uri: str,
    digits_onnx: Path,
    calib_npz: Path,
    eval_npz: Path,
    eval_data: dict[str, np.ndarray],
    tmp_path: Path,
    qg_home: Path,
) -> None:
    import mlflow.pyfunc

    source = register_onnx(tracking_uri, digits_onnx, "digits")
    gate = {"max_accuracy_drop": 0.02, "min_speedup": 0.3, "speedup_against": "own_fp32"}
    policy = write_policy(
        tmp_path / "p.yaml", test_policy(calib_npz, eval_npz, backends=["tiny"], recipes=["int8-matmul"], gate=gate)
    )
    proc = run_cli(["compress", source, "--policy", str(policy), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(proc.stdout)
    (cand,) = doc["candidates"]
    assert cand["backend"] == "tiny" and cand["passed"], cand
    assert doc["promoted_uri"] == "models:/digits-tiny-int8/1"
    run = MlflowClient(tracking_uri).get_run(
        MlflowClient(tracking_uri).get_model_version("digits-tiny-int8", "1").run_id
    )
    assert "speedup_vs_ort_fp32" in run.data.metrics  # ranked against the reference runtime like any backend
    assert ("digits-tiny-int8", "1") in [(n, v) for n, v, _ in model_versions(tracking_uri)]

    served = mlflow.pyfunc.load_model(doc["promoted_uri"])
    x = eval_data["input"][:8]
    got = np.asarray(served.predict(x))
    assert got.shape[0] == 8
    assert (got.argmax(axis=1) == eval_data["labels"][:8]).mean() >= 0.75


def test_broken_plugins_fail_their_own_candidates_not_the_built_in_run(
    tiny_backend_installed: None,
    tracking_uri: str,
    digits_onnx: Path,
    calib_npz: Path,
    eval_npz: Path,
    tmp_path: Path,
    qg_home: Path,
) -> None:
    source = register_onnx(tracking_uri, digits_onnx, "digits")
    backends = ["onnxruntime", "tiny-nolog", "tiny-future"]
    policy = write_policy(
        tmp_path / "p.yaml",
        test_policy(calib_npz, eval_npz, backends=backends, recipes=["int8-static-qdq-minmax-perchannel"]),
    )
    proc = run_cli(["compress", source, "--policy", str(policy), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["promoted_uri"] == "models:/digits-onnxruntime-int8/1"
    reasons = {c["backend"]: c["reasons"] for c in doc["candidates"] if not c["passed"]}
    assert set(reasons) == {"tiny-nolog", "tiny-future"}, doc["candidates"]
    assert "it lacks log_model of the Backend protocol" in reasons["tiny-nolog"][0]
    assert "written for plugin API 2" in reasons["tiny-future"][0]
    assert all("\n" not in r[0] for r in reasons.values())
