"""Logging a candidate as an MLflow model of its run, through its backend's ``log_model``.

Each backend decides its MLflow format (``Backend.log_model``): ONNX Runtime uses MLflow's ``onnx`` flavor; OpenVINO
IRs and TensorRT engines have no MLflow flavor, so they are logged as pyfunc models from code, a small script here
(``openvino_model.py``, ``tensorrt_model.py``) that MLflow copies into the model and runs at load time. Either way
``mlflow.pyfunc.load_model(uri)`` predicts with the source model's signature, and ``mlflow models serve`` answers
REST requests. ``signature`` and ``pins`` are the helpers a plugin's ``log_model`` may use.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantgate.errors import BackendError, InfrastructureError, raise_if_infrastructure
from quantgate.model import ModelInfo
from quantgate.plugins.base import ModelLogging, first_line, load_backend
from quantgate.result import CandidateResult

HERE = Path(__file__).parent


def signature(model: ModelInfo) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(t: Any) -> Any:
        return TensorSpec(t.dtype, tuple(-1 if d is None else d for d in t.shape), t.name)

    return ModelSignature(Schema([spec(t) for t in model.inputs]), Schema([spec(t) for t in model.outputs]))


def pins(libraries: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    """Exact pins, so the logged model loads the same in a fresh environment.

    Given explicitly because MLflow's inference of requirements spawns a Python process per logged model (~3 s).
    """
    return [f"{lib}=={libraries[lib]}" for lib in names if lib in libraries]


def log_candidate_model(client: Any, exp_id: str, run_id: str, cand: CandidateResult, model: ModelInfo) -> str:
    """Log ``cand``'s artifact as an MLflow model of its run; returns the ``models:/m-...`` URI.

    A backend that cannot log its candidate raises ``BackendError`` (that candidate is not registered, the run goes
    on); MLflow's own failures propagate, so the register step is retried as for any other MLflow error.
    """
    from mlflow.exceptions import MlflowException

    assert cand.artifact is not None
    backend = load_backend(cand.backend)
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
    request = ModelLogging(cand.artifact, cand.recipe, dict(cand.hardware.libraries), common)
    try:
        return backend.log_model(request)
    except (MlflowException, InfrastructureError):
        raise
    except Exception as exc:  # a plugin's logger may fail any way; it costs that candidate, not the run
        raise_if_infrastructure(exc, f"logging {cand.backend}/{cand.recipe.name} as an MLflow model")
        raise BackendError(
            f"backend '{cand.backend}' could not log {cand.recipe.name} as an MLflow model: {first_line(exc)}"
        ) from exc
