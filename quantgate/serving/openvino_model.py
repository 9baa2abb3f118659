"""MLflow pyfunc model (models-from-code) that serves an OpenVINO IR logged by quantgate.

This file is copied into every logged OpenVINO model and runs wherever the model is loaded, so it imports only
mlflow, numpy and openvino: quantgate need not be installed where the model is served.
Inputs and outputs match the ``onnx`` flavor's pyfunc: a dict of arrays by input name (or one array for a
single-input model, or a DataFrame) in, a dict of arrays by output name out.

A model measured with static shapes (``model_config``'s ``static_shapes``) is reshaped to each request's input
shapes and compiled once per shape, as the candidate was timed.

The model compiles with the inference precision the candidate was measured with (``model_config``'s
``inference_precision``: f32, bf16 or f16), never OpenVINO's host-dependent default. A BF16/FP16 model is refused
at load, in one line, on a host whose OpenVINO CPU plugin does not offer that compute: OpenVINO itself would run it
in another precision without a word, which is not what passed the gate.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.model import PythonModel

_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
_SHAPES_KEPT = 4  # compiled models a static-shape model keeps, one per input shape


def cpu_capabilities() -> tuple[frozenset[str], frozenset[str]]:
    """What this host offers: OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` ("BF16", "FP16"...: the plugin computes in
    a reduced precision only where it lists it, so this decides) and the CPU's flags (only for the message)."""
    import openvino as ov

    capabilities = frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:  # not Linux: the capability list alone decides
        pass
    return capabilities, frozenset(flags)


def refusal(precision: str, config: dict[str, Any]) -> str | None:
    """Why this host cannot run a model measured with ``precision`` compute; None when it can."""
    if precision == "f32":
        return None
    capability = str(config.get("needs_capability") or _CAPABILITY.get(precision, precision.upper()))
    capabilities, flags = cpu_capabilities()
    if capability in capabilities:
        return None
    needs = str(config.get("needs_cpu") or f"a CPU on which OpenVINO offers {capability}")
    present = [str(f) for f in config.get("needs_isa_any") or () if str(f) in flags]
    if present:
        has = f"this CPU has {', '.join(present)}, but OpenVINO {_ov_version()} does not offer {capability} here"
    else:
        has = str(config.get("lacking") or f"OpenVINO {_ov_version()} does not offer {capability} here")
    return f"this model was measured with {capability} compute and needs {needs}; {has}"


def _ov_version() -> str:
    import openvino as ov

    return str(ov.__version__).split("-")[0]  # "2026.4.1", not the build string after it


class OpenVinoIRModel(PythonModel):  # type: ignore[misc]
    inference_precision: str  # what OpenVINO computes in, read back after compiling: "f32", "bf16" or "f16"

    def load_context(self, context: Any) -> None:
        import openvino as ov
        import openvino.properties.hint as hints

        config = dict(context.model_config or {})
        precision = str(config.get("inference_precision", "f32"))
        if precision not in _CAPABILITY:
            raise MlflowException(f"unknown inference_precision {precision!r} in the model config")
        why = refusal(precision, config)
        if why is not None:
            raise MlflowException(why)
        compile_config: dict[Any, Any] = {
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            # Explicit always: the CPU plugin's default depends on the host (BF16 where the CPU has it).
            hints.inference_precision(): getattr(ov.Type, precision),
        }
        compiled = ov.Core().compile_model(context.artifacts["model_xml"], "CPU", compile_config)
        in_effect = str(compiled.get_property(hints.inference_precision()).get_type_name())
        if in_effect != precision:
            raise MlflowException(
                f"this model was measured with {_CAPABILITY[precision]} compute, but OpenVINO {_ov_version()} "
                f"compiled it with inference precision {in_effect} on this host"
            )
        self.inference_precision = in_effect
        self._compiled = compiled
        self._compile_config = compile_config
        # Static shapes (measured that way): the IR reshaped to each request's input shapes and compiled once per
        # shape, the last few kept; a new shape pays one compile on its first request.
        self._static = bool(config.get("static_shapes"))
        self._model = ov.Core().read_model(context.artifacts["model_xml"]) if self._static else None
        self._by_shape: dict[tuple[tuple[int, ...], ...], Any] = {}
        self._lock = threading.Lock()
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        self._input_types = [port.get_element_type().to_dtype() for port in compiled.inputs]
        self._outputs = [port.get_any_name() for port in compiled.outputs]

    # np.ndarray is the one hint MLflow neither validates against nor warns about (no hint or Any warns); a dict
    # of arrays arrives here too, already checked against the logged signature.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        feeds = self._feeds(model_input)
        compiled = self._for_shapes(feeds) if self._static else self._compiled
        # A new infer request per call: the pyfunc may be called from several server threads at once.
        result = compiled.create_infer_request().infer(feeds)
        arrays = [np.asarray(v) for v in result.to_tuple()]
        outputs = dict(zip(self._outputs, arrays, strict=True))
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - mlflow depends on pandas
            return outputs
        if isinstance(model_input, pd.DataFrame):
            return pd.DataFrame({name: list(value) for name, value in outputs.items()})
        return outputs

    def _for_shapes(self, feeds: dict[str, np.ndarray]) -> Any:
        import openvino as ov

        shape = tuple(tuple(int(d) for d in feeds[name].shape) for name in self._inputs)
        with self._lock:
            compiled = self._by_shape.get(shape)
            if compiled is None:
                assert self._model is not None  # read at load when static_shapes is set
                model = self._model.clone()
                model.reshape({n: ov.PartialShape(list(d)) for n, d in zip(self._inputs, shape, strict=True)})
                compiled = ov.Core().compile_model(model, "CPU", self._compile_config)
                if len(self._by_shape) >= _SHAPES_KEPT:
                    self._by_shape.pop(next(iter(self._by_shape)))
                self._by_shape[shape] = compiled
            return compiled

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
