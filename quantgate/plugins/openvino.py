"""OpenVINO backend: FP32/FP16 IR, NNCF post-training INT8 (full and weights-only) and accuracy-controlled INT8, on CPU.

``openvino`` and ``nncf`` are imported inside methods only, so this module imports (and reports itself unavailable)
without them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendError, DataError
from quantgate.hardware import detect
from quantgate.model import ModelInfo
from quantgate.plugins.base import Availability, Calibration, Candidate, Recipe, Runner, SettingValue
from quantgate.validators.fidelity import cosine_per_row

log = logging.getLogger(__name__)

NAME = "openvino"
INSTALL_HINT = "pip install quantgate[openvino]"
ACCURACY_CONTROL = "int8-accuracy-control"
Metric = Literal["accuracy", "fidelity"]

_NO_DOT_PRODUCT_NOTE = (
    "this CPU has no VNNI/AMX INT8 dot-product instructions: INT8 kernels may be slower than FP32 here"
)


class OvRunner:
    """One compiled IR and one reused infer request: inputs by name in, outputs in graph order out."""

    def __init__(self, xml: Path, threads: int) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        config: dict[str, Any] = {
            props.inference_num_threads(): threads,
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            props.num_streams(): 1,
            # The CPU plugin computes in BF16 by default on CPUs with AVX512-BF16/AMX: pin FP32 so the baseline is a
            # true FP32 reference and a candidate's precision is what its IR says.
            hints.inference_precision(): ov.Type.f32,
        }
        try:
            compiled = ov.Core().compile_model(str(xml), "CPU", config)
        except Exception as exc:  # openvino raises RuntimeError and its own pybind11 types
            raise BackendError(f"openvino cannot load {xml.name}: {_ov_reason(exc)}") from exc
        self._request = compiled.create_infer_request()

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # Zero-copy in and out, then one copy of the outputs (the next call reuses the request's buffers): at batch 1
        # the default copies cost ~20% of a small model's latency, which would be charged to OpenVINO, not the model.
        result = self._request.infer(dict(inputs), share_inputs=True, share_outputs=True)
        return [np.array(v, copy=True) for v in result.to_tuple()]


@dataclass(frozen=True)
class AccuracyControl:
    """What ``int8-accuracy-control`` validates against; set through ``configure_accuracy_control``."""

    validation: NpzDataset
    metric: Metric
    max_drop: float
    time_budget_s: float
    limit: int | None = None
    caveat: str = ""  # said in the candidate's notes, e.g. when it tunes on the gate's own samples


class OpenVinoBackend:
    """IR files (.xml + .bin) compiled on OpenVINO's CPU plugin; ``int8-accuracy-control`` needs
    :meth:`configure_accuracy_control` on the same instance before :meth:`compress`."""

    name = NAME

    def __init__(self) -> None:
        self._accuracy: AccuracyControl | None = None

    def available(self) -> Availability:
        try:
            import nncf  # noqa: F401
            import openvino  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"openvino/nncf are not importable: {exc}", INSTALL_HINT)
        return Availability(True)

    def configure_accuracy_control(
        self,
        validation: NpzDataset,
        metric: Metric,
        max_drop: float,
        time_budget_s: float,
        *,
        limit: int | None = None,
        caveat: str = "",
    ) -> None:
        """Give ``int8-accuracy-control`` its validation set, metric, allowed drop and wall-clock budget.

        ``metric="accuracy"``: top-1 of the first output against ``labels``; ``max_drop`` is absolute (0.01 = 1 point).
        ``metric="fidelity"``: mean cosine similarity of the first output to the FP32 model's; the FP32 model scores
        1.0, so ``max_drop = 1 - min_fidelity``. ``limit`` caps the validation samples used; ``caveat`` is added to
        the candidate's notes.
        """
        if metric not in ("accuracy", "fidelity"):
            raise ValueError(f"metric must be 'accuracy' or 'fidelity', got {metric!r}")
        if max_drop < 0 or time_budget_s <= 0:
            raise ValueError(f"need max_drop >= 0 and time_budget_s > 0, got {max_drop} and {time_budget_s}")
        if metric == "accuracy" and not validation.has_labels:
            raise DataError(
                f"{validation.path.name} has no 'labels' array: accuracy control by top-1 needs labels; "
                "use metric 'fidelity' instead"
            )
        self._accuracy = AccuracyControl(validation, metric, max_drop, time_budget_s, limit, caveat)

    def recipes(self, model: ModelInfo) -> list[Recipe]:
        """The same recipe names for every model, so a policy's recipe list never depends on the graph.

        ``int8-weights`` is offered for CNNs too: nncf's INT8 weight compression covers Convolution as well as
        MatMul/Gemm/embeddings. It pays off on large linear layers (transformers); elsewhere the gate rejects it.
        Transformer graphs get ``model_type="transformer"`` (and nncf's MIXED default preset for accuracy control).
        """
        model_type: SettingValue = "transformer" if model.is_transformer else None
        default_preset = "mixed" if model.is_transformer else "performance"  # nncf's own default per model type
        return [
            Recipe.make(NAME, "fp16-ir", "fp16", kind="fp16"),
            Recipe.make(
                NAME, "int8-ptq-performance", "int8", kind="quantize", preset="performance",
                fast_bias_correction=True, model_type=model_type, target_device="CPU",
            ),
            Recipe.make(
                NAME, "int8-ptq-mixed", "int8", kind="quantize", preset="mixed",
                fast_bias_correction=True, model_type=model_type, target_device="CPU",
            ),
            Recipe.make(NAME, "int8-weights", "int8", kind="weights", mode="int8_asym"),
            Recipe.make(
                NAME, ACCURACY_CONTROL, "int8", kind="accuracy_control", preset=default_preset,
                fast_bias_correction=True, model_type=model_type, target_device="CPU", drop_type="absolute",
            ),
        ]  # fmt: skip

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate:
        import openvino as ov

        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / "fp32-ir.xml"
        ov.save_model(_convert(model.path), str(xml), compress_to_fp16=False)
        notes: tuple[str, ...] = ()
        if {"avx512_bf16", "amx_bf16"} & set(detect().isa_flags):
            notes = ("OpenVINO would compute in BF16 on this CPU by default; quantgate pins FP32 inference precision",)
        return Candidate(Recipe.make(NAME, "fp32-ir", "fp32"), xml, notes=notes, files=_ir_files(xml))

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        import openvino as ov

        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / f"{recipe.name}.xml"
        opts = recipe.options
        if opts["kind"] == "accuracy_control" and self._accuracy is None:
            raise BackendError(
                f"{recipe.name} needs validation data; the pipeline must call configure_accuracy_control() first"
            )
        try:
            source = _convert(model.path)
            with _quiet_nncf():
                compressed, notes = self._build(source, opts, calib)
            ov.save_model(compressed, str(xml), compress_to_fp16=opts["kind"] == "fp16")
        except (_BudgetExhausted, BackendError) as exc:
            raise BackendError(f"{recipe.name} failed: {exc}") from None
        except Exception as exc:  # nncf and openvino raise anything from ValueError to pybind11 runtime errors
            raise BackendError(f"{recipe.name} failed: {_ov_reason(exc)}") from exc
        if opts["kind"] != "fp16" and not detect().int8_dot_product:
            notes = (*notes, _NO_DOT_PRODUCT_NOTE)
        return Candidate(recipe, xml, notes=notes, files=_ir_files(xml))

    def runner(self, candidate: Candidate, *, threads: int) -> Runner:
        return OvRunner(candidate.artifact, threads)

    # -- recipe implementations -------------------------------------------------------------

    def _build(self, model: Any, opts: dict[str, SettingValue], calib: Calibration) -> tuple[Any, tuple[str, ...]]:
        kind = opts["kind"]
        if kind == "fp16":
            notes = "weights stored as FP16 and upcast at load; the CPU computes in FP32, so expect a smaller file only"
            return model, (notes,)
        if kind == "weights":
            import nncf

            compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode(str(opts["mode"])))
            return compressed, ("weights-only INT8: activations stay float; gains show on large linear layers",)
        if kind == "quantize":
            import nncf

            data = _CalibrationBatches(calib)
            quantized = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), **_quantize_args(opts, data))
            return quantized, (data.describe(),)
        assert self._accuracy is not None  # compress() checked
        return _accuracy_controlled(model, opts, calib, self._accuracy)


def _quantize_args(opts: dict[str, SettingValue], data: _CalibrationBatches) -> dict[str, Any]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    transformer = opts["model_type"] == "transformer"
    return {
        "preset": nncf.QuantizationPreset(str(opts["preset"])),
        "target_device": nncf.TargetDevice(str(opts["target_device"])),
        "fast_bias_correction": bool(opts["fast_bias_correction"]),
        "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
        # Per-sample statistics when items are batches (nncf's rule for batched loaders), except for transformers,
        # where nncf warns that batch-wise statistics cost accuracy.
        "advanced_parameters": AdvancedQuantizationParameters(
            batchwise_statistics=data.batch_size > 1 and not transformer
        ),
    }


# -- calibration and validation data, streamed ----------------------------------------------------


class _Deadline:
    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.start = time.monotonic()

    def check(self) -> None:
        if self.budget_s is not None and time.monotonic() - self.start > self.budget_s:
            raise _BudgetExhausted(
                f"time budget of {self.budget_s:g} s exhausted after {time.monotonic() - self.start:.1f} s; "
                "raise the budget, validate on fewer samples, or use int8-ptq-mixed"
            )


class _BudgetExhausted(BaseException):
    """Raised from our data iterators and validation function to stop nncf mid-run.

    A BaseException because nncf swallows ``Exception`` from the validation function while probing its return type.
    """


class _CalibrationBatches:
    """Calibration batches as nncf wants them: re-iterable (it reads the data more than once) and streamed."""

    def __init__(self, calib: Calibration, deadline: _Deadline | None = None) -> None:
        self._calib = calib
        self._deadline = deadline or _Deadline(None)
        self.batch_size = calib.batch_size  # nncf reads it to choose per-sample statistics
        n = calib.dataset.n_samples
        self.samples = n if calib.limit is None else min(calib.limit, n)

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._calib.dataset.batches(self.batch_size, limit=self.samples):
            self._deadline.check()
            yield batch.inputs

    def describe(self) -> str:
        return f"calibrated on {self.samples} samples ({len(self)} batches of up to {self.batch_size})"


@dataclass(frozen=True)
class _Sample:
    index: int
    inputs: dict[str, np.ndarray]
    label: int | None


class _ValidationSamples:
    """Validation samples one at a time, re-iterable; nncf ranks layers by per-sample scores."""

    def __init__(self, dataset: NpzDataset, limit: int | None, deadline: _Deadline) -> None:
        self._dataset = dataset
        self._deadline = deadline
        self.samples = dataset.n_samples if limit is None else min(limit, dataset.n_samples)

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[_Sample]:
        for i, batch in enumerate(self._dataset.batches(1, limit=self.samples)):
            self._deadline.check()
            yield _Sample(i, batch.inputs, None if batch.labels is None else int(batch.labels[0]))


def _scorer(control: AccuracyControl, samples: _ValidationSamples, fp32: Any) -> Callable[[np.ndarray, _Sample], float]:
    """Per-sample score: 1/0 for a correct top-1, or cosine similarity to the FP32 output."""
    if control.metric == "accuracy":
        return lambda out, sample: float(np.argmax(out.reshape(-1)) == sample.label)
    compiled = _compile_f32(fp32)
    reference = [np.asarray(compiled(s.inputs)[0]).reshape(1, -1) for s in samples]
    return lambda out, sample: float(cosine_per_row(reference[sample.index], out.reshape(1, -1))[0])


def _accuracy_controlled(
    model: Any, opts: dict[str, SettingValue], calib: Calibration, control: AccuracyControl
) -> tuple[Any, tuple[str, ...]]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    deadline = _Deadline(control.time_budget_s)
    data = _CalibrationBatches(calib, deadline)
    samples = _ValidationSamples(control.validation, control.limit, deadline)
    score = _scorer(control, samples, model)

    def validate(compiled: Any, items: Iterable[_Sample]) -> tuple[float, list[float]]:
        deadline.check()
        scores = [score(np.asarray(compiled(item.inputs)[0]), item) for item in items]
        return (float(np.mean(scores)) if scores else 0.0), scores

    fp32_metric = 1.0 if control.metric == "fidelity" else validate(_compile_f32(model), samples)[0]
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(data),
        nncf.Dataset(samples, lambda sample: sample.inputs),
        validate,
        max_drop=control.max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(data),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            ranking_subset_size=min(len(samples), 300)  # nncf's default is the calibration item count
        ),
        **_restorer_args(_quantize_args(opts, data)),
    )
    final = validate(_compile_f32(quantized), samples)[0]
    drop = fp32_metric - final
    verdict = "within" if drop <= control.max_drop + 1e-12 else "NOT within"
    note = (
        f"accuracy control on {len(samples)} samples of {control.validation.path.name} by {control.metric}: "
        f"{final:.4f} vs FP32 {fp32_metric:.4f} (drop {drop:.4f}, {verdict} max_drop {control.max_drop:g}) "
        f"in {time.monotonic() - deadline.start:.1f} s"
    )
    log.info("%s", note)
    return quantized, (data.describe(), note, *((control.caveat,) if control.caveat else ()))


def _restorer_args(args: dict[str, Any]) -> dict[str, Any]:
    """``nncf.quantize`` arguments renamed for ``quantize_with_accuracy_control``."""
    out = dict(args)
    out["advanced_quantization_parameters"] = out.pop("advanced_parameters")
    return out


def _compile_f32(model: Any) -> Any:
    import openvino as ov
    import openvino.properties.hint as hints

    return ov.Core().compile_model(model, "CPU", {hints.inference_precision(): ov.Type.f32})


# -- helpers ------------------------------------------------------------------------------------


def _convert(path: Path) -> Any:
    """The ONNX file as an ``openvino.Model``; a graph OpenVINO cannot convert is a ``BackendError``."""
    import openvino as ov

    try:
        return ov.convert_model(str(path))
    except Exception as exc:  # OpConversionFailure, GeneralFailure, ovc's Error, RuntimeError...
        raise BackendError(f"openvino cannot convert {path.name}: {_ov_reason(exc)}") from exc


# OpenVINO messages start with C++ source locations and wrapper lines; the reason comes after them.
_OV_BOILERPLATE = re.compile(r"^(Exception from |Check '.*' failed at |FrontEnd API failed with |Summary:$)")


def _ov_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line.removeprefix("-- ") for line in lines if not _OV_BOILERPLATE.match(line)]
    if not useful:
        return type(exc).__name__
    # "Model wasn't fully converted." is followed by the list of what was not converted: that is the reason.
    if len(useful) > 1 and useful[0].startswith("Model wasn't fully converted"):
        useful = useful[1:]
    return "; ".join(useful[:2])[:300]


def _ir_files(xml: Path) -> tuple[Path, ...]:
    return (xml, xml.with_suffix(".bin"))


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """Route nncf's log records to ``logging`` instead of its own stdout handler, and drop its progress bars."""
    from nncf.common.logging import nncf_logger

    handlers, propagate, level = list(nncf_logger.handlers), nncf_logger.propagate, nncf_logger.level
    for handler in handlers:
        nncf_logger.removeHandler(handler)
    nncf_logger.propagate = True
    nncf_logger.setLevel(logging.NOTSET)  # the application's logging configuration decides what shows
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # rich progress bars write to sys.stdout
            yield
    finally:
        nncf_logger.propagate = propagate
        nncf_logger.setLevel(level)
        for handler in handlers:
            nncf_logger.addHandler(handler)
