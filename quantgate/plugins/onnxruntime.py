"""ONNX Runtime backend: static INT8 (QDQ), sensitivity-guided mixed INT8/FP32, dynamic INT8 and FP16 recipes, run
on the CPU provider."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantgate.data import NpzDataset
from quantgate.errors import BackendError
from quantgate.model import ModelInfo
from quantgate.plugins._ort_preprocess import per_channel_ready, preprocess
from quantgate.plugins.base import (
    Availability,
    Calibration,
    Candidate,
    ModelLogging,
    Recipe,
    Runner,
    SettingValue,
    first_line,
    model_files,
)

if TYPE_CHECKING:
    from quantgate.qat import QatJob
    from quantgate.sensitivity import AccuracyControl, LayerSensitivity, Metric, Scorer, SearchOutcome

log = logging.getLogger(__name__)

NAME = "onnxruntime"
SERVING_LIBRARIES = ("mlflow", "onnx", "onnxruntime", "numpy")
MIXED = "int8-static-mixed"
HYBRID = "int8-hybrid"
# Ops static QDQ leaves in float that ONNX Runtime can still run in INT8 with dynamic activation scales: a recurrent
# layer's state has no range a calibration set can fix, and quantize_static does not quantize it at all.
HYBRID_DYNAMIC_OPS = ("LSTM",)
QAT = "int8-qat"
# What QAT candidates are quantized with after fine-tuning: the static recipe whose scheme the fake quantizers mimic.
QAT_FINISH = "int8-static-qdq-minmax-perchannel"
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


# quantize_dynamic's op types (its IntegerOpsRegistry) less Conv: ConvInteger runs 4-8x slower than FP32 on CPU.
DYNAMIC_OP_TYPES = "MatMul,Attention,LSTM,Gather,EmbedLayerNormalization,Transpose"
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN", "Einsum"})


def _dynamic_recipe(name: str, per_channel: bool) -> Recipe:
    return Recipe.make(
        NAME, name, "int8", kind="dynamic", per_channel=per_channel, weight_type="int8",
        op_types_to_quantize=DYNAMIC_OP_TYPES,
    )  # fmt: skip


def _mixed_recipe() -> Recipe:
    # Per-channel MinMax: the calibration that ranks best on small models, and the cheapest to repeat per variant.
    return Recipe.make(
        NAME, MIXED, "int8", kind="mixed", format="qdq", calibration="minmax", per_channel=True,
        activation_type="uint8", weight_type="int8", ranking_samples=16,
    )  # fmt: skip


def _hybrid_recipe() -> Recipe:
    return Recipe.make(
        NAME, HYBRID, "int8", kind="hybrid", format="qdq", calibration="minmax", per_channel=True,
        activation_type="uint8", weight_type="int8", dynamic_op_types=",".join(HYBRID_DYNAMIC_OPS),
    )  # fmt: skip


RECIPES: tuple[Recipe, ...] = (
    *_static_recipes(),
    _mixed_recipe(),
    _hybrid_recipe(),
    _dynamic_recipe("int8-dynamic", per_channel=False),
    _dynamic_recipe("int8-dynamic-perchannel", per_channel=True),
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

    def bare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """The runtime's call alone on a prepared feed (what the latency validator subtracts to measure ``run``)."""
        session, feed = self._session, dict(inputs)
        return lambda: session.run(None, feed)


class OnnxRuntimeBackend:
    """``int8-static-mixed`` needs :meth:`configure_accuracy_control` on the same instance before :meth:`compress`."""

    name = NAME
    # The reference runtime: a core dependency, on every host, and the common yardstick across backends.
    reference_label = "ONNX Runtime FP32"
    reference_rank = 0

    def __init__(self) -> None:
        self._control: AccuracyControl | None = None
        self._qat: QatJob | None = None

    def qat_recipes(self, model: ModelInfo) -> list[Recipe]:
        """Quantization-aware fine-tuning against ONNX Runtime's static QDQ scheme, finished by that recipe."""
        from quantgate import qat

        return [qat.make_recipe(NAME, QAT, "int8", scheme=NAME, finish=QAT_FINISH)]

    def log_model(self, request: ModelLogging) -> str:
        """MLflow's ``onnx`` flavor on the CPU provider."""
        import mlflow
        from mlflow.models import Model

        from quantgate.serving import pins

        info = Model.log(
            flavor=mlflow.onnx,
            onnx_model=onnx.load(str(request.artifact)),
            pip_requirements=pins(request.libraries, SERVING_LIBRARIES),
            onnx_execution_providers=["CPUExecutionProvider"],
            **request.mlflow_args,
        )
        return str(info.model_uri)

    def configure_qat(self, job: object) -> None:
        from quantgate.qat import QatJob

        assert isinstance(job, QatJob)
        self._qat = job

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
        """Give ``int8-static-mixed`` the gate's metric, allowed drop, validation set and wall-clock budget.

        ``metric="accuracy"``: top-1 of the first output against ``labels``; ``max_drop`` is absolute (0.01 = 1 point).
        ``metric="fidelity"``: mean cosine of the first output to the FP32 model's, so ``max_drop = 1 - min_fidelity``.
        ``limit`` caps the validation samples; ``caveat`` is added to the candidate's notes.
        """
        from quantgate.sensitivity import AccuracyControl

        self._control = AccuracyControl(validation, metric, max_drop, time_budget_s, limit, caveat)

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
        if recipe.options["kind"] == "qat":
            from quantgate import qat

            finish = next(r for r in RECIPES if r.name == recipe.options["finish"])
            candidate: Candidate = qat.build(self, self._qat, recipe, finish, calib, workdir, NAME)
            return candidate
        out = workdir / f"{recipe.name}.onnx"
        if recipe.options["kind"] == "mixed" and self._control is None:
            raise BackendError(
                f"{recipe.name} needs a validation set and the gate's threshold: the pipeline must call "
                "configure_accuracy_control() first (the gate needs min_fidelity, or max_accuracy_drop with labels)"
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibrators print() progress
                notes = self._build(model, out, workdir.parent, recipe.options, calib)
        except Exception as exc:  # quantization raises anything from ValueError to ORT's Fail
            raise BackendError(f"{recipe.name} failed: {first_line(exc)}") from exc
        return Candidate(recipe, out, notes=notes, files=model_files(out))

    def _build(
        self, model: ModelInfo, out: Path, shared: Path, opts: dict[str, SettingValue], calib: Calibration
    ) -> tuple[str, ...]:
        src = model.path
        if opts["kind"] == "fp16":
            self._fp16(src, out)
            return ()
        if opts["kind"] == "hybrid":
            _hybrid_ops(src, opts)  # before any calibration: a graph without them fails in a moment
        prepared, notes = preprocess(src, shared)
        if opts.get("per_channel") and opts["kind"] != "dynamic":  # Q/DQ with an axis
            try:
                prepared, upgraded = per_channel_ready(prepared, model.opset, shared)  # pre-processing keeps it
            except Exception as exc:  # onnx's converter has no adapter for some ops: quantize as given, say why
                upgraded = (f"opset not converted for per-channel Q/DQ: {first_line(exc)}",)
            notes = (*notes, *upgraded)
        if opts["kind"] == "static":
            return (*notes, *self._static(prepared, out, opts, calib))
        if opts["kind"] == "hybrid":
            return (*notes, *self._hybrid(prepared, out, opts, calib))
        if opts["kind"] == "mixed":
            assert self._control is not None  # compress() checked
            return (*notes, *_mixed(prepared, out, opts, calib, self._control))
        return (*notes, *self._dynamic(prepared, out, opts))

    def runner(self, candidate: Candidate, *, threads: int) -> Runner:
        return OrtRunner(candidate.artifact, threads)

    # -- recipe implementations -------------------------------------------------------------

    def _static(self, src: Path, out: Path, opts: dict[str, SettingValue], calib: Calibration) -> tuple[str, ...]:
        from quantgate.plugins._ort_calibration import (
            SENTINEL_ABS,
            CalibrationResult,
            StreamingCalibrationReader,
            calibrate,
            unbounded_neighbours,
        )

        reader = StreamingCalibrationReader(
            calib.dataset, batch_size=calib.batch_size, batches_per_chunk=4, limit=calib.limit
        )
        percentile = opts.get("percentile")
        method = str(opts["calibration"])
        memo = _calibration_memo(src, calib, method, percentile)
        if memo.with_suffix(".json").is_file():  # the same ranges another recipe of this run computed
            shutil.copyfile(memo.with_suffix(".json"), out.with_suffix(".calibration.json"))
            unbounded = tuple(json.loads(memo.with_suffix(".unbounded.json").read_text()))
            ranges = CalibrationResult(out.with_suffix(".calibration.json"), unbounded)
        else:
            ranges = calibrate(
                src,
                reader,
                method,
                out.with_suffix(".calibration.json"),
                percentile=None if percentile is None else float(percentile),
            )
            memo.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ranges.cache, memo.with_suffix(".json"))
            memo.with_suffix(".unbounded.json").write_text(json.dumps(list(ranges.unbounded)))
        kept_float = unbounded_neighbours(src, ranges.unbounded)
        try:
            _quantize_static(src, out, opts, ranges.cache, kept_float)
        finally:
            ranges.cache.unlink(missing_ok=True)
        if not ranges.unbounded:
            return ()
        return (
            f"{len(ranges.unbounded)} activation(s) carried infinite or beyond-{SENTINEL_ABS:g} values (typically an "
            f"attention mask's additive -inf/finfo.min): their {len(kept_float)} producer/consumer node(s) stay float "
            f"({_names(kept_float)})",
        )

    def _hybrid(self, src: Path, out: Path, opts: dict[str, SettingValue], calib: Calibration) -> tuple[str, ...]:
        """Static QDQ INT8 where calibrated ranges fit, then dynamic INT8 on the recurrent layers it left in float.

        Measured on a real CRNN text recogniser (7 convolutions, 2 bidirectional LSTMs; AVX2, 1 thread): static
        INT8 alone 1.45x ONNX Runtime FP32 (the LSTMs, 30% of FP32's time, stay float), with the LSTMs in dynamic
        INT8 as well 2.05x, at the same fidelity (cosine 0.9935 and 0.9934). NNCF's static INT8 of the same LSTMs
        scores a cosine of -0.17.
        """
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = _hybrid_ops(src, opts)
        static = out.with_name(f"{out.stem}.static.onnx")
        notes = self._static(src, static, opts, calib)
        try:
            quantize_dynamic(str(static), str(out), op_types_to_quantize=ops, per_channel=False,
                             weight_type=QuantType.QInt8)  # fmt: skip
        finally:
            static.unlink(missing_ok=True)
        return (
            *notes,
            f"static INT8 (QDQ, MinMax, per-channel weights) where calibrated, then dynamic INT8 on {', '.join(ops)} "
            "(activation scales computed per call: a recurrent state has no fixed range to calibrate)",
        )

    def _dynamic(self, src: Path, out: Path, opts: dict[str, SettingValue]) -> tuple[str, ...]:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        wanted = [t.strip() for t in str(opts.get("op_types_to_quantize") or "").split(",") if t.strip()]
        usable = [t for t in wanted if t in IntegerOpsRegistry]
        model_ops = _op_types(src)
        override = f"recipe_options {{'{NAME}/<recipe>': {{op_types_to_quantize: '...'}}}}"
        if not set(usable) & model_ops:
            compute = sorted(model_ops & _COMPUTE_OPS) or sorted(model_ops)
            raise BackendError(
                f"nothing to quantize: the model has no {', '.join(usable or wanted) or 'listed'} op "
                f"(op_types_to_quantize='{opts.get('op_types_to_quantize')}'; the model computes with "
                f"{', '.join(compute)}; ORT quantizes dynamically only {', '.join(sorted(IntegerOpsRegistry))}); "
                f"to quantize Conv anyway set {override}"
            )
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=usable,
            per_channel=bool(opts["per_channel"]),
            weight_type=QuantType.QInt8,
        )
        if not _op_types(out) - model_ops:
            raise BackendError(
                f"nothing to quantize: quantize_dynamic changed no {', '.join(usable)} op (their weights must be "
                "initializers)"
            )
        notes = [f"dynamic INT8 on {', '.join(usable)}"]
        skipped = sorted(model_ops & {"Conv", "ConvTranspose"} - set(usable))
        if skipped:
            notes.append(
                f"{'/'.join(skipped)} left in float: ORT's ConvInteger has no fast CPU kernel (measured 4-8x slower "
                f"than FP32 here); override with {override.replace('...', 'Conv,MatMul')}"
            )
        ignored = [t for t in wanted if t not in IntegerOpsRegistry]
        if ignored:
            notes.append(f"ignored {', '.join(ignored)}: onnxruntime has no dynamic INT8 kernel for them")
        return tuple(notes)

    def _fp16(self, src: Path, out: Path) -> None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(src))
        converted = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(converted, str(out))


def _hybrid_ops(src: Path, opts: Mapping[str, SettingValue]) -> list[str]:
    """The recurrent op types of ``src`` that ``int8-hybrid`` quantizes dynamically; none is this recipe's failure."""
    wanted = [t.strip() for t in str(opts.get("dynamic_op_types") or "").split(",") if t.strip()]
    present = _op_types(src)
    ops = [t for t in wanted if t in present]
    if not ops:
        raise BackendError(
            f"nothing for dynamic INT8: the model has no {', '.join(wanted)} op (this recipe is static INT8 plus "
            "dynamic INT8 of recurrent layers; without them it is int8-static-qdq-minmax-perchannel)"
        )
    return ops


def _calibration_memo(src: Path, calib: Calibration, method: str, percentile: SettingValue) -> Path:
    """Where the activation ranges of ``src`` on ``calib`` by ``method`` are kept for the run's other recipes: the
    per-channel and per-tensor recipes of one calibration method quantize with the same activation ranges (they
    differ in the weights only), and calibrating is most of a static recipe's build."""
    ident = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (src, calib.dataset.path)]
    key = json.dumps([*ident, calib.batch_size, calib.limit, method, percentile])
    return src.parent / "_calibration" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _quantize_static(src: Path, out: Path, opts: dict[str, SettingValue], cache: Path, exclude: list[str]) -> None:
    """QDQ ``quantize_static`` from ranges already in ``cache`` (written by ``calibrate``); ``exclude`` stays float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[str(opts["calibration"])]
    quantize_static(
        str(src),
        str(out),
        None,
        quant_format=QuantFormat.QDQ,
        per_channel=bool(opts["per_channel"]),
        activation_type=QuantType.QUInt8 if opts["activation_type"] == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8 if opts["weight_type"] == "int8" else QuantType.QUInt8,
        nodes_to_exclude=list(exclude),
        calibrate_method=method,
        calibration_cache_path=str(cache),
    )


# -- int8-static-mixed ------------------------------------------------------------------------------------------

# Sessions of the search (scoring variants, ranking layers): a few threads, whatever the latency policy says.
_SEARCH_THREADS = max(1, min(4, os.cpu_count() or 1))


def _mixed(
    src: Path, out: Path, opts: dict[str, SettingValue], calib: Calibration, control: AccuracyControl
) -> tuple[str, ...]:
    """Quantize fully; if that misses the threshold, rank the compute layers by sensitivity and find the fewest
    most-sensitive layers to keep float (``nodes_to_exclude``) for the variant to meet it.

    The budget is checked between steps (a calibration chunk, a layer's measurement, a variant's build and score):
    past it, the best passing variant found so far is the candidate (its notes say the search was cut short); with
    none yet, a ``BackendError`` says how far it got.
    """
    from quantgate.plugins._ort_calibration import StreamingCalibrationReader, calibrate, unbounded_neighbours
    from quantgate.sensitivity import BudgetExhausted, Deadline, Scorer, rank_layers, search_float_layers

    deadline = Deadline(control.time_budget_s)

    def check() -> None:
        if deadline.expired():
            raise BudgetExhausted(f"{deadline.describe()} while calibrating; {_BUDGET_HINT}")

    reader = StreamingCalibrationReader(calib.dataset, batch_size=calib.batch_size, limit=calib.limit)
    ranges = calibrate(src, reader, str(opts["calibration"]), out.with_suffix(".calibration.json"), check=check)
    always_float = unbounded_neighbours(src, ranges.unbounded)
    variants = _Variants(
        src, out, opts, ranges.cache, always_float, Scorer(control, _first_output(src), calib.batch_size)
    )
    try:
        ranking_note = "the fully quantized model meets the threshold: no layer ranked"
        if variants.build_and_score(()) < variants.scorer.threshold:
            samples = min(int(opts["ranking_samples"] or 16), reader.n_samples)
            batches = [b.inputs for b in calib.dataset.batches(calib.batch_size, limit=samples)]
            variants.ranking = rank_layers(src, variants.path(()), batches, _SEARCH_THREADS, deadline)
            ranking_note = (
                f"ranked {len(variants.ranking)} quantized compute layers by the output error (1 - cosine vs FP32) "
                f"when only that layer is quantized, on {samples} calibration samples, in {deadline.elapsed_s:.1f} s"
            )
        outcome = search_float_layers(variants.ranking, variants.build_and_score, variants.scorer.threshold, deadline)
        if not outcome.passed:
            raise BackendError(_no_variant_reason(outcome, variants.scorer, len(variants.ranking)))
        variants.path(outcome.float_layers).replace(out)
    except BudgetExhausted as exc:
        raise BackendError(f"{exc}; {_BUDGET_HINT}") from None
    finally:
        ranges.cache.unlink(missing_ok=True)
        variants.discard()
    notes = _mixed_notes(outcome, variants, ranking_note)
    notes.append(f"{deadline.elapsed_s:.1f} s of a {control.time_budget_s:g} s budget")
    if always_float:
        notes.append(f"kept in float for infinite/sentinel activations (attention masks): {_names(always_float)}")
    if control.caveat:
        notes.append(control.caveat)
    log.info("%s: %s", MIXED, notes[0])
    return tuple(notes)


_BUDGET_HINT = "raise accuracy_control.time_budget_s or lower accuracy_control.samples"


class _Variants:
    """Builds and scores the variant that keeps given ranked layers float; keeps on disk only the smallest passing
    one (the search only ever looks for a smaller k), removes the rest as it goes."""

    def __init__(
        self, src: Path, out: Path, opts: dict[str, SettingValue], cache: Path, always_float: list[str], scorer: Scorer
    ) -> None:
        self.src, self.out, self.opts, self.cache = src, out, opts, cache
        self.always_float = always_float
        self.scorer = scorer
        self.ranking: list[LayerSensitivity] = []
        self.scores: dict[tuple[str, ...], float] = {}
        self._kept: dict[tuple[str, ...], Path] = {}

    def path(self, layers: tuple[str, ...]) -> Path:
        return self.out.with_name(f"{self.out.stem}.k{len(layers)}.onnx")

    def build_and_score(self, layers: tuple[str, ...]) -> float:
        if layers in self.scores:
            return self.scores[layers]
        units = {layer.node: layer.exclude or (layer.node,) for layer in self.ranking}
        exclude = dict.fromkeys([*self.always_float, *(n for layer in layers for n in units[layer])])
        path = self.path(layers)
        _quantize_static(self.src, path, self.opts, self.cache, list(exclude))
        score = self.scores[layers] = self.scorer.score(_first_output(path))
        keep = score >= self.scorer.threshold or not layers  # k=0 is what the ranking starts from
        if keep:
            if score >= self.scorer.threshold:
                self.discard()
            self._kept[layers] = path
        else:
            path.unlink(missing_ok=True)
        return score

    def discard(self) -> None:
        for path in self._kept.values():
            path.unlink(missing_ok=True)
        self._kept.clear()


def _mixed_notes(outcome: SearchOutcome, variants: _Variants, ranking_note: str) -> list[str]:
    by_node = {layer.node: layer for layer in variants.ranking}
    kept = [_describe_layer(by_node[name]) for name in outcome.float_layers]
    notes = [
        f"mixed precision: {len(kept)} of {len(variants.ranking)} ranked layers kept in float, most sensitive first "
        f"(error when only that layer is quantized): {', '.join(kept) or 'none'}",
        ranking_note,
        f"k search on {variants.scorer.describe()}: {_trace(outcome)}",
    ]
    if not outcome.complete:
        notes.append(f"search stopped early ({outcome.reason}): k={outcome.k} passes; a smaller k may pass too")
    return notes


def _first_output(path: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    runner = OrtRunner(path, _SEARCH_THREADS)
    return lambda inputs: runner.run(inputs)[0]


def _describe_layer(layer: LayerSensitivity) -> str:
    around = [n for n in layer.exclude if n != layer.node]
    return f"{layer.node} ({layer.error:.2e}" + (f"; with {', '.join(around)})" if around else ")")


def _trace(outcome: SearchOutcome) -> str:
    tried = ", ".join(f"k={k}: {score:.6f}" for k, score in outcome.trace)
    return f"{tried}; smallest passing k = {outcome.k}"


def _no_variant_reason(outcome: SearchOutcome, scorer: Scorer, ranked: int) -> str:
    tried = ", ".join(f"k={k}: {score:.6f}" for k, score in outcome.trace) or "nothing"
    if not outcome.complete:
        return f"{outcome.reason} before any variant met {scorer.describe()} (tried {tried}); {_BUDGET_HINT}"
    return (
        f"no variant meets {scorer.describe()}, not even with all {ranked} ranked layers in float (tried {tried}): "
        "the loss comes from the ops quantized between them; use a float recipe or relax the gate"
    )


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
