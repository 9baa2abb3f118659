"""ONNX Runtime backend: static INT8 (QDQ), dynamic INT8 and FP16 recipes, run on the CPU provider."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from quantgate.errors import BackendError
from quantgate.model import ModelInfo
from quantgate.plugins.base import (
    Availability,
    Calibration,
    Candidate,
    Recipe,
    Runner,
    SettingValue,
    first_line,
    model_files,
)

log = logging.getLogger(__name__)

NAME = "onnxruntime"
_CALIBRATIONS = ("minmax", "entropy", "percentile")


def _static_recipes() -> list[Recipe]:
    out = []
    for method in _CALIBRATIONS:
        for per_channel in (True, False):
            name = f"int8-static-qdq-{method}" + ("-perchannel" if per_channel else "")
            out.append(
                Recipe.make(
                    NAME,
                    name,
                    "int8",
                    kind="static",
                    format="qdq",
                    calibration=method,
                    per_channel=per_channel,
                    activation_type="uint8",
                    weight_type="int8",
                    percentile=99.999 if method == "percentile" else None,
                )
            )
    return out


RECIPES: tuple[Recipe, ...] = (
    *_static_recipes(),
    Recipe.make(NAME, "int8-dynamic", "int8", kind="dynamic", per_channel=False, weight_type="int8"),
    Recipe.make(NAME, "int8-dynamic-perchannel", "int8", kind="dynamic", per_channel=True, weight_type="int8"),
    Recipe.make(NAME, "fp16", "fp16", kind="fp16", keep_io_types=True),
)


class OrtRunner:
    """An InferenceSession with a fixed thread count, so baseline and candidate compete fairly."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime cannot load {path.name}: {first_line(exc)}") from exc

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(None, dict(inputs)))


class OnnxRuntimeBackend:
    name = NAME

    def available(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"onnxruntime is not importable: {exc}", "pip install onnxruntime")
        return Availability(True)

    def recipes(self, model: ModelInfo) -> list[Recipe]:
        return list(RECIPES)

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate:
        return Candidate(Recipe.make(NAME, "fp32", "fp32"), model.path, files=model_files(model.path))

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / f"{recipe.name}.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibrators print() progress
                notes = self._build(model.path, out, workdir.parent, recipe.options, calib)
        except Exception as exc:  # quantization raises anything from ValueError to ORT's Fail
            raise BackendError(f"{recipe.name} failed: {first_line(exc)}") from exc
        return Candidate(recipe, out, notes=notes, files=model_files(out))

    def _build(
        self, src: Path, out: Path, shared: Path, opts: dict[str, SettingValue], calib: Calibration
    ) -> tuple[str, ...]:
        if opts["kind"] == "fp16":
            self._fp16(src, out)
            return ()
        prepared, notes = preprocess(src, shared)
        if opts["kind"] == "static":
            self._static(prepared, out, opts, calib)
        else:
            self._dynamic(prepared, out, opts)
        return notes

    def runner(self, candidate: Candidate, *, threads: int) -> Runner:
        return OrtRunner(candidate.artifact, threads)

    # -- recipe implementations -------------------------------------------------------------

    def _static(self, src: Path, out: Path, opts: dict[str, SettingValue], calib: Calibration) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from quantgate.plugins._ort_calibration import StreamingCalibrationReader, streaming_extra_options

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[str(opts["calibration"])]
        extra: dict[str, object] = dict(streaming_extra_options())
        if opts.get("percentile") is not None:
            extra["CalibPercentile"] = opts["percentile"]
        reader = StreamingCalibrationReader(
            calib.dataset, batch_size=calib.batch_size, batches_per_chunk=4, limit=calib.limit
        )
        quantize_static(
            str(src),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=bool(opts["per_channel"]),
            activation_type=QuantType.QUInt8 if opts["activation_type"] == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8 if opts["weight_type"] == "int8" else QuantType.QUInt8,
            calibrate_method=method,
            extra_options=extra,
        )

    def _dynamic(self, src: Path, out: Path, opts: dict[str, SettingValue]) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(out), per_channel=bool(opts["per_channel"]), weight_type=QuantType.QInt8)

    def _fp16(self, src: Path, out: Path) -> None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(src))
        converted = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(converted, str(out))


# On a failed symbolic shape inference, onnxruntime saves the half-inferred model, with external data under a
# random name, into the current working directory: the user's repository, typically.
_ORT_DEBUG_DUMP = Path("sym_shape_infer_temp.onnx")


def preprocess(src: Path, workdir: Path) -> tuple[Path, tuple[str, ...]]:
    """Shape inference + graph optimisation once per model (cached in ``workdir``); symbolic inference may fail on
    transformers, then it runs without it, then the model is used as given. Returns the model to quantize and notes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "preprocessed.onnx"
    marker = workdir / "preprocessed.note"
    if out.exists():
        return out, tuple(marker.read_text().splitlines()) if marker.exists() else ()
    dump_existed = _ORT_DEBUG_DUMP.exists()
    try:
        quant_pre_process(str(src), str(out))
        notes: tuple[str, ...] = ()
    except Exception as exc:  # "Incomplete symbolic shape inference" on transformer exports
        if not dump_existed:
            _remove_ort_debug_dump()
        log.info("symbolic shape inference failed (%s); retrying without it", first_line(exc))
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            notes = ("pre-processing ran without symbolic shape inference (it failed on this graph)",)
        except Exception as exc2:
            log.info("pre-processing failed (%s); quantizing the model as given", first_line(exc2))
            return src, ("pre-processing skipped: " + first_line(exc2),)
    marker.write_text("\n".join(notes))
    return out, notes


def _remove_ort_debug_dump() -> None:
    if not _ORT_DEBUG_DUMP.exists():
        return
    for extra in model_files(_ORT_DEBUG_DUMP)[1:]:
        extra.unlink(missing_ok=True)
    _ORT_DEBUG_DUMP.unlink(missing_ok=True)
