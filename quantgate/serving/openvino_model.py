"""MLflow pyfunc model (models-from-code) that serves an OpenVINO IR logged by quantgate.

This file is copied into every logged OpenVINO model and runs wherever the model is loaded, so it imports only
mlflow, numpy and openvino: quantgate need not be installed where the model is served.
Inputs and outputs match the ``onnx`` flavor's pyfunc: a dict of arrays by input name (or one array for a
single-input model, or a DataFrame) in, a dict of arrays by output name out.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc.model import PythonModel


class OpenVinoIRModel(PythonModel):  # type: ignore[misc]
    def load_context(self, context: Any) -> None:
        import openvino as ov
        import openvino.properties.hint as hints

        config = dict(context.model_config or {})
        compile_config: dict[Any, Any] = {hints.performance_mode(): hints.PerformanceMode.LATENCY}
        if config.get("inference_precision", "f32") == "f32":
            # Without this the CPU plugin may compute in BF16 on CPUs that have it, unlike what quantgate measured.
            compile_config[hints.inference_precision()] = ov.Type.f32
        compiled = ov.Core().compile_model(context.artifacts["model_xml"], "CPU", compile_config)
        self._compiled = compiled
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        self._input_types = [port.get_element_type().to_dtype() for port in compiled.inputs]
        self._outputs = [port.get_any_name() for port in compiled.outputs]

    # np.ndarray is the one hint MLflow neither validates against nor warns about (no hint or Any warns); a dict
    # of arrays arrives here too, already checked against the logged signature.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        feeds = self._feeds(model_input)
        # A new infer request per call: the pyfunc may be called from several server threads at once.
        result = self._compiled.create_infer_request().infer(feeds)
        arrays = [np.asarray(v) for v in result.to_tuple()]
        outputs = dict(zip(self._outputs, arrays, strict=True))
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - mlflow depends on pandas
            return outputs
        if isinstance(model_input, pd.DataFrame):
            return pd.DataFrame({name: list(value) for name, value in outputs.items()})
        return outputs

    def _feeds(self, model_input: Any) -> dict[str, np.ndarray]:
        if isinstance(model_input, dict):
            missing = [name for name in self._inputs if name not in model_input]
            if missing:
                raise ValueError(f"missing model input(s): {', '.join(missing)}; expected {', '.join(self._inputs)}")
            return {
                name: np.asarray(model_input[name], dtype=dtype)
                for name, dtype in zip(self._inputs, self._input_types, strict=True)
            }
        if hasattr(model_input, "to_numpy"):  # a DataFrame: one input, one row per sample
            model_input = model_input.to_numpy()
        if len(self._inputs) != 1:
            raise ValueError(f"this model has {len(self._inputs)} inputs; pass a dict keyed by {self._inputs}")
        return {self._inputs[0]: np.asarray(model_input, dtype=self._input_types[0])}


mlflow.models.set_model(OpenVinoIRModel())
