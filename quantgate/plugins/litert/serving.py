"""The pyfunc model a registered LiteRT version is (MLflow models-from-code): the ``.tflite`` on the interpreter.

MLflow copies this file into the logged model and runs it where the model is loaded, so it needs only
``ai-edge-litert`` and ``numpy`` there, not quantgate. Input: the signature's tensor (a dict by name, or the array
of a single-input model); a full-integer model's INT8 inputs and outputs are quantized and dequantized here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel


class LiteRtModel(PythonModel):  # type: ignore[misc]
    def load_context(self, context: Any) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._it = Interpreter(model_path=context.artifacts["tflite"], num_threads=1)
        self._it.allocate_tensors()
        self._inputs = sorted(self._it.get_input_details(), key=lambda d: d["index"])
        self._output = sorted(self._it.get_output_details(), key=lambda d: d["index"])[0]

    def _one(self, arrays: list[np.ndarray]) -> np.ndarray:
        for detail, value in zip(self._inputs, arrays, strict=True):
            scale, zero = detail["quantization"]
            if np.issubdtype(detail["dtype"], np.integer) and scale:
                info = np.iinfo(detail["dtype"])
                value = np.clip(np.round(value / scale) + zero, info.min, info.max)
            self._it.set_tensor(detail["index"], np.asarray(value, dtype=detail["dtype"]))
        self._it.invoke()
        out = self._it.get_tensor(self._output["index"])
        scale, zero = self._output["quantization"]
        result: np.ndarray = np.array(out, dtype=np.float32)
        if np.issubdtype(out.dtype, np.integer) and scale:
            result = (result - zero) * np.float32(scale)
        return result

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        if isinstance(model_input, dict):
            arrays = [np.asarray(v, dtype=np.float32) for v in model_input.values()]
        else:
            arrays = [np.asarray(model_input, dtype=np.float32)]
        # The .tflite has a fixed batch of 1 (as converted for a device); a larger batch runs sample by sample.
        return np.concatenate([self._one([a[i : i + 1] for a in arrays]) for i in range(arrays[0].shape[0])])


set_model(LiteRtModel())
