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
        f"this model is a TensorRT engine built for an NVIDIA {meta.get('gpu', '?')} (compute capability "
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
        candidate = Candidate(Recipe.make("tensorrt", str(meta.get("recipe")), str(meta.get("precision"))), engine)
        try:
            self._runner = TensorRtBackend().runner(candidate, threads=1)
        except QuantgateError as exc:
            raise RuntimeError(f"{_needs(meta)}; it cannot run here: {exc}") from None
        self._inputs: list[str] = list(meta.get("inputs", []))
        self._outputs: list[str] = list(meta.get("outputs", []))

    # No type hints on predict: MLflow would read them as an input schema and warn.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
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
