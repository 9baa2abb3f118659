"""A third party's backend and validator, built into a wheel and pip-installed here, go through the real CLI end to end.

Nothing in quantgate names them: they are found through their entry points, checked against their protocols, the
backend timed against the reference runtime, logged by its own ``log_model`` and served by ``mlflow models serve``;
the validator's declared check gates under ``gate.checks`` and its metrics land under names no built-in one has.
Two broken backends in the same wheel are refused at load, in one line, while the run with the built-in backend
beside them succeeds. The tests use only what a plugin author has: ``quantgate.testing``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from quantgate.plugins.base import BACKENDS, Backend
from quantgate.testing import BackendContract, Sandbox, ValidatorContract, predict_rest
from quantgate.validators.base import VALIDATORS, Validator
from tests.conftest import test_policy

pytestmark = pytest.mark.slow

PACKAGE = "qg_tiny_backend"

# The plugin's whole source: only quantgate's public plugin API, onnxruntime and mlflow.
MODULE = '''
"""A tiny backend: ONNX Runtime's dynamic INT8 on matrix products only, served by its own pyfunc model; and a tiny
validator that gates on how far the candidate's largest output moved from FP32's."""

import warnings

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.models import Model
from onnxruntime.quantization import quantize_dynamic

from quantgate.plugins.base import PLUGIN_API_VERSION, Availability, Candidate, Recipe, model_files
from quantgate.serving import pins
from quantgate.validators.base import CheckSpec, Measurement, Threshold


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


class OutputScale:
    """The candidate's largest output over FP32's, gated by the policy's gate.checks.outscale.max_output_scale."""

    name = "outscale"
    plugin_api = PLUGIN_API_VERSION
    metric_names = ("output_scale",)

    def applies(self, ctx):
        return True

    def checks(self):
        return (CheckSpec("max_output_scale", "output_scale", "max", Threshold),)

    def measure(self, ctx):
        base = float(np.abs(ctx.baseline_outputs.outputs).max())
        cand = float(np.abs(ctx.candidate_outputs.outputs).max())
        # "speedup" is not declared: it is published as outscale.speedup, never over the latency validator's.
        return Measurement(self.name, {"output_scale": cand / base, "speedup": 1000.0})
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

[project.entry-points."quantgate.validators"]
outscale = "{PACKAGE}:OutputScale"
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_backend_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The wheel installed into this environment; yields its module (for the contract suites in this process)."""
    src = tmp_path_factory.mktemp("tiny-src")
    (src / f"{PACKAGE}.py").write_text(textwrap.dedent(MODULE))
    (src / "pyproject.toml").write_text(PYPROJECT)
    dist = tmp_path_factory.mktemp("tiny-dist")
    # No build isolation and no index: the wheel is built from this venv's setuptools, offline.
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src))
    (wheel,) = dist.glob("*.whl")
    _pip("install", "--no-deps", "--no-index", str(wheel))
    importlib.invalidate_caches()
    BACKENDS.refresh()  # this process read its entry points before the wheel was installed
    VALIDATORS.refresh()
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        _pip("uninstall", "-y", PACKAGE.replace("_", "-"))
        importlib.invalidate_caches()
        sys.modules.pop(PACKAGE, None)
        BACKENDS.refresh()
        VALIDATORS.refresh()


@pytest.fixture()
def box(tmp_path: Path, qg_home: Path) -> Iterator[Sandbox]:
    with Sandbox(tmp_path / "sandbox", home=qg_home) as sandbox:
        yield sandbox


class TestTinyBackendContract(BackendContract):
    """The contract suite, as the plugin's author would run it in their own package."""

    @pytest.fixture()
    def backend(self, tiny_backend_installed: Any) -> Backend:
        plugin: Backend = tiny_backend_installed.TinyBackend()
        return plugin


class TestOutputScaleContract(ValidatorContract):
    @pytest.fixture()
    def validator(self, tiny_backend_installed: Any) -> Validator:
        plugin: Validator = tiny_backend_installed.OutputScale()
        return plugin


def test_backends_lists_the_installed_plugin_and_refuses_the_broken_ones_in_one_line(
    tiny_backend_installed: Any, box: Sandbox
) -> None:
    proc = box.run("backends")
    assert proc.returncode == 0, proc.stderr
    flat = proc.stdout.replace("│", " ").replace("\n", " ")
    flat = " ".join(flat.split())
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ ")}
    assert "yes" in rows["tiny"]
    assert "backend plugin 'tiny-nolog' (qg_tiny_backend:NoLogModel) refused: it lacks log_model" in flat
    assert "backend plugin 'tiny-future' (qg_tiny_backend:FutureApi) refused: written for plugin API 2" in flat
    validators = box.run("validators")
    assert validators.returncode == 0, validators.stderr
    assert "max_output_scale: gate.checks.outscale.max_output_scale" in " ".join(validators.stdout.split())


def test_a_third_party_backend_and_validator_compress_gate_register_and_serve(
    tiny_backend_installed: Any, box: Sandbox, digits_onnx: Path, calib_npz: Path, eval_npz: Path,
    eval_data: dict[str, np.ndarray],
) -> None:  # fmt: skip
    source = box.register_onnx(digits_onnx, "digits")
    gate = {
        "max_accuracy_drop": 0.02,
        "min_speedup": 0.3,
        "speedup_against": "own_fp32",
        "checks": {"outscale": {"max_output_scale": 1.5}},
    }
    run = box.compress(source, test_policy(calib_npz, eval_npz, backends=["tiny"], recipes=["int8-matmul"], gate=gate))
    assert run.exit_code == 0, run.stderr + run.stdout
    assert run.document is not None
    cand = run.candidate("tiny", "int8-matmul")
    assert cand["passed"], cand
    scale = next(c for c in cand["checks"] if c["name"] == "max_output_scale")
    metrics = cand["all_metrics"]
    assert scale["passed"] and scale["detail"] == f"output_scale {metrics['output_scale']:.6g}, at most 1.5 allowed"
    assert metrics["outscale.speedup"] == 1000.0 and metrics["speedup"] < 100  # the latency validator's, untouched
    uri = run.document["promoted_uri"]
    assert uri == "models:/digits-tiny-int8/1"
    client = MlflowClient(box.tracking_uri)
    run_metrics = client.get_run(client.get_model_version("digits-tiny-int8", "1").run_id).data.metrics
    assert "speedup_vs_ort_fp32" in run_metrics  # ranked against the reference runtime like any backend
    assert run_metrics["outscale.speedup"] == 1000.0
    assert ("digits-tiny-int8", "1") in [(n, v) for n, v, _ in box.versions()]

    x = eval_data["input"][:8]
    in_process = np.asarray(box.load_model(uri).predict(x))
    assert (in_process.argmax(axis=1) == eval_data["labels"][:8]).mean() >= 0.75
    with box.serve(uri) as url:  # `mlflow models serve` with its own pyfunc model, over REST
        served = np.asarray(predict_rest(url, {"inputs": {"input": x.tolist()}})["predictions"])
    np.testing.assert_allclose(served, in_process, rtol=1e-5, atol=1e-5)


def test_a_policy_that_misnames_a_third_party_check_is_exit_2_with_the_closest_name(
    tiny_backend_installed: Any, box: Sandbox, digits_onnx: Path, calib_npz: Path, eval_npz: Path
) -> None:
    source = box.register_onnx(digits_onnx, "digits")
    gate = {"checks": {"outscale": {"max_output_scal": 1.5}}}
    run = box.compress(source, test_policy(calib_npz, eval_npz, backends=["tiny"], gate=gate))
    assert run.exit_code == 2 and run.document is None, run.stderr
    assert run.stderr.strip() == (
        "quantgate: error: invalid policy: gate.checks.outscale.max_output_scal: unknown check 'max_output_scal' "
        "of validator 'outscale'; did you mean 'max_output_scale'? (declared: max_output_scale)"
    )
    assert box.versions() == [("digits", "1", {})]


def test_broken_plugins_fail_their_own_candidates_not_the_built_in_run(
    tiny_backend_installed: Any, box: Sandbox, digits_onnx: Path, calib_npz: Path, eval_npz: Path
) -> None:
    source = box.register_onnx(digits_onnx, "digits")
    backends = ["onnxruntime", "tiny-nolog", "tiny-future"]
    run = box.compress(
        source, test_policy(calib_npz, eval_npz, backends=backends, recipes=["int8-static-qdq-minmax-perchannel"])
    )
    assert run.exit_code == 0, run.stderr
    assert run.document is not None
    assert run.document["promoted_uri"] == "models:/digits-onnxruntime-int8/1"
    reasons = {c["backend"]: c["reasons"] for c in run.document["candidates"] if not c["passed"]}
    assert set(reasons) == {"tiny-nolog", "tiny-future"}, run.document["candidates"]
    assert "it lacks log_model of the Backend protocol" in reasons["tiny-nolog"][0]
    assert "written for plugin API 2" in reasons["tiny-future"][0]
    assert all("\n" not in r[0] for r in reasons.values())
