"""LiteRT (formerly TensorFlow Lite) backend for phones and edge devices, built only on the public plugin API.

Pytorch flavor only: the version's own torch.export program (``quantgate.intake.torch_source``) is converted by
litert-torch, at batch 1 (what an edge device runs). There is no ONNX path here: the ONNX -> TFLite converters
(onnx2tf) pull TensorFlow, which this project does not install. Recipes:

- ``fp16``: FP16 weights (ai-edge-quantizer's float casting of the FP32 ``.tflite``), float compute.
- ``int8-dynamic``: dynamic-range INT8 (PT2E dynamic quantizer): INT8 weights, activations quantized per call.
- ``int8-full``: full-integer INT8 (PT2E static quantizer, per-channel weights) calibrated on the calibration set;
  inputs and outputs are INT8 too, and the runner (and the served model) quantize and dequantize them.

The FP32 baseline is the FP32 ``.tflite`` on the same interpreter. Runners use the LiteRT interpreter with its
default XNNPACK delegate and a fixed thread count. Registered versions are pyfunc models carrying the ``.tflite``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.errors import BackendError
from quantgate.model import ModelInfo
from quantgate.plugins.base import (
    PLUGIN_API_VERSION,
    Availability,
    Calibration,
    Candidate,
    ModelLogging,
    Recipe,
    first_line,
)

log = logging.getLogger(__name__)

NAME = "litert"
INSTALL_HINT = "pip install quantgate[litert]"
HERE = Path(__file__).parent
RECIPES = (
    Recipe.make(NAME, "fp16", "fp16", kind="float"),
    Recipe.make(NAME, "int8-dynamic", "int8-dynamic", kind="dynamic"),
    Recipe.make(NAME, "int8-full", "int8", kind="static"),
)
CALIBRATION_SAMPLES = 128  # PT2E observers converge well before this on CNNs; each sample is one batch-1 call


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    return {n: metadata.version(n) for n in ("ai-edge-litert", "mlflow", "numpy")}


class LiteRtRunner:
    """The LiteRT interpreter at a fixed thread count; a full-integer model's INT8 inputs and outputs are quantized
    and dequantized here, so validators see float tensors as from any other runner.

    The ``.tflite`` has a fixed batch of 1, so a larger batch is run sample by sample (the interpreter could be
    resized, but a converted reshape keeps its batch-1 shape, so resizing is not safe for every graph).
    """

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._it = Interpreter(model_path=str(path), num_threads=threads)
            self._it.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with the flatbuffer's complaint
            raise BackendError(f"LiteRT cannot load {path.name}: {first_line(exc)}") from exc
        self._inputs = sorted(self._it.get_input_details(), key=lambda d: d["index"])
        self._outputs = sorted(self._it.get_output_details(), key=lambda d: d["index"])

    def _one(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for detail, value in zip(self._inputs, arrays, strict=True):
            self._it.set_tensor(detail["index"], _to_tensor(value, detail))
        self._it.invoke()
        return [_from_tensor(self._it.get_tensor(d["index"]), d) for d in self._outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = list(inputs.values())  # quantgate passes the model's inputs in graph order, as converted
        n = arrays[0].shape[0]
        if n == 1:
            return self._one(arrays)
        rows = [self._one([a[i : i + 1] for a in arrays]) for i in range(n)]
        return [np.concatenate([r[k] for r in rows]) for k in range(len(self._outputs))]


def _to_tensor(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        quantized: np.ndarray = np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)
        return quantized
    converted: np.ndarray = np.asarray(value, dtype=dtype)
    return converted


def _from_tensor(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    out: np.ndarray = np.array(value)  # a copy: the interpreter reuses its output buffer on the next call
    if np.issubdtype(value.dtype, np.integer) and scale:
        out = ((out.astype(np.float32) - zero) * scale).astype(np.float32)
    return out


class LiteRtBackend:
    name = NAME
    plugin_api = PLUGIN_API_VERSION

    def available(self) -> Availability:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
            import litert_torch  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"ai-edge-litert/litert-torch are not importable: {exc}", INSTALL_HINT)
        return Availability(True)

    def recipes(self, model: ModelInfo) -> list[Recipe]:
        return list(RECIPES)

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate:
        out = workdir / "fp32.tflite"
        if not out.exists():
            module, example = _torch_program(model)
            _convert(module, example, out, quant_config=None)
        return Candidate(Recipe.make(NAME, "fp32", "fp32"), out, files=(out,))

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / f"{recipe.name}.tflite"
        if recipe.name == "fp16":
            _fp16(self.baseline(model, workdir.parent / "fp32"), out)
            return Candidate(recipe, out, files=(out,), notes=("FP16 weights, float compute",))
        module, example = _torch_program(model)
        if recipe.name == "int8-dynamic":
            quantized, config = _pt2e(module, example, dynamic=True, samples=[])
            note = "dynamic-range INT8: INT8 weights, activations quantized per call"
        elif recipe.name == "int8-full":
            samples = _calibration_samples(model, calib)
            quantized, config = _pt2e(module, example, dynamic=False, samples=samples)
            note = f"full-integer INT8, per-channel weights, calibrated on {len(samples)} samples; INT8 inputs/outputs"
        else:
            raise BackendError(f"litert has no recipe '{recipe.name}'")
        _convert(quantized, example, out, quant_config=config)
        return Candidate(recipe, out, files=(out,), notes=(note,))

    def runner(self, candidate: Candidate, *, threads: int) -> LiteRtRunner:
        return LiteRtRunner(candidate.artifact, threads)

    def log_model(self, request: ModelLogging) -> str:
        """A pyfunc model from code (``serving.py`` beside this module) carrying the ``.tflite``."""
        import mlflow
        from mlflow.models import Model

        libs = {**_library_versions(), **request.libraries}
        reqs = [f"{n}=={libs[n]}" for n in ("mlflow", "numpy", "ai-edge-litert") if n in libs]
        info = Model.log(
            flavor=mlflow.pyfunc,
            python_model=str(HERE / "serving.py"),
            artifacts={"tflite": str(request.artifact)},
            pip_requirements=reqs,
            **request.mlflow_args,
        )
        return str(info.model_uri)


def _torch_program(model: ModelInfo) -> tuple[Any, tuple[Any, ...]]:
    """The version's torch program and a batch-1 example input."""
    if model.flavor != "pytorch" or model.source_dir is None:
        raise BackendError(
            f"litert converts pytorch models only (this one is {model.flavor or 'not pytorch'}): the ONNX -> LiteRT "
            "converters need TensorFlow, which is not installed"
        )
    from quantgate.errors import InputError
    from quantgate.intake import torch_source

    try:
        source = torch_source(model.source_dir)
    except InputError as exc:
        raise BackendError(str(exc)) from None
    return source.module, source.example_inputs(batch=1)


@contextlib.contextmanager
def _no_progress() -> Iterator[None]:
    """litert-torch draws its progress on stdout, where ``quantgate compress --json`` writes its one document."""
    import litert_torch

    before = litert_torch.config.show_progress
    litert_torch.config.show_progress = False
    try:
        yield
    finally:
        litert_torch.config.show_progress = before


def _convert(module: Any, example: tuple[Any, ...], out: Path, quant_config: Any) -> None:
    import litert_torch

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _no_progress():
            edge = litert_torch.convert(module, example, quant_config=quant_config)
            edge.export(str(out))
    except Exception as exc:  # the converter raises from torch.export, MLIR lowering or the flatbuffer writer
        raise BackendError(f"litert-torch could not convert the model: {first_line(exc)}") from exc


def _pt2e(module: Any, example: tuple[Any, ...], *, dynamic: bool, samples: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    try:
        graph = torch.export.export(module, example).module()
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for args in samples or [example]:  # per-channel observers need one call even for dynamic
                prepared(*args)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    except Exception as exc:  # torch.export and the quantizer raise many types
        raise BackendError(f"PT2E quantization failed: {first_line(exc)}") from exc
    return converted, QuantConfig(pt2e_quantizer=quantizer)


def _calibration_samples(model: ModelInfo, calib: Calibration) -> list[tuple[Any, ...]]:
    import torch

    limit = min(calib.limit or CALIBRATION_SAMPLES, CALIBRATION_SAMPLES)
    samples: list[tuple[Any, ...]] = []
    for batch in calib.dataset.batches(calib.batch_size, limit=limit):
        arrays = [batch.inputs[name] for name in model.input_names]
        for i in range(arrays[0].shape[0]):
            samples.append(tuple(torch.from_numpy(np.ascontiguousarray(a[i : i + 1])) for a in arrays))
    if not samples:
        raise BackendError("full-integer INT8 needs calibration samples; the calibration set is empty")
    return samples


def _fp16(fp32: Candidate, out: Path) -> None:
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    try:
        qt = quantizer.Quantizer(str(fp32.artifact))
        qt.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
        out.write_bytes(bytes(qt.quantize().quantized_model))
    except Exception as exc:  # the quantizer raises ValueError/KeyError on ops it cannot cast
        raise BackendError(f"ai-edge-quantizer could not cast the weights to FP16: {first_line(exc)}") from exc
