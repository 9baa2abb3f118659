"""OpenVINO backend: FP32/FP16 IR, NNCF post-training INT8 (full and weights-only), accuracy-controlled INT8 and
sensitivity-guided mixed INT8/float (``int8-mixed``, in ``_ov_mixed``), on CPU, each computed in FP32 or, where the
CPU has it, in BF16 or FP16 (the recipe's ``inference_precision``).

``openvino`` and ``nncf`` are imported inside methods only, so this module imports (and reports itself unavailable)
without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendError
from quantgate.hardware import INFERENCE_PRECISIONS, ComputeNeed, compute_need, detect
from quantgate.model import ModelInfo
from quantgate.plugins import _ov_stats
from quantgate.plugins.base import Availability, Calibration, Candidate, ModelLogging, Recipe, Runner, SettingValue
from quantgate.sensitivity import AccuracyControl, Deadline
from quantgate.validators.fidelity import cosine_per_row

log = logging.getLogger(__name__)

NAME = "openvino"
SERVING_LIBRARIES = ("mlflow", "openvino", "numpy")
INSTALL_HINT = "pip install quantgate[openvino]"
ACCURACY_CONTROL = "int8-accuracy-control"
MIXED = "int8-mixed"
QAT = "int8-qat"
QAT_FINISH = "int8-ptq-performance"  # NNCF's symmetric preset: the scheme OpenVINO's QAT fake quantizers mimic
Metric = Literal["accuracy", "fidelity"]
REDUCED_PRECISIONS = ("bf16", "f16")  # each gets the float recipe and an -<precision> variant of every INT8 recipe

_NO_DOT_PRODUCT_NOTE = (
    "this CPU has no VNNI/AMX INT8 dot-product instructions: INT8 kernels may be slower than FP32 here"
)


class OvRunner:
    """One compiled IR and one reused infer request: inputs by name in, outputs in graph order out.

    ``precision`` is the inference precision OpenVINO computes the float layers in ("f32", "bf16", "f16");
    ``inference_precision`` is the one in effect, read back from the compiled model (it must be the one asked for).
    """

    def __init__(self, xml: Path, threads: int, precision: str = "f32", static_shapes: bool = False) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        self._config: dict[str, Any] = {
            props.inference_num_threads(): threads,
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            props.num_streams(): 1,
            # Always explicit: the CPU plugin computes in BF16 by default on CPUs with AVX512_BF16/AMX, so without
            # this the FP32 baseline would not be an FP32 reference and a candidate would not run as its recipe says.
            hints.inference_precision(): _ov_type(precision),
        }
        self._xml, self._precision = xml, precision
        self.static_shapes = static_shapes
        # static: per input shape, (compiled, request, its bound outputs)
        self._shapes: dict[tuple[tuple[int, ...], ...], tuple[Any, Any, list[np.ndarray] | None]] = {}
        try:
            self._model = ov.Core().read_model(str(xml)) if static_shapes else None
            compiled = ov.Core().compile_model(str(xml), "CPU", self._config)
        except Exception as exc:  # openvino raises RuntimeError and its own pybind11 types
            raise BackendError(f"openvino cannot load {xml.name}: {_ov_reason(exc)}") from exc
        self.inference_precision = _precision_in_effect(compiled, precision, xml.name)
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self._outs = _bind_outputs(compiled, self._request)
        self._names = [p.get_any_name() for p in compiled.inputs]
        self._dtypes = {p.get_any_name(): p.get_element_type().to_dtype() for p in compiled.inputs}
        self._bound: dict[str, np.ndarray] = {}
        self._shape: tuple[tuple[int, ...], ...] | None = None
        # The last call's inputs, bound as they are: (name, array, shape) per input.
        self._last: list[tuple[str, np.ndarray, tuple[int, ...]]] | None = None

    def _specialize(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Static shapes: the model reshaped to these inputs' shapes and compiled for them, once per shape.

        OpenVINO plans memory and picks kernels once for a static shape; on a dynamic one it infers shapes on every
        call (measured here: 17-28% on a CRAFT detector and a PP-OCR classifier, 2-5% on smaller MTCNN nets).
        """
        shape = tuple(inputs[n].shape for n in self._names if n in inputs)  # every call: kept cheap
        if shape == self._shape:
            return
        if shape not in self._shapes:
            import openvino as ov

            assert self._model is not None
            model = self._model.clone()
            try:
                model.reshape({n: ov.PartialShape(list(d)) for n, d in zip(self._names, shape, strict=True)})
                compiled = ov.Core().compile_model(model, "CPU", self._config)
            except Exception as exc:
                raise BackendError(
                    f"openvino cannot compile {self._xml.name} for input shapes {list(shape)}: {_ov_reason(exc)}"
                ) from exc
            _precision_in_effect(compiled, self._precision, self._xml.name)
            if len(self._shapes) >= STATIC_SHAPES_KEPT:
                self._shapes.pop(next(iter(self._shapes)))
            request = compiled.create_infer_request()
            self._shapes[shape] = (compiled, request, _bind_outputs(compiled, request))
        self.compiled, self._request, self._outs = self._shapes[shape]
        self._shape = shape
        self._bound.clear()
        self._last = None

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # The same arrays as the last call, at the same shapes (the latency validator's blocks; a caller that reuses
        # its buffers): already bound, at a shape already compiled, so nothing but identity is checked. Going
        # through the shape key and the binding loop on every call cost ~3% of a 1 ms INT8 MTCNN O-Net, timed
        # in blocks: Python runs with cold caches right after an inference.
        last = self._last
        if last is not None and len(inputs) == len(last):
            for (name, value), (last_name, last_value, last_shape) in zip(inputs.items(), last, strict=True):
                if value is not last_value or name != last_name or value.shape != last_shape:
                    break
            else:
                return self._infer()
        self._last = None
        if self.static_shapes:
            self._specialize(inputs)
        # Zero-copy in and out, then one copy of the outputs (the next call reuses the request's buffers): at batch 1
        # the default copies cost ~20% of a small model's latency, which would be charged to OpenVINO, not the model.
        # An array bound on an earlier call is not bound again: re-wrapping it each call cost 3-6% of a 1 ms INT8
        # MTCNN O-Net here (measured against a bare infer()).
        request = self._request
        for name, value in inputs.items():
            if self._bound.get(name) is value:
                continue
            if value.dtype != self._dtypes.get(name) or not value.flags.c_contiguous:
                self._bound.clear()
                result = request.infer(dict(inputs), share_inputs=True, share_outputs=True)
                return [np.array(v, copy=True) for v in result.to_tuple()]
            request.set_tensor(name, _ov_tensor(value))
            self._bound[name] = value
        self._last = [(name, value, value.shape) for name, value in inputs.items()]
        return self._infer()

    def _infer(self) -> list[np.ndarray]:
        request = self._request
        if self._outs is None:
            # infer() copies each output out inside the binding: 1% of an INT8 O-Net or R-Net (1.7-2.7 ms) faster
            # than fetching the output tensors afterwards, timed in rotation.
            return list(request.infer().to_tuple())
        request.infer(share_outputs=True)  # OpenVINO wrote into self._outs: nothing to copy twice
        return [out.copy() for out in self._outs]

    def bare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """The runtime's call alone, inputs bound once (what the latency validator subtracts to measure ``run``)."""
        if self.static_shapes:
            self._specialize(inputs)
        request = self._request
        self._bound.clear()  # rebound below, to wrappers run() did not make
        self._last = None
        for name, value in inputs.items():
            request.set_tensor(name, _ov_tensor(value))
        infer: Callable[[], object] = request.infer
        return infer


def _bind_outputs(compiled: Any, request: Any) -> list[np.ndarray] | None:
    """Arrays of our own bound as the request's output tensors, when every output's shape is static: OpenVINO
    writes into them and a call only copies them out. Fetching each output tensor after a call cost 50-65 us on an
    INT8 MTCNN O-Net here (Python runs with cold caches right after an inference), these copies 20-25: 1-2% of its
    2.5 ms, timed in rotation as the latency validator does. None for a dynamic output: OpenVINO sizes it per call."""
    import openvino as ov

    outs = []
    for i, port in enumerate(compiled.outputs):
        kind = port.get_element_type()
        if port.get_partial_shape().is_dynamic or kind.is_dynamic() or kind in (ov.Type.string, ov.Type.bf16):
            return None  # bf16 has no numpy type, strings no fixed size
        out = np.empty(tuple(port.get_shape()), dtype=kind.to_dtype())
        request.set_output_tensor(i, ov.Tensor(out, shared_memory=True))
        outs.append(out)
    return outs


class OpenVinoBackend:
    """IR files (.xml + .bin) compiled on OpenVINO's CPU plugin; ``int8-accuracy-control`` and ``int8-mixed`` (and
    their reduced-precision variants) need :meth:`configure_accuracy_control` on the same instance before
    :meth:`compress`.

    The reduced-precision recipes (``bf16``, ``f16`` and the ``-bf16``/``-f16`` INT8 variants) are listed on every
    host, and :meth:`compress` refuses them with a one-line ``BackendError`` on a host whose OpenVINO CPU plugin does
    not offer that compute (``OPTIMIZATION_CAPABILITIES`` without ``BF16``/``FP16``). Listing them only where they
    can run would make a policy's recipe names depend on the host that reads it: the parent of a run checks the
    names and plans every target pool's recipes, and its own CPU need not be the target's. A host without the
    capability therefore shows these candidates as failed, with the reason, instead of silently not trying them.
    """

    name = NAME

    def __init__(self) -> None:
        self._accuracy: AccuracyControl | None = None
        self._qat: object | None = None

    def qat_recipes(self, model: ModelInfo) -> list[Recipe]:
        """Quantization-aware fine-tuning against NNCF's performance preset, finished by ``int8-ptq-performance``
        (and its BF16 variant): the two share one fine-tuning per run."""
        from quantgate import qat

        return [
            qat.make_recipe(NAME, QAT, "int8", scheme=NAME, finish=QAT_FINISH, inference_precision="f32"),
            qat.make_recipe(
                NAME, f"{QAT}-bf16", "int8-bf16", scheme=NAME, finish=f"{QAT_FINISH}-bf16", inference_precision="bf16"
            ),
        ]

    def configure_qat(self, job: object) -> None:
        self._qat = job

    def log_model(self, request: ModelLogging) -> str:
        """A pyfunc model from code (``quantgate/serving/openvino_model.py``) carrying the IR and its precision."""
        import mlflow
        from mlflow.models import Model

        from quantgate.serving import HERE, pins

        xml = request.artifact
        info = Model.log(
            flavor=mlflow.pyfunc,
            python_model=str(HERE / "openvino_model.py"),
            artifacts={"model_xml": str(xml), "model_bin": str(xml.with_suffix(".bin"))},
            model_config=openvino_model_config(request.recipe),
            pip_requirements=pins(request.libraries, SERVING_LIBRARIES),
            **request.mlflow_args,
        )
        return str(info.model_uri)

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
        """Give ``int8-accuracy-control`` and ``int8-mixed`` their validation set, metric, allowed drop and budget.

        ``metric="accuracy"``: top-1 of the first output against ``labels``; ``max_drop`` is absolute (0.01 = 1 point).
        ``metric="fidelity"``: mean cosine similarity of the first output to the FP32 model's; the FP32 model scores
        1.0, so ``max_drop = 1 - min_fidelity``. ``limit`` caps the validation samples used; ``caveat`` is added to
        the candidate's notes.
        """
        # AccuracyControl checks the metric, the drop, the budget and that top-1 has labels, each in one line.
        self._accuracy = AccuracyControl(validation, metric, max_drop, time_budget_s, limit, caveat)

    def recipes(self, model: ModelInfo) -> list[Recipe]:
        """The same recipe names for every model, so a policy's recipe list never depends on the graph.

        ``int8-weights`` is offered for CNNs too: nncf's INT8 weight compression covers Convolution as well as
        MatMul/Gemm/embeddings. It pays off on large linear layers (transformers); elsewhere the gate rejects it.
        Transformer graphs get ``model_type="transformer"`` (and nncf's MIXED default preset for accuracy control).
        """
        model_type: SettingValue = "transformer" if model.is_transformer else None
        default_preset = "mixed" if model.is_transformer else "performance"  # nncf's own default per model type
        int8 = [
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
        fp16_ir = Recipe.make(NAME, "fp16-ir", "fp16", kind="fp16")
        out = [_at(r, "f32", r.name, r.precision) for r in (fp16_ir, *int8)]
        for p in REDUCED_PRECISIONS:
            out.append(Recipe.make(NAME, p, p, kind="float", inference_precision=p))
            out.extend(_at(r, p, f"{r.name}-{p}", f"int8-{p}") for r in int8)
        # Full INT8 as int8-ptq-performance builds it, with the fewest most sensitive layers kept float when that
        # misses the gate (_ov_mixed). Listed last, so the names above keep their positions.
        mixed = Recipe.make(
            NAME, MIXED, "int8", kind="mixed", preset="performance", fast_bias_correction=True,
            model_type=model_type, target_device="CPU", ranking_samples=16,
        )  # fmt: skip
        out += [_at(mixed, "f32", MIXED, "int8"), _at(mixed, "bf16", f"{MIXED}-bf16", "int8-bf16")]
        return out

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate:
        import openvino as ov

        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / "fp32-ir.xml"
        ov.save_model(_convert(model.path), str(xml), compress_to_fp16=False)
        notes: tuple[str, ...] = (
            _precision_note(OvRunner(xml, threads=1, precision="f32").inference_precision, "float"),
        )
        default = _default_precision()
        if default != "f32":
            notes = (*notes, f"OpenVINO would compute in {_label(default)} on this CPU by default; quantgate pins FP32")
        recipe = Recipe.make(NAME, "fp32-ir", "fp32", inference_precision="f32")
        return Candidate(recipe, xml, notes=notes, files=_ir_files(xml))

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        import openvino as ov

        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / f"{recipe.name}.xml"
        opts = recipe.options
        precision = _precision_of(recipe)
        if opts["kind"] in _TUNED_KINDS and self._accuracy is None:
            raise BackendError(
                f"{recipe.name} needs validation data; the pipeline must call configure_accuracy_control() first"
            )
        _require_compute(recipe.name, precision)
        if opts["kind"] == "qat":
            from quantgate import qat

            finish = next(r for r in self.recipes(model) if r.name == opts["finish"])
            job = self._qat if isinstance(self._qat, qat.QatJob) else None
            candidate: Candidate = qat.build(self, job, recipe, finish, calib, workdir, NAME)
            return candidate
        try:
            notes = _reuse_ir(model.path, opts, calib, workdir.parent, xml)
            if notes is None:
                source = _convert(model.path)
                with _quiet_nncf():
                    compressed, notes = self._build(source, opts, calib, model.path, workdir.parent)
                ov.save_model(compressed, str(xml), compress_to_fp16=opts["kind"] == "fp16")
                _share_ir(model.path, opts, calib, workdir.parent, xml, notes)
            in_effect = OvRunner(xml, threads=1, precision=precision).inference_precision
        except (_BudgetExhausted, BackendError) as exc:
            raise BackendError(f"{recipe.name} failed: {exc}") from None
        except Exception as exc:  # nncf and openvino raise anything from ValueError to pybind11 runtime errors
            raise BackendError(f"{recipe.name} failed: {_ov_reason(exc)}") from exc
        notes = (*notes, _precision_note(in_effect, str(opts["kind"])))
        if opts["kind"] in _INT8_KINDS and not detect().int8_dot_product:
            notes = (*notes, _NO_DOT_PRODUCT_NOTE)
        return Candidate(recipe, xml, notes=notes, files=_ir_files(xml))

    def runner(self, candidate: Candidate, *, threads: int) -> Runner:
        static = bool(candidate.recipe.options.get("static_shapes"))
        return OvRunner(candidate.artifact, threads, _precision_of(candidate.recipe), static_shapes=static)

    def specialize(self, candidate: Candidate) -> Candidate | None:
        """The same IR compiled for the shapes it is called with (``static_shapes``), or None if it already is.

        Same files, same arithmetic: only how OpenVINO compiles it differs, so the search measures it as a candidate
        of its own (quality included) instead of building anything.
        """
        recipe = candidate.recipe
        if recipe.options.get("static_shapes"):
            return None
        variant = Recipe.make(
            NAME, f"{recipe.name}-static", recipe.precision, **{**recipe.options, "static_shapes": True}
        )
        note = (
            "static shapes: the IR is reshaped to the input shapes it is called with and compiled for each (kept for "
            f"the last {STATIC_SHAPES_KEPT}); a new shape costs one compile on its first call"
        )
        return Candidate(
            variant, candidate.artifact, notes=(*candidate.notes, note), files=_ir_files(candidate.artifact)
        )

    # -- recipe implementations -------------------------------------------------------------

    def _build(
        self, model: Any, opts: dict[str, SettingValue], calib: Calibration, source: Path, shared: Path
    ) -> tuple[Any, tuple[str, ...]]:
        """``model`` (``source`` converted) compressed by the recipe; ``shared``: the folder every recipe of this
        backend shares in a run (``int8-mixed`` caches its layer ranking there)."""
        kind = opts["kind"]
        if kind == "fp16":
            notes = (
                "FP16 storage only: weights stored as FP16 and converted to FP32 when compiled, and computed in FP32 "
                "(inference precision pinned): a smaller file, not faster compute (FP16 compute is the f16 recipe)"
            )
            return model, (notes,)
        if kind == "float":
            return model, ()  # the FP32 IR as it is: only the inference precision differs
        if kind == "weights":
            import nncf

            compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode(str(opts["mode"])))
            return compressed, ("weights-only INT8: activations stay float; gains show on large linear layers",)
        if kind == "quantize":
            import nncf

            data = _CalibrationBatches(calib)
            memo = calibration_memo(source, calib)
            quantized = _ov_stats.quantize(
                model, nncf.Dataset(data), memo, subset_size=len(data), **_quantize_args(opts, data, model)
            )
            return quantized, (data.describe(),)
        assert self._accuracy is not None  # compress() checked
        if kind == "mixed":
            from quantgate.plugins._ov_mixed import mixed_precision

            return mixed_precision(model, source, opts, calib, self._accuracy, shared)
        return _accuracy_controlled(model, opts, calib, self._accuracy)


# Compiled models a static-shape runner keeps, one per input shape, the least recently compiled dropped first.
STATIC_SHAPES_KEPT = 4

# Kinds whose IR does not depend on the inference precision: their -bf16/-f16 variants compile the same files.
_PRECISION_FREE_KINDS = ("quantize", "weights")


def _shared_ir_dir(source: Path, opts: dict[str, SettingValue], calib: Calibration, shared: Path) -> Path | None:
    if opts["kind"] not in _PRECISION_FREE_KINDS:
        return None
    settings = {k: v for k, v in sorted(opts.items()) if k != "inference_precision"}
    key = json.dumps([_ov_stats.memo_key(source, calib.dataset.path, calib.batch_size, calib.limit), settings])
    return shared / "_shared-ir" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _reuse_ir(
    source: Path, opts: dict[str, SettingValue], calib: Calibration, shared: Path, xml: Path
) -> tuple[str, ...] | None:
    """The notes of an IR an earlier recipe of this run built with the same settings but another inference precision
    (copied to ``xml``), or None. NNCF builds the same IR whatever the layers left in float will compute in."""
    where = _shared_ir_dir(source, opts, calib, shared)
    if where is None or not (where / "notes.json").is_file():
        return None
    for src, dst in zip(_ir_files(where / "model.xml"), _ir_files(xml), strict=True):
        shutil.copyfile(src, dst)
    built = json.loads((where / "notes.json").read_text())
    return (
        *built["notes"],
        f"the same IR as {built['recipe']} of this run (built once; only the compute precision differs)",
    )


def _share_ir(
    source: Path, opts: dict[str, SettingValue], calib: Calibration, shared: Path, xml: Path, notes: tuple[str, ...]
) -> None:
    where = _shared_ir_dir(source, opts, calib, shared)
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(_ir_files(xml), _ir_files(where / "model.xml"), strict=True):
        shutil.copyfile(src, dst)
    (where / "notes.json").write_text(json.dumps({"recipe": xml.stem, "notes": list(notes)}))


def calibration_memo(source: Path, calib: Calibration) -> _ov_stats.StatsMemo:
    """The activation statistics this process already collected for ``source`` on ``calib`` (see ``_ov_stats``)."""
    return _ov_stats.memo_for(_ov_stats.memo_key(source, calib.dataset.path, calib.batch_size, calib.limit))


_RECURRENT = {"LSTMSequence", "GRUSequence", "RNNSequence", "LSTMCell", "GRUCell", "RNNCell"}


def _quantize_args(opts: dict[str, SettingValue], data: _CalibrationBatches, model: Any = None) -> dict[str, Any]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    transformer = opts["model_type"] == "transformer"
    recurrent = bool(_RECURRENT & {op.get_type_name() for op in model.get_ops()}) if model is not None else False
    return {
        "preset": nncf.QuantizationPreset(str(opts["preset"])),
        "target_device": nncf.TargetDevice(str(opts["target_device"])),
        "fast_bias_correction": bool(opts["fast_bias_correction"]),
        "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
        # Per-sample statistics when items are batches (nncf's rule for batched loaders), except for transformers,
        # where nncf warns that batch-wise statistics cost accuracy, and recurrent graphs, where nncf 3.4 crashes on
        # them ("list assignment index out of range" on a CRNN's LSTMs).
        "advanced_parameters": AdvancedQuantizationParameters(
            batchwise_statistics=data.batch_size > 1 and not transformer and not recurrent
        ),
    }


# -- calibration and validation data, streamed ----------------------------------------------------


class _Deadline(Deadline):
    """A ``Deadline`` whose ``check`` stops nncf mid-run (from our data iterators and validation function)."""

    def __init__(
        self, budget_s: float | None, hint: str = "raise the budget, validate on fewer samples, or use int8-ptq-mixed"
    ) -> None:
        super().__init__(budget_s)
        self.hint = hint

    def check(self) -> None:
        if self.expired():
            raise _BudgetExhausted(f"{self.describe()}; {self.hint}")


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
    compiled = _compile(fp32, "f32")  # the reference is true FP32, whatever the candidate computes in
    reference = [np.asarray(compiled(s.inputs)[0]).reshape(1, -1) for s in samples]
    return lambda out, sample: float(cosine_per_row(reference[sample.index], out.reshape(1, -1))[0])


def _accuracy_controlled(
    model: Any, opts: dict[str, SettingValue], calib: Calibration, control: AccuracyControl
) -> tuple[Any, tuple[str, ...]]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    precision = str(opts["inference_precision"])
    deadline = _Deadline(control.time_budget_s)
    data = _CalibrationBatches(calib, deadline)
    samples = _ValidationSamples(control.validation, control.limit, deadline)
    score = _scorer(control, samples, model)
    at_precision = _AtPrecision(precision)

    def evaluate(compiled: Any, items: Iterable[_Sample]) -> tuple[float, list[float]]:
        deadline.check()
        scores = [score(np.asarray(compiled(item.inputs)[0]), item) for item in items]
        return (float(np.mean(scores)) if scores else 0.0), scores

    def validate(compiled: Any, items: Iterable[_Sample]) -> tuple[float, list[float]]:
        return evaluate(at_precision(compiled), items)

    fp32_metric = 1.0 if control.metric == "fidelity" else evaluate(_compile(model, "f32"), samples)[0]
    max_drop, precision_notes = _drop_left_for_int8(control, fp32_metric, precision, model, samples, evaluate)
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(data),
        nncf.Dataset(samples, lambda sample: sample.inputs),
        validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(data),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            ranking_subset_size=min(len(samples), 300)  # nncf's default is the calibration item count
        ),
        **_restorer_args(_quantize_args(opts, data, model)),
    )
    final = evaluate(_compile(quantized, precision), samples)[0]
    drop = fp32_metric - final
    verdict = "within" if drop <= control.max_drop + 1e-12 else "NOT within"
    computed = "" if precision == "f32" else f" computed in {_label(precision)}"
    note = (
        f"accuracy control on {len(samples)} samples of {control.validation.path.name} by {control.metric}: "
        f"{final:.4f}{computed} vs FP32 {fp32_metric:.4f} (drop {drop:.4f}, {verdict} max_drop "
        f"{control.max_drop:g}) in {time.monotonic() - deadline.start:.1f} s"
    )
    log.info("%s", note)
    return quantized, (data.describe(), *precision_notes, note, *((control.caveat,) if control.caveat else ()))


def _drop_left_for_int8(
    control: AccuracyControl,
    fp32_metric: float,
    precision: str,
    model: Any,
    samples: _ValidationSamples,
    evaluate: Callable[[Any, Iterable[_Sample]], tuple[float, list[float]]],
) -> tuple[float, tuple[str, ...]]:
    """The drop nncf may spend on INT8: ``max_drop`` less what the reduced float precision alone loses.

    nncf measures its drop against the float model as our validation function scores it, that is at the recipe's
    precision; the gate measures against true FP32. Without this, BF16's own loss would come on top of max_drop.
    """
    if precision == "f32":
        return control.max_drop, ()
    float_metric = evaluate(_compile(model, precision), samples)[0]
    loss = max(0.0, fp32_metric - float_metric)
    what = f"the float model computed in {_label(precision)} scores {float_metric:.4f} vs FP32 {fp32_metric:.4f}"
    if loss > control.max_drop:
        raise BackendError(f"{what}: that alone exceeds max_drop {control.max_drop:g}, so no INT8 layer can stay")
    left = control.max_drop - loss
    return left, (f"{what}; nncf was given the remaining drop {left:.3g} of max_drop {control.max_drop:g}",)


class _AtPrecision:
    """nncf compiles every model it validates with FP32 pinned; this recompiles it at the recipe's precision, so
    the layers accuracy control restores to float are judged at the precision they will run in.

    The CPU plugin's exported blob holds the model, and importing it with another inference precision compiles it
    anew (checked on OpenVINO 2026.4: the same runtime graph and bit-identical outputs as compiling the model at
    that precision directly). nncf validates one compiled model item by item while ranking, hence the cache.
    """

    def __init__(self, precision: str) -> None:
        self._precision = precision
        self._last: tuple[Any, Any] | None = None

    def __call__(self, compiled: Any) -> Any:
        if self._precision == "f32":
            return compiled
        if self._last is not None and self._last[0] is compiled:
            return self._last[1]
        import openvino as ov
        import openvino.properties.hint as hints

        config = {hints.inference_precision(): _ov_type(self._precision)}
        ours = ov.Core().import_model(compiled.export_model(), "CPU", config)
        _precision_in_effect(ours, self._precision, "the model nncf validates")
        self._last = (compiled, ours)
        return ours


def _restorer_args(args: dict[str, Any]) -> dict[str, Any]:
    """``nncf.quantize`` arguments renamed for ``quantize_with_accuracy_control``."""
    out = dict(args)
    out["advanced_quantization_parameters"] = out.pop("advanced_parameters")
    return out


def _compile(model: Any, precision: str) -> Any:
    import openvino as ov
    import openvino.properties.hint as hints

    compiled = ov.Core().compile_model(model, "CPU", {hints.inference_precision(): _ov_type(precision)})
    _precision_in_effect(compiled, precision, "the model")
    return compiled


# -- inference precision ------------------------------------------------------------------------

_INT8_KINDS = ("quantize", "weights", "accuracy_control", "mixed")
_TUNED_KINDS = ("accuracy_control", "mixed")  # they need configure_accuracy_control() first


def _at(recipe: Recipe, precision: str, name: str, label: str) -> Recipe:
    return Recipe.make(NAME, name, label, **{**recipe.options, "inference_precision": precision})


def _precision_of(recipe: Recipe) -> str:
    """The recipe's inference precision; f32 for recipes recorded before it was a setting."""
    precision = str(recipe.options.get("inference_precision") or "f32")
    if precision not in INFERENCE_PRECISIONS:  # never a silent FP32 run
        known = ", ".join(INFERENCE_PRECISIONS)
        raise BackendError(f"{recipe.name}: unknown inference precision {precision!r}; known: {known}")
    return precision


def _label(precision: str) -> str:
    if precision not in INFERENCE_PRECISIONS:
        return precision
    need = compute_need(precision)
    return "FP32" if need is None else need.capability


def _ov_type(precision: str) -> Any:
    import openvino as ov

    return {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}[precision]


def _precision_in_effect(compiled: Any, wanted: str, what: str) -> str:
    """The precision OpenVINO computes ``compiled`` in; a ``BackendError`` when it is not ``wanted``.

    OpenVINO does not refuse a precision the CPU lacks: it computes in another one (f16 becomes bf16 on a CPU
    without FP16), so what is measured would not be what the recipe says.
    """
    import openvino.properties.hint as hints

    in_effect = str(compiled.get_property(hints.inference_precision()).get_type_name())
    if in_effect != wanted:
        raise BackendError(f"openvino compiled {what} with inference precision {in_effect}, not {wanted}")
    return in_effect


def _precision_note(in_effect: str, kind: str) -> str:
    """The inference precision in effect, as OpenVINO reported it after compiling, and what it means here."""
    what = "the layers left in float" if kind in ("quantize", *_TUNED_KINDS) else "the float layers"
    return f"OpenVINO inference precision in effect: {in_effect} ({what} compute in {_label(in_effect)})"


def cpu_plugin_capabilities() -> frozenset[str]:
    """What OpenVINO's CPU plugin offers on this host (``OPTIMIZATION_CAPABILITIES``: "BF16", "FP16", "INT8"...).

    The source of truth for reduced-precision compute: the plugin computes in BF16/FP16 only where it lists them.
    """
    import openvino as ov

    return frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _default_precision() -> str:
    """The inference precision OpenVINO's CPU plugin picks on this host when none is given."""
    import openvino as ov
    import openvino.properties.hint as hints

    return str(ov.Core().get_property("CPU", hints.inference_precision()).get_type_name())


def _require_compute(recipe_name: str, precision: str) -> None:
    """A one-line ``BackendError`` when this host's OpenVINO cannot compute in ``precision``."""
    need: ComputeNeed | None = compute_need(precision)
    if need is None or need.capability in cpu_plugin_capabilities():
        return
    flags = [f for f in need.isa_any if f in detect().isa_flags]
    why = f"although the CPU has {', '.join(flags)}" if flags else need.lacking()
    raise BackendError(
        f"{recipe_name} computes in {need.capability}, which needs {need.cpu}; OpenVINO's CPU plugin does not offer "
        f"{need.capability} on this host ({why})"
    )


# -- helpers ------------------------------------------------------------------------------------


def _ov_tensor(value: np.ndarray) -> Any:
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(value), shared_memory=True)


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
