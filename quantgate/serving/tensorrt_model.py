"""MLflow pyfunc model (models-from-code) that serves a TensorRT engine logged by quantgate.

A serialized engine only runs on the GPU architecture and TensorRT version it was built with; the sidecar JSON next
to it names both. Loading anywhere else fails at load time with a message naming what the engine needs, not with
a CUDA error at the first request. The engine is run by quantgate's TensorRT runner, so the serving worker needs
``quantgate[tensorrt]`` (the GPU worker image has it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc.model import PythonModel


def _needs(meta: dict[str, Any]) -> str:
    return (
        f"this model is a TensorRT engine built on an {meta.get('gpu', '?')} (compute capability "
        f"{meta.get('compute_capability', '?')}) with TensorRT {meta.get('tensorrt', '?')}"
    )


class TensorRtEngineModel(PythonModel):  # type: ignore[misc]
    def load_context(self, context: Any) -> None:
        engine = Path(context.artifacts["engine"])
        meta = json.loads(Path(context.artifacts["engine_meta"]).read_text())
        try:
            from quantgate.errors import QuantgateError
            from quantgate.plugins.base import Candidate, Recipe
            from quantgate.plugins.tensorrt import TensorRtBackend
        except ImportError as exc:
            raise RuntimeError(
                f"{_needs(meta)}; load it on such a GPU worker with quantgate[tensorrt] installed ({exc})"
            ) from None
        backend = TensorRtBackend()
        status = backend.available()
        if not status.ok:
            hint = f" ({status.hint})" if status.hint else ""
            raise RuntimeError(f"{_needs(meta)}; this host cannot run it: {status.reason}{hint}")
        candidate = Candidate(Recipe.make("tensorrt", str(meta.get("recipe")), str(meta.get("precision"))), engine)
        try:
            self._runner = backend.runner(candidate, threads=1)
        except QuantgateError as exc:  # e.g. another GPU architecture or TensorRT version: rebuild, never load
            raise RuntimeError(f"{_needs(meta)}; it cannot run here: {exc}") from None
        self._inputs: list[str] = list(meta.get("inputs", []))
        self._outputs: list[str] = list(meta.get("outputs", []))

    # np.ndarray is the one hint MLflow neither validates against nor warns about (no hint or Any warns); a dict
    # of arrays arrives here too, already checked against the logged signature.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        if isinstance(model_input, dict):
            feeds = {name: np.asarray(model_input[name]) for name in self._inputs}
        else:
            if len(self._inputs) != 1:
                raise ValueError(f"this model has {len(self._inputs)} inputs; pass a dict keyed by {self._inputs}")
            feeds = {self._inputs[0]: np.asarray(model_input)}
        arrays = self._runner.run(feeds)
        names = self._outputs or [f"output_{i}" for i in range(len(arrays))]
        return dict(zip(names, arrays, strict=True))


mlflow.models.set_model(TensorRtEngineModel())
