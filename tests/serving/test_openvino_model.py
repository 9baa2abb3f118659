"""The OpenVINO pyfunc carries the inference precision its candidate was measured with: a BF16 version computes in
BF16 when MLflow loads it, and a host that cannot compute in it is refused at load, in one line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc.model import PythonModelContext

from quantgate import serving
from quantgate.data import NpzDataset
from quantgate.gate import Verdict
from quantgate.hardware import detect
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import Calibration, Candidate
from quantgate.plugins.openvino import OpenVinoBackend, cpu_plugin_capabilities, openvino_model_config
from quantgate.result import CandidateResult
from quantgate.serving import HERE

pytest.importorskip("openvino")

BF16_REFUSAL = (
    "this model was measured with BF16 compute and needs a CPU with AVX512_BF16 or AMX-BF16; this CPU has neither"
)


@pytest.fixture(scope="module")
def ir(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, Candidate]:
    info = read_model_info(digits_onnx)
    return info, OpenVinoBackend().baseline(info, tmp_path_factory.mktemp("ov-ir"))


def _recipe(info: ModelInfo, name: str) -> Any:
    return next(r for r in OpenVinoBackend().recipes(info) if r.name == name)


def _save(model_dir: Path, xml: Path, config: dict[str, Any]) -> Path:
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(HERE / "openvino_model.py"),
        artifacts={"model_xml": str(xml), "model_bin": str(xml.with_suffix(".bin"))},
        model_config=config,
        pip_requirements=["openvino"],
    )
    return model_dir


def _log_and_register(client: MlflowClient, cand: Candidate, info: ModelInfo, name: str) -> str:
    exp_id = client.create_experiment(name)
    run_id = client.create_run(exp_id).info.run_id
    result = CandidateResult(cand.recipe, {}, Verdict(True, ()), detect(), artifact=cand.artifact)
    uri = serving.log_candidate_model(client, exp_id, run_id, result, info)
    client.create_registered_model(name)
    mv = client.create_model_version(name, uri, run_id=run_id, model_id=uri.removeprefix("models:/"))
    return f"models:/{name}/{mv.version}"


@pytest.mark.skipif("BF16" not in cpu_plugin_capabilities(), reason="OpenVINO offers no BF16 compute on this host")
def test_a_registered_bf16_version_loads_through_mlflow_and_computes_in_bf16(
    ir: tuple[ModelInfo, Candidate], calib_npz: Path, eval_data: dict[str, np.ndarray], tracking_uri: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    info, fp32 = ir
    backend = OpenVinoBackend()
    cand = backend.compress(info, _recipe(info, "bf16"), Calibration(NpzDataset.open(calib_npz)), tmp_path / "bf16")
    client = MlflowClient(tracking_uri)
    x = {"input": eval_data["input"][:8]}
    for candidate, name, precision in ((cand, "digits-openvino-bf16", "bf16"), (fp32, "digits-openvino-fp32", "f32")):
        loaded = mlflow.pyfunc.load_model(_log_and_register(client, candidate, info, name))
        assert loaded.model_config["inference_precision"] == precision
        assert loaded.unwrap_python_model().inference_precision == precision
        out = loaded.predict(x)["output"]
        expected = backend.runner(candidate, threads=1).run(x)[0]  # what the gate measured
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)
    assert loaded.unwrap_python_model().inference_precision == "f32"  # pinned: not OpenVINO's BF16 default here


def test_a_bf16_model_is_refused_in_one_line_on_a_host_without_bf16(
    ir: tuple[ModelInfo, Candidate], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU cannot be changed, so our own detection function in the served code is made to see one without
    BF16. mlflow executes a model's code afresh at every load, where no patch reaches it, so this drives the
    ``load_context`` mlflow calls with the artifacts and config of a saved model (the next test refuses through
    ``mlflow.pyfunc.load_model`` itself, with no patch)."""
    import quantgate.serving.openvino_model as served

    info, fp32 = ir
    model_dir = _save(tmp_path / "model", fp32.artifact, openvino_model_config(_recipe(info, "bf16")))
    flavor = Model.load(str(model_dir)).flavors["python_function"]
    artifacts = {k: str(model_dir / v["path"]) for k, v in flavor["artifacts"].items()}
    context = PythonModelContext(artifacts, flavor["config"])
    monkeypatch.setattr(served, "cpu_capabilities", lambda: (frozenset({"FP32", "INT8"}), frozenset({"avx2", "fma"})))
    with pytest.raises(MlflowException) as caught:
        served.OpenVinoIRModel().load_context(context)
    assert caught.value.message == BF16_REFUSAL
    # A CPU that has the flag but whose OpenVINO does not offer BF16 is refused too, saying so.
    monkeypatch.setattr(served, "cpu_capabilities", lambda: (frozenset({"FP32"}), frozenset({"avx512_bf16"})))
    with pytest.raises(MlflowException, match=r"; this CPU has avx512_bf16, but OpenVINO [\d.]+ does not offer BF16"):
        served.OpenVinoIRModel().load_context(context)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="caps the x86 ISA oneDNN may use")
def test_mlflow_refuses_to_load_an_fp16_model_where_openvino_offers_no_fp16(
    ir: tuple[ModelInfo, Candidate], tmp_path: Path
) -> None:
    """No patch: a fresh process whose oneDNN is capped below AVX512-FP16 (``ONEDNN_MAX_CPU_ISA``) is a host where
    OpenVINO offers no FP16 (it would compute such a model in BF16 instead, without a word)."""
    info, fp32 = ir
    model_dir = _save(tmp_path / "model", fp32.artifact, openvino_model_config(_recipe(info, "f16")))
    code = (
        "import sys, mlflow.pyfunc\n"
        "from mlflow.exceptions import MlflowException\n"
        "from quantgate.plugins.openvino import cpu_plugin_capabilities\n"
        "if 'FP16' in cpu_plugin_capabilities(): sys.exit(3)\n"
        "try:\n"
        f"    mlflow.pyfunc.load_model({str(model_dir)!r})\n"
        "except MlflowException as exc:\n"
        "    print(exc.message)\n"
        "    sys.exit(0)\n"
        "sys.exit(4)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode == 3:
        pytest.skip("this OpenVINO ignores ONEDNN_MAX_CPU_ISA when listing FP16")
    assert done.returncode == 0, done.stdout + done.stderr
    message = done.stdout.strip().splitlines()[-1]
    needs = "needs a CPU with AVX512-FP16, AMX-FP16 or ARM FP16 arithmetic; "
    assert message.startswith(f"this model was measured with FP16 compute and {needs}"), message
    has_flag = "avx512_fp16" in detect().isa_flags
    assert message.endswith("does not offer FP16 here" if has_flag else "this CPU has none of them"), message


def test_a_registered_static_shape_version_compiles_per_request_shape_and_answers_like_the_dynamic_one(
    ir: tuple[ModelInfo, Candidate], eval_data: dict[str, np.ndarray], tracking_uri: str
) -> None:
    info, fp32 = ir
    backend = OpenVinoBackend()
    static = backend.specialize(fp32)
    assert static is not None and static.recipe.name == "fp32-ir-static" and static.recipe.options["static_shapes"]
    assert backend.specialize(static) is None  # already compiled for its shapes
    assert openvino_model_config(static.recipe) == {"inference_precision": "f32", "static_shapes": True}
    client = MlflowClient(tracking_uri)
    loaded = mlflow.pyfunc.load_model(_log_and_register(client, static, info, "digits-openvino-static"))
    reference = backend.runner(fp32, threads=1)
    for n in (1, 8, 3, 8):  # three shapes, one of them twice
        x = eval_data["input"][:n]
        out = loaded.predict({"input": x})
        np.testing.assert_allclose(next(iter(out.values())), reference.run({"input": x})[0], rtol=1e-4, atol=1e-5)
    shapes = loaded.unwrap_python_model()._by_shape  # one compiled model per input shape seen
    assert sorted(shape[0][0] for shape in shapes) == [1, 3, 8]
