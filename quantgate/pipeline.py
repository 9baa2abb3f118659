"""The domain steps of one compression, as plain functions the Prefect flow calls (and tests call directly).

resolve -> intake -> load data -> per recipe: compress + validate + judge -> choose winner -> record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate import gate, registry
from quantgate.data import NpzDataset, resolve_data_uri
from quantgate.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    InvalidModel,
    NeedsTargetHardware,
    PolicyError,
)
from quantgate.gate import Check, Verdict
from quantgate.hardware import Hardware
from quantgate.intake import to_onnx
from quantgate.model import ModelInfo
from quantgate.plugins.base import (
    Backend,
    Calibration,
    Candidate,
    Recipe,
    Runner,
    load_backend,
    select_recipes,
)
from quantgate.policy import Policy
from quantgate.result import CandidateResult
from quantgate.validators.base import (
    EvalOutputs,
    ValidationContext,
    Validator,
    collect_outputs,
    load_validators,
)

log = logging.getLogger("quantgate")

DATA_TAGS = {"calibration": "quantgate.calibration", "evaluation": "quantgate.evaluation"}


@dataclass(frozen=True)
class Intake:
    model: ModelInfo
    flavor: str


@dataclass(frozen=True)
class DataSets:
    calibration: NpzDataset
    evaluation: NpzDataset
    calibration_uri: str
    evaluation_uri: str


def intake(source: registry.SourceVersion, workdir: Path) -> Intake:
    """Download the pinned version into ``workdir`` and turn it into an ONNX file we can load."""
    log.info("downloading %s", source.uri)
    local = registry.download(source, workdir / "source")
    model, flavor = to_onnx(local, workdir / "intake")
    from quantgate.plugins.onnxruntime import OrtRunner

    try:
        OrtRunner(model.path, threads=1)
    except BackendError as exc:
        raise InvalidModel(f"{source.uri}: {exc}") from None
    log.info("intake: %s flavor, inputs %s", flavor, ", ".join(t.describe() for t in model.inputs))
    return Intake(model, flavor)


def _data_uri(role: str, policy: Policy, source: registry.SourceVersion) -> str:
    uri = getattr(policy.data, role)
    if uri:
        return str(uri)
    tagged = source.tags.get(DATA_TAGS[role])
    if tagged:
        return tagged
    raise DataError(
        f"no {role} data: set data.{role} in the policy or tag {source.uri} with {DATA_TAGS[role]}=<uri of a .npz>"
    )


def load_data(policy: Policy, source: registry.SourceVersion, model: ModelInfo, workdir: Path) -> DataSets:
    """Find, fetch and check both data sets against the model's inputs before anything is compressed."""
    calib_uri = _data_uri("calibration", policy, source)
    eval_uri = _data_uri("evaluation", policy, source)
    calib = NpzDataset.open(resolve_data_uri(calib_uri, workdir / "data" / "calibration"))
    calib.check_against(model.inputs, role="calibration")
    evaluation = NpzDataset.open(resolve_data_uri(eval_uri, workdir / "data" / "evaluation"))
    evaluation.check_against(model.inputs, role="evaluation")
    if not evaluation.has_labels and policy.gate.min_fidelity is None:
        raise PolicyError(
            "nothing to prove quality with: the evaluation data has no 'labels' array and gate.min_fidelity is not set"
        )
    return DataSets(calib, evaluation, calib_uri, eval_uri)


@dataclass(frozen=True)
class PlannedRecipe:
    backend: str
    recipe: Recipe | None  # None: the backend itself is unavailable
    unavailable: str = ""
    prepare_only: bool = False  # the backend cannot run here; only its host-independent step runs


def plan(policy: Policy, model: ModelInfo, backends: tuple[str, ...] | None = None) -> list[PlannedRecipe]:
    """Every (backend, recipe) pair the policy asks for, in policy order.

    ``backends``: only these (a target pool's step); the recipe names were checked against all of them by the parent.
    """
    out: list[PlannedRecipe] = []
    known: set[str] = set()
    for name in backends if backends is not None else policy.backends:
        try:
            backend = load_backend(name)
        except BackendUnavailable as exc:
            out.append(PlannedRecipe(name, None, str(exc)))
            continue
        status = backend.available()
        hint = f" ({status.hint})" if status.hint else ""
        reason = f"backend '{name}' is unavailable: {status.reason}{hint}"
        if not status.ok and not status.prepares_here:
            out.append(PlannedRecipe(name, None, reason))
            continue
        known.update(r.name for r in backend.recipes(model))
        prepare_only = not status.ok
        out.extend(
            PlannedRecipe(name, r, reason if prepare_only else "", prepare_only)
            for r in select_recipes(backend, model, policy.recipes)
        )
    if policy.recipes is not None and backends is None:
        unknown = sorted(set(policy.recipes) - known)
        if unknown and known:
            raise PolicyError(f"unknown recipe(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
    if not any(p.recipe for p in out) and not any(p.unavailable for p in out):
        raise PolicyError("the policy selects no recipe to run")
    return out


@dataclass
class Baseline:
    """The FP32 model on one backend's runtime, with its evaluation outputs computed once.

    ``reference`` is the ONNX Runtime FP32 runner when this backend is another runtime: candidates are timed
    against it too, so candidates of different runtimes can be ranked on one scale.
    """

    backend: Backend
    candidate: Candidate
    runner: Runner
    outputs: EvalOutputs
    reference: Runner | None = None


def baseline_for(
    backend_name: str,
    model: ModelInfo,
    data: DataSets,
    policy: Policy,
    workdir: Path,
    reference: Baseline | None = None,
) -> Baseline:
    """Build and run the FP32 baseline; a baseline that cannot be built or run is a ``BackendError``."""
    backend = load_backend(backend_name)
    try:
        cand = backend.baseline(model, workdir / backend_name)
        runner = backend.runner(cand, threads=policy.latency.threads)
        outputs = collect_outputs(runner, data.evaluation, policy.data.evaluation_samples)
    except BackendUnavailable as exc:
        raise BackendError(str(exc)) from None
    except BackendError as exc:
        raise BackendError(f"the FP32 baseline failed on {backend_name}: {exc}") from None
    _configure_accuracy_control(backend, data, policy)
    ref = reference.runner if reference is not None and reference.backend is not backend else None
    return Baseline(backend, cand, runner, outputs, ref)


def _configure_accuracy_control(backend: Backend, data: DataSets, policy: Policy) -> None:
    """Hand accuracy-aware recipes the gate's own threshold, so they restore float layers until the gate passes."""
    configure = getattr(backend, "configure_accuracy_control", None)
    if configure is None:
        return
    gate_cfg = policy.gate
    if data.evaluation.has_labels and gate_cfg.max_accuracy_drop is not None:
        metric, max_drop = "accuracy", gate_cfg.max_accuracy_drop
    elif gate_cfg.min_fidelity is not None:
        metric, max_drop = "fidelity", 1.0 - gate_cfg.min_fidelity
    else:
        return  # nothing to control against: the recipe fails with its own reason
    validation, caveat = accuracy_control_data(data, metric)
    ac = policy.accuracy_control
    configure(validation, metric, max_drop, ac.time_budget_s, limit=ac.samples, caveat=caveat)


def accuracy_control_data(data: DataSets, metric: str) -> tuple[NpzDataset, str]:
    """What accuracy control tunes on, and what a reader must know about it.

    Not the gate's evaluation set when avoidable: tuning on the samples the gate then scores makes the gate's
    verdict on that candidate optimistic. Fidelity needs no labels, so the calibration set serves; top-1 needs
    labels, so the calibration set serves only when it has them.
    """
    if metric == "fidelity" or data.calibration.has_labels:
        return data.calibration, ""
    return data.evaluation, (
        "tuned on the evaluation samples the gate also scores (the calibration set has no labels), so its "
        "accuracy check is optimistic; add a 'labels' array to the calibration data to keep them apart"
    )


def failed_result(recipe: Recipe, reason: str, hardware: Hardware, has_labels: bool, policy: Policy) -> CandidateResult:
    verdict = gate.judge({}, policy.gate, has_labels=has_labels, error=reason)
    return CandidateResult(recipe, {}, verdict, hardware)


@dataclass
class CandidateRun:
    result: CandidateResult
    compress_s: float = 0.0
    validate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(
    base: Baseline,
    recipe: Recipe,
    model: ModelInfo,
    data: DataSets,
    policy: Policy,
    hardware: Hardware,
    workdir: Path,
    validators: list[Validator] | None = None,
) -> CandidateRun:
    """Compress with one recipe, measure it against the baseline, and judge it. Never raises BackendError."""
    t0 = time.perf_counter()
    calib = Calibration(data.calibration, policy.data.calibration_batch_size, policy.data.calibration_samples)
    try:
        cand = base.backend.compress(model, recipe, calib, workdir / recipe.backend / recipe.name)
        runner = base.backend.runner(cand, threads=policy.latency.threads)
    except (BackendError, BackendUnavailable) as exc:  # one recipe's failure: the others go on
        log.info("%s/%s failed to build: %s", recipe.backend, recipe.name, exc)
        failed = failed_result(recipe, str(exc), hardware, data.evaluation.has_labels, policy)
        return CandidateRun(failed, time.perf_counter() - t0)
    t1 = time.perf_counter()
    ctx = _context(base, cand, runner, data, policy, hardware)
    metrics, details = _measure(validators if validators is not None else load_validators(), ctx)
    verdict = gate.judge(metrics, policy.gate, has_labels=data.evaluation.has_labels)
    result = CandidateResult(
        recipe, metrics, verdict, hardware, artifact=cand.artifact, notes=list(cand.notes), details=details
    )
    log.info(
        "%s/%s: %s (speedup %.2fx)",
        recipe.backend,
        recipe.name,
        "passed" if verdict.passed else "failed",
        metrics.get("speedup", 0.0),
    )
    return CandidateRun(result, t1 - t0, time.perf_counter() - t1)


def _context(
    base: Baseline, cand: Candidate, runner: Runner, data: DataSets, policy: Policy, hardware: Hardware
) -> ValidationContext:
    return ValidationContext(
        baseline=base.candidate,
        candidate=cand,
        baseline_runner=base.runner,
        candidate_runner=runner,
        evaluation=data.evaluation,
        baseline_outputs=base.outputs,
        latency=policy.latency,
        hardware=hardware,
        eval_limit=policy.data.evaluation_samples,
        reference_runner=base.reference,
    )


def _measure(validators: list[Validator], ctx: ValidationContext) -> tuple[dict[str, float], dict[str, object]]:
    """Every applicable validator's metrics, merged, and its details by validator name."""
    metrics: dict[str, float] = {}
    details: dict[str, object] = {}
    for validator in validators:
        if validator.applies(ctx):
            measurement = validator.measure(ctx)
            metrics.update(measurement.metrics)
            details[measurement.validator] = measurement.details
    return metrics, details


QUALITY_VALIDATORS = ("accuracy", "fidelity", "size")


def evaluate_prepared(
    planned: PlannedRecipe,
    reference: Baseline,
    model: ModelInfo,
    data: DataSets,
    policy: Policy,
    hardware: Hardware,
    workdir: Path,
    validators: list[Validator],
) -> CandidateRun:
    """A recipe whose backend cannot run on this host: run its host-independent step, check the quality of what it
    produced on ONNX Runtime here, and fail it with the hardware it needs. Latency is never measured off-target."""
    assert planned.recipe is not None
    recipe = planned.recipe
    t0 = time.perf_counter()
    calib = Calibration(data.calibration, policy.data.calibration_batch_size, policy.data.calibration_samples)
    has_labels = data.evaluation.has_labels
    try:
        built = load_backend(planned.backend).compress(model, recipe, calib, workdir / recipe.backend / recipe.name)
    except NeedsTargetHardware as exc:
        needs = exc
    except (BackendError, BackendUnavailable) as exc:
        return CandidateRun(failed_result(recipe, str(exc), hardware, has_labels, policy), time.perf_counter() - t0)
    else:  # the backend became able to run here mid-run (a GPU appeared?): no baseline was built for it
        reason = f"{recipe.backend} became available mid-run ({built.artifact.name}); run again to measure it"
        return CandidateRun(failed_result(recipe, reason, hardware, has_labels, policy), time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        from quantgate.plugins.onnxruntime import OrtRunner

        runner = OrtRunner(needs.artifact, threads=policy.latency.threads)
    except BackendError as exc:
        reason = f"the prepared ONNX does not run on ONNX Runtime: {exc}"
        return CandidateRun(failed_result(recipe, reason, hardware, has_labels, policy), t1 - t0)
    ctx = _context(reference, Candidate(recipe, needs.artifact, needs.notes), runner, data, policy, hardware)
    metrics, details = _measure([v for v in validators if v.name in QUALITY_VALIDATORS], ctx)
    quality_gate = policy.gate.model_copy(update={"min_speedup": None, "max_size_ratio": None})
    quality = gate.judge(metrics, quality_gate, has_labels=has_labels)
    checks = (*quality.checks, Check("target", False, str(needs)))
    notes = [*needs.notes, "quality measured with ONNX Runtime on this host; latency is measured on the target only"]
    result = CandidateResult(
        recipe, metrics, Verdict(False, checks), hardware, artifact=None, notes=notes, details=details
    )
    return CandidateRun(result, t1 - t0, time.perf_counter() - t1)


def unavailable_result(planned: PlannedRecipe, hardware: Hardware, has_labels: bool, policy: Policy) -> CandidateResult:
    recipe = Recipe.make(planned.backend, "(backend unavailable)", "none")
    return failed_result(recipe, planned.unavailable, hardware, has_labels, policy)


def promote(results: list[CandidateResult]) -> CandidateResult | None:
    """Mark and return the fastest passing candidate."""
    index = gate.choose_winner([(r.verdict, r.metrics) for r in results])
    if index is None:
        return None
    results[index].promoted = True
    return results[index]
