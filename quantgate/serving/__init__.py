"""How each backend's compressed artifact is logged so MLflow serves it as it is.

ONNX Runtime candidates use MLflow's ``onnx`` flavor. OpenVINO IRs and TensorRT engines have no MLflow flavor, so
they are logged as pyfunc models from code: a small script (``openvino_model.py``, ``tensorrt_model.py``) that
MLflow copies into the model and runs at load time. Either way ``mlflow.pyfunc.load_model(uri)`` predicts with the
source model's signature, and ``mlflow models serve`` answers REST requests. An OpenVINO model carries the inference
precision it was measured with in its ``model_config`` and compiles with it wherever it is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantgate.errors import BackendError
from quantgate.hardware import compute_need
from quantgate.model import ModelInfo
from quantgate.plugins.base import Recipe
from quantgate.result import CandidateResult

HERE = Path(__file__).parent
ORT_LIBRARIES = ("mlflow", "onnx", "onnxruntime", "numpy")
OPENVINO_LIBRARIES = ("mlflow", "openvino", "numpy")


def signature(model: ModelInfo) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(t: Any) -> Any:
        return TensorSpec(t.dtype, tuple(-1 if d is None else d for d in t.shape), t.name)

    return ModelSignature(Schema([spec(t) for t in model.inputs]), Schema([spec(t) for t in model.outputs]))


def pins(libraries: dict[str, str], names: tuple[str, ...]) -> list[str]:
    """Exact pins, so the logged model loads the same in a fresh environment.

    Given explicitly because MLflow's inference of requirements spawns a Python process per logged model (~3 s).
    """
    return [f"{lib}=={libraries[lib]}" for lib in names if lib in libraries]


def serving_requirements(libraries: dict[str, str]) -> list[str]:
    return pins(libraries, ORT_LIBRARIES)


def _log_onnx(cand: CandidateResult, common: dict[str, Any]) -> Any:
    import mlflow
    import onnx
    from mlflow.models import Model

    assert cand.artifact is not None
    return Model.log(
        flavor=mlflow.onnx,
        onnx_model=onnx.load(str(cand.artifact)),
        pip_requirements=pins(cand.hardware.libraries, ORT_LIBRARIES),
        onnx_execution_providers=["CPUExecutionProvider"],
        **common,
    )


def openvino_model_config(recipe: Recipe) -> dict[str, Any]:
    """What ``openvino_model.py`` compiles with and checks at load: the inference precision the candidate was
    measured with, and (for BF16/FP16) what the host must offer, spelled out because quantgate is not there."""
    precision = str(recipe.options.get("inference_precision") or "f32")  # f32: recorded before it was a setting
    config: dict[str, Any] = {"inference_precision": precision}
    if recipe.options.get("static_shapes"):
        config["static_shapes"] = True
    need = compute_need(precision)
    if need is not None:
        config.update(
            needs_capability=need.capability,
            needs_isa_any=list(need.isa_any),
            needs_cpu=need.cpu,
            lacking=need.lacking(),
        )
    return config


def _log_openvino(cand: CandidateResult, common: dict[str, Any]) -> Any:
    import mlflow
    from mlflow.models import Model

    assert cand.artifact is not None
    xml = cand.artifact
    return Model.log(
        flavor=mlflow.pyfunc,
        python_model=str(HERE / "openvino_model.py"),
        artifacts={"model_xml": str(xml), "model_bin": str(xml.with_suffix(".bin"))},
        model_config=openvino_model_config(cand.recipe),
        pip_requirements=pins(cand.hardware.libraries, OPENVINO_LIBRARIES),
        **common,
    )


def _log_tensorrt(cand: CandidateResult, common: dict[str, Any]) -> Any:
    import json

    import mlflow
    from mlflow.models import Model

    assert cand.artifact is not None
    engine = cand.artifact
    sidecar = engine.with_name(engine.name + ".json")
    meta = json.loads(sidecar.read_text())
    libs = cand.hardware.libraries
    reqs = [*pins(libs, ("mlflow", "numpy")), f"tensorrt=={meta.get('tensorrt', '')}"]
    if "quantgate" in libs:
        reqs.append(f"quantgate[tensorrt]=={libs['quantgate']}")
    return Model.log(
        flavor=mlflow.pyfunc,
        python_model=str(HERE / "tensorrt_model.py"),
        artifacts={"engine": str(engine), "engine_meta": str(sidecar)},
        pip_requirements=reqs,
        **common,
    )


LOGGERS: dict[str, Callable[[CandidateResult, dict[str, Any]], Any]] = {
    "onnxruntime": _log_onnx,
    "openvino": _log_openvino,
    "tensorrt": _log_tensorrt,
}


def log_candidate_model(client: Any, exp_id: str, run_id: str, cand: CandidateResult, model: ModelInfo) -> str:
    """Log ``cand``'s artifact as an MLflow model of its run; returns the ``models:/m-...`` URI."""
    if cand.backend not in LOGGERS:
        raise BackendError(f"backend '{cand.backend}' has no MLflow serving format; it cannot be registered")
    # Explicit experiment and run ids: the fluent API would use whatever experiment is active in this process,
    # which is the caller's, not ours.
    logged = client.create_logged_model(experiment_id=exp_id, name="model", source_run_id=run_id)
    common = {
        "artifact_path": None,
        "name": "model",
        "run_id": run_id,
        "model_id": logged.model_id,
        "signature": signature(model),
    }
    info = LOGGERS[cand.backend](cand, common)
    return str(info.model_uri)
