"""The domain steps of one compression, as plain functions the Prefect flow calls (and tests call directly).

resolve -> intake -> load data -> per recipe: compress + validate + judge -> choose winner -> record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantgate import faults, gate, names, qat, registry, search
from quantgate.build import BuildJob, BuildTimeout, BuildWorker, WorkerDied, build
from quantgate.cache import CandidateCache, RunKey
from quantgate.data import NpzDataset, check_values, resolve_data_uri
from quantgate.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    InvalidModel,
    NeedsTargetHardware,
    PolicyError,
    QuantgateError,
    raise_if_infrastructure,
)
from quantgate.gate import Verdict
from quantgate.hardware import Hardware
from quantgate.intake import to_onnx
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import (
    Backend,
    Calibration,
    Candidate,
    Recipe,
    Runner,
    SpecializesShapes,
    first_line,
    fresh_backend,
    load_backend,
    reference_name,
    select_recipes,
    set_build_progress,
)
from quantgate.policy import Policy
from quantgate.result import CandidateResult
from quantgate.search import Budget, ProgressEvent, report_progress
from quantgate.sensitivity import AccuracyControl, Metric
from quantgate.validators.base import (
    EVAL_BATCH,
    EvalOutputs,
    LatencyTarget,
    ValidationContext,
    Validator,
    collect_outputs,
    load_validators,
    publish,
)
from quantgate.validators.latency import (
    Block,
    choose_blocks,
    latency_batch,
    measure_blocked,
    paired_speedup,
    probe_speed,
    speedup_ci,
)

log = logging.getLogger("quantgate")


@dataclass(frozen=True)
class Intake:
    model: ModelInfo
    flavor: str
    source_dir: Path | None = None  # the downloaded version (quantization-aware training reads its torch program)


@dataclass(frozen=True)
class DataSets:
    calibration: NpzDataset
    evaluation: NpzDataset
    calibration_uri: str
    evaluation_uri: str
    training: NpzDataset | None = None  # what quantization-aware training fine-tunes on (policy data.training)
    training_uri: str = ""


def intake(source: registry.SourceVersion, workdir: Path, *, allow_pickle: bool = False) -> Intake:
    """Download the pinned version into ``workdir`` and turn it into an ONNX file we can load.

    ``allow_pickle``: the policy's ``intake.allow_pickle`` (pickled models load in an isolated process).
    """
    log.info("downloading %s", source.uri)
    local = registry.download(source, workdir / "source")
    model, flavor = to_onnx(local, workdir / "intake", allow_pickle=allow_pickle)
    from quantgate.plugins.onnxruntime import OrtRunner

    try:
        OrtRunner(model.path, threads=1)
    except BackendError as exc:
        raise InvalidModel(f"{source.uri}: {exc}") from None
    log.info("intake: %s flavor, inputs %s", flavor, ", ".join(t.describe() for t in model.inputs))
    return Intake(replace(model, flavor=flavor, source_dir=local), flavor, local)


def _data_uri(role: str, policy: Policy, source: registry.SourceVersion) -> str:
    uri = getattr(policy.data, role)
    if uri:
        return str(uri)
    tagged = source.tags.get(names.DATA_TAGS[role])
    if tagged:
        return tagged
    tag = names.DATA_TAGS[role]
    raise DataError(f"no {role} data: set data.{role} in the policy or tag {source.uri} with {tag}=<uri of a .npz>")


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
    cfg = policy.data
    classes = output_classes(model, evaluation) if evaluation.has_labels or calib.has_labels else None
    roles = (("calibration", calib, cfg.calibration_samples), ("evaluation", evaluation, cfg.evaluation_samples))
    for role, ds, limit in roles:
        check_values(ds, role=role, limit=limit, n_classes=classes, allow_non_finite=cfg.allow_non_finite)
    training, training_uri = None, cfg.training or ""
    if training_uri:
        training = NpzDataset.open(resolve_data_uri(training_uri, workdir / "data" / "training", role="training"))
        training.check_against(model.inputs, role="training")
        check_values(training, role="training", limit=None, n_classes=classes, allow_non_finite=cfg.allow_non_finite)
    return DataSets(calib, evaluation, calib_uri, eval_uri, training, training_uri)


def output_classes(model: ModelInfo, evaluation: NpzDataset) -> int:
    """How many classes top-1 picks from: the first output's second axis (run once on a sample when dynamic)."""
    first = model.outputs[0]
    if len(first.shape) == 2 and first.shape[1] is not None:
        return int(first.shape[1])
    from quantgate.plugins.onnxruntime import OrtRunner

    try:
        scores = OrtRunner(model.path, threads=1).run(evaluation.take(1).inputs)[0]
    except BackendError as exc:
        raise InvalidModel(f"the model does not run on an evaluation sample: {exc}") from None
    if scores.ndim != 2:
        raise DataError(
            f"the evaluation data has 'labels', but the model's first output '{first.name}' has shape "
            f"{list(scores.shape)}: top-1 needs [samples, classes] scores (drop 'labels' and gate on fidelity)"
        )
    return int(scores.shape[1])


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
        offered = backend.recipes(model)
        fine_tuned = qat.offered(backend, model)  # only when named: otherwise only when PTQ cannot hold the gate
        known.update(r.name for r in [*offered, *fine_tuned])
        _check_recipe_options(policy, name, [*offered, *fine_tuned])
        prepare_only = not status.ok
        named = [r for r in fine_tuned if policy.recipes is not None and r.name in policy.recipes]
        out.extend(
            PlannedRecipe(name, with_options(r, policy), reason if prepare_only else "", prepare_only)
            for r in [*select_recipes(backend, model, policy.recipes), *named]
        )
    if policy.recipes is not None and backends is None:
        unknown = sorted(set(policy.recipes) - known)
        if unknown and known:
            raise PolicyError(f"unknown recipe(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
    if not any(p.recipe for p in out) and not any(p.unavailable for p in out):
        raise PolicyError("the policy selects no recipe to run")
    return out


def with_options(recipe: Recipe, policy: Policy) -> Recipe:
    """The recipe with the policy's ``recipe_options`` for it applied (its hash follows its settings)."""
    override = policy.recipe_options.get(f"{recipe.backend}/{recipe.name}")
    if not override:
        return recipe
    return Recipe.make(recipe.backend, recipe.name, recipe.precision, **(recipe.options | override))


def _check_recipe_options(policy: Policy, backend: str, offered: list[Recipe]) -> None:
    by_name = {r.name: r for r in offered}
    for key, override in policy.recipe_options.items():
        owner, _, name = key.partition("/")
        if owner != backend:
            continue
        if name not in by_name:
            raise PolicyError(f"recipe_options.{key}: {backend} has no recipe '{name}'; it has {', '.join(by_name)}")
        unknown = sorted(set(override) - set(by_name[name].options))
        if unknown:
            settings = ", ".join(sorted(by_name[name].options)) or "none"
            raise PolicyError(f"recipe_options.{key}: unknown setting(s) {', '.join(unknown)} (settings: {settings})")


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
    tuning: AccuracyControl | None = None  # what accuracy-aware recipes tune against (None: nothing to tune against)


def baseline_for(
    backend_name: str,
    model: ModelInfo,
    data: DataSets,
    policy: Policy,
    workdir: Path,
    reference: Baseline | None = None,
) -> Baseline:
    """Build and run the FP32 baseline; a baseline that cannot be built or run is a ``BackendError``."""
    backend = fresh_backend(backend_name)  # the run configures it (accuracy control, fine-tuning) before building
    try:
        cand = backend.baseline(model, workdir / backend_name)
        runner = backend.runner(cand, threads=policy.latency.threads)
        outputs = collect_outputs(runner, data.evaluation, policy.data.evaluation_samples)
    except BackendUnavailable as exc:
        raise BackendError(str(exc)) from None
    except BackendError as exc:
        raise_if_infrastructure(exc, f"the FP32 baseline on {backend_name}")
        raise BackendError(f"the FP32 baseline failed on {backend_name}: {exc}") from None
    ref = reference.runner if reference is not None and reference.backend is not backend else None
    return Baseline(backend, cand, runner, outputs, ref, tuning_for(data, policy))


def tuning_for(data: DataSets, policy: Policy) -> AccuracyControl | None:
    """What accuracy-aware recipes get: the gate's own threshold, so they restore float layers until it passes."""
    gate_cfg = policy.gate
    metric: Metric
    # With both thresholds, fidelity: it needs no labels, so it tunes on the calibration set and never on the
    # samples the gate then scores, and a cosine threshold is the stricter of the two in practice (the real PP-OCR
    # classifier's full INT8 gained 1.3 points of top-1 at a cosine of 0.986: tuned on top-1, the search kept no
    # layer in float and the candidate failed the gate's 0.99).
    if gate_cfg.min_fidelity is not None:
        metric, max_drop = "fidelity", 1.0 - gate_cfg.min_fidelity
    elif data.evaluation.has_labels and gate_cfg.max_accuracy_drop is not None:
        metric, max_drop = "accuracy", gate_cfg.max_accuracy_drop
    else:
        return None  # nothing to control against: those recipes fail with their own reason
    validation, caveat = accuracy_control_data(data, metric)
    ac = policy.accuracy_control
    return AccuracyControl(validation, metric, max_drop, ac.time_budget_s, ac.samples, caveat)


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


def failed_result(recipe: Recipe, reason: str, hardware: Hardware) -> CandidateResult:
    """A candidate that was never measured: its build, its backend or its step failed, for ``reason``."""
    return CandidateResult(recipe, {}, gate.failed(reason), hardware)


@dataclass
class CandidateRun:
    result: CandidateResult
    compress_s: float = 0.0
    validate_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchState:
    """What the search knows while it goes: the budget, the best so far, where builds run, the cache, progress."""

    budget: Budget
    exhaustive: bool = True
    quick_samples: int | None = None
    best_vs_reference: float | None = None
    timed: list[tuple[Recipe, float]] = field(default_factory=list)  # (recipe, CI high vs the reference) so far
    quality_failed: int = 0
    quality_passed: int = 0
    probed: set[tuple[str, str, str]] = field(default_factory=set)  # families timed after a quality failure
    # Families whose full INT8 (not a float-restoring search) failed quality: the upper end of their measured speed.
    failed_families: dict[tuple[str, str, str], float] = field(default_factory=dict)
    attempted: set[tuple[str, str, str]] = field(default_factory=set)  # families with a recipe built (or tried)
    floor: float | None = None  # the gate's speed threshold against the reference runtime (search.speed_floor)
    passed: list[Recipe] = field(default_factory=list)  # the recipes that passed the gate so far
    worker: BuildWorker | None = None
    cache: CandidateCache | None = None
    run_key: RunKey | None = None
    index: int = 0
    total: int = 0
    qat: qat.Context | None = None  # set when the run may fine-tune (a pytorch source)
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    @classmethod
    def for_policy(cls, policy: Policy, total: int, model_bytes: int = 0) -> SearchState:
        """``model_bytes``: the model's size, which the default (``auto``) budget grows with."""
        cfg = policy.search
        if cfg.exhaustive:
            return cls(Budget(None), exhaustive=True, total=total)
        return cls(
            Budget(search.budget_seconds(cfg.time_budget_s, model_bytes)),
            exhaustive=False,
            quick_samples=cfg.quick_samples,
            total=total,
            floor=search.speed_floor(policy),
        )

    def pick(self, pending: Sequence[search.Planned]) -> int:
        """The position in ``pending`` of the recipe to try next (``search.next_index`` with what is known)."""
        return search.next_index(
            pending,
            quality_failed=self.quality_failed,
            quality_passed=self.quality_passed,
            failed_families=self.failed_families,
            best=self.best_vs_reference,
            attempted=self.attempted,
            floor=self.floor,
            passed=self.passed,
        )

    def emit(self, stage: str, label: str) -> None:
        event = ProgressEvent(stage, self.index, self.total, label, self.budget.used, self.budget.seconds)
        report_progress(event)
        for listener in self.listeners:
            listener(event)


def evaluate(
    base: Baseline,
    recipe: Recipe,
    model: ModelInfo,
    data: DataSets,
    policy: Policy,
    hardware: Hardware,
    workdir: Path,
    validators: list[Validator] | None = None,
    state: SearchState | None = None,
    prebuilt: Candidate | None = None,
) -> CandidateRun:
    """Compress with one recipe, then measure it in stages against the baseline, and judge it.

    ``prebuilt``: the candidate already exists (a shape-specialized variant of a measured one): nothing is built.

    Stages: build; quick quality on a few samples; full quality; latency (only after quality passed), each of which
    may end the candidate as failed or skipped with the reason. Never raises BackendError.
    """
    state = state or SearchState(Budget(None))
    validators = validators if validators is not None else load_validators()
    has_labels = data.evaluation.has_labels
    label = f"{recipe.backend}/{recipe.name}"
    t0 = time.perf_counter()
    tuning = _tuning_record(base, recipe)
    key = state.run_key.for_recipe(recipe, tuning) if state.run_key is not None else None
    if state.cache is not None and key is not None:
        cached = _from_cache(state, key, policy, has_labels, validators)
        if cached is not None:
            log.info("%s: measured before (cache), re-gated", label)
            return CandidateRun(cached, extra={"cached": True})
    if state.budget.exhausted:
        why = f"not tried: the search budget was spent ({state.budget.describe()})"
        return CandidateRun(skipped_result(recipe, why, hardware, policy))
    hopeless = None
    # A recipe the policy names is measured (budget allowing): pruning is for the search's own menu.
    if not state.exhaustive and not policy.recipes:
        score = search.model_prior(recipe, model)
        hopeless = search.cannot_beat(
            recipe, state.timed, state.best_vs_reference, passed=state.passed, prior_score=score, floor=state.floor
        )
    if hopeless is not None:
        return CandidateRun(skipped_result(recipe, hopeless, hardware, policy))
    state.attempted.add(search.family(recipe))
    state.emit("build", label)
    try:
        cand = prebuilt if prebuilt is not None else _build(base, recipe, model, data, policy, workdir, state)
        _trial(base, cand, data, policy, state)
        runner = open_runner(base.backend, cand, policy.latency.threads)
    except BuildTimeout as exc:
        return CandidateRun(skipped_result(recipe, str(exc), hardware, policy), time.perf_counter() - t0)
    except (BackendError, BackendUnavailable) as exc:  # one recipe's failure: the others go on
        raise_if_infrastructure(exc, label)
        log.info("%s failed to build: %s", label, exc)
        failed = failed_result(recipe, str(exc), hardware)
        return CandidateRun(failed, time.perf_counter() - t0)
    t1 = time.perf_counter()
    run = _validate(base, cand, runner, data, policy, hardware, validators, state)
    run.compress_s, run.validate_s = t1 - t0, time.perf_counter() - t1
    result = run.result
    log.info("%s: %s (speedup %.2fx)", label, _status(result.verdict), result.metrics.get("speedup", 0.0))
    if state.cache is not None and key is not None and not result.verdict.skipped:
        state.cache.put(key, result, cand.files or (cand.artifact,))
    return run


@dataclass(frozen=True)
class TrialJob:
    """A candidate's first calls, at every batch size this process will call it with (``trial_run``)."""

    backend: str
    candidate: Candidate
    evaluation: NpzDataset
    batch_sizes: tuple[int, ...]
    threads: int


def trial_run(job: TrialJob) -> None:
    """Open the candidate's runtime and call it once at each batch size: in the build worker, so that a runtime
    that crashes in native code on an artifact ends a process the run replaces, not the run (OpenVINO 2026.4 died
    with SIGSEGV here on an NNCF ``mixed``-preset INT8 MobileNetV2 at batch 1 and 2, and ran it at 4 and 8)."""
    faults.point("candidate_trial")
    runner = open_runner(fresh_backend(job.backend), job.candidate, job.threads)
    for size in job.batch_sizes:
        with _runtime_failures(job.backend, job.candidate.recipe.name, f" at batch {size}"):
            runner.run(latency_batch(job.evaluation, size))


def trial_batch_sizes(n_samples: int, limits: Sequence[int | None], latency_sizes: Sequence[int]) -> tuple[int, ...]:
    """The batch sizes a candidate is called with in this process: evaluation batches of ``EVAL_BATCH`` and the
    remainder for each sample limit (quick check, full evaluation), and every latency batch size."""
    sizes = set(latency_sizes)
    for limit in limits:
        k = n_samples if limit is None else min(limit, n_samples)
        if k > 0:
            sizes.add(min(EVAL_BATCH, k))
            if k % EVAL_BATCH and k > EVAL_BATCH:
                sizes.add(k % EVAL_BATCH)
    return tuple(sorted(sizes))


def _trial(base: Baseline, cand: Candidate, data: DataSets, policy: Policy, state: SearchState) -> None:
    """``trial_run`` in the run's worker, where it has one; a crash there (a fatal signal) fails the candidate, in
    one line."""
    if state.worker is None or state.budget.exhausted:  # past the budget, evaluate() skips it unmeasured anyway
        return
    limits = [policy.data.evaluation_samples]
    if not state.exhaustive and state.quick_samples is not None:
        limits.append(state.quick_samples)
    sizes = trial_batch_sizes(data.evaluation.n_samples, limits, policy.latency.batch_sizes)
    job = TrialJob(base.backend.name, cand, data.evaluation, sizes, policy.latency.threads)
    label = f"{base.backend.name}/{cand.recipe.name}"
    try:
        state.worker.call(trial_run, job, state.budget.remaining, what=f"the first calls of {label}")
    except WorkerDied as exc:
        if not exc.crashed:  # killed from outside or out of memory: the host's trouble, not this artifact's
            raise
        raise BackendError(
            f"{base.backend.name} crashed running its {cand.recipe.name} artifact ({exc.describe()}), tried at batch "
            f"sizes {', '.join(map(str, sizes))} in the build process first, so not run in this one"
        ) from None


def open_runner(backend: Backend, cand: Candidate, threads: int) -> Runner:
    """The backend's runner for ``cand``; a runtime that cannot open what its backend built fails that candidate.

    Built-in backends raise ``BackendError`` themselves; a plugin's runtime may raise anything, and one plugin's
    artifact must not end a run that other backends' candidates are part of.
    """
    with _runtime_failures(backend.name, cand.recipe.name):
        return backend.runner(cand, threads=threads)


@contextmanager
def _runtime_failures(backend: str, recipe: str, where: str = "") -> Iterator[None]:
    """Whatever a runtime raises opening or running one artifact fails that candidate (``BackendError``), unless it
    is the host's trouble (``raise_if_infrastructure``) or already one of ours."""
    try:
        yield
    except (QuantgateError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise_if_infrastructure(exc, f"{backend}/{recipe}")
        raise BackendError(f"{backend} cannot run its {recipe} artifact{where}: {first_line(exc)}") from exc


def _validate(
    base: Baseline,
    cand: Candidate,
    runner: Runner,
    data: DataSets,
    policy: Policy,
    hardware: Hardware,
    validators: list[Validator],
    state: SearchState,
) -> CandidateRun:
    recipe, has_labels = cand.recipe, data.evaluation.has_labels
    label = f"{recipe.backend}/{recipe.name}"

    def result(metrics: dict[str, float], verdict: Verdict, details: dict[str, object], *extra: str) -> CandidateRun:
        notes = [*cand.notes, *_validator_notes(details), *extra]
        details = {**cand.details, **details}
        metrics = {**qat.metrics(cand.details), **metrics}
        return CandidateRun(
            CandidateResult(recipe, metrics, verdict, hardware, artifact=cand.artifact, notes=notes, details=details)
        )

    n_eval = data.evaluation.n_samples if policy.data.evaluation_samples is None else policy.data.evaluation_samples
    if state.budget.exhausted:  # the build (or opening its runtime) ended past the budget
        why = f"quality not measured: the search budget was spent ({state.budget.describe()})"
        return result({}, gate.skip(why), {})
    if not state.exhaustive and state.quick_samples is not None and state.quick_samples < n_eval:
        state.emit("quick", label)
        t_quick = state.budget.used
        quick = search.quick_check(
            base.outputs, collect_outputs(runner, data.evaluation, state.quick_samples), policy, has_labels=has_labels
        )
        if quick.far_outside:
            state.quality_failed += 1
            probed, note = _probe(base, runner, data, policy, state, recipe)
            return result(probed, gate.skip(quick.detail), {}, *note)
        # The full evaluation cannot be stopped half way (a partial score gates nothing), so it does not start where
        # the quick check says it would end past the budget: the run would overrun by the whole evaluation.
        projected = (state.budget.used - t_quick) * n_eval / state.quick_samples
        if projected > state.budget.remaining:
            why = (
                f"quality not measured: all {n_eval} samples would take about {projected:.0f} s (the quick check's "
                f"pace), more than the {state.budget.remaining:.0f} s left ({state.budget.describe()})"
            )
            return result({}, gate.skip(why), {})
    if state.budget.exhausted:
        why = f"quality not measured: the search budget was spent ({state.budget.describe()})"
        return result({}, gate.skip(why), {})
    state.emit("quality", label)
    target = None
    if not state.exhaustive:
        min_speedup = policy.gate.min_speedup if policy.gate.speedup_on == "warm" else None
        target = LatencyTarget(
            min_speedup,
            state.best_vs_reference,
            gate_on_reference=policy.gate.speedup_against == "reference",
            deadline=state.budget.deadline,
        )
    ctx = _context(base, cand, runner, data, policy, hardware, target=target)
    quality_validators = [v for v in validators if v.name != LATENCY]
    metrics, details = _measure(quality_validators, ctx)
    only = [v.name for v in quality_validators]
    quality = gate.judge(metrics, policy.gate, has_labels=has_labels, validators=validators, only=only)
    if not quality.passed:
        state.quality_failed += 1
        probed, note = _probe(base, runner, data, policy, state, recipe)
        if not note:
            note = ("latency not measured: the candidate failed on quality",)
        return result(metrics | probed, quality, details, *note)
    state.quality_passed += 1
    if state.budget.exhausted:
        why = f"latency not measured: the search budget was spent ({state.budget.describe()})"
        return result(metrics, gate.skip(why, quality), details)
    state.emit("latency", label)
    more, more_details = _measure([v for v in validators if v.name == LATENCY], ctx)
    metrics.update(more)
    details.update(more_details)
    verdict = gate.judge(metrics, policy.gate, has_labels=has_labels, validators=validators)
    _record_timing(state, recipe, metrics, verdict)
    return result(metrics, verdict, details)


def _probe(
    base: Baseline, runner: Runner, data: DataSets, policy: Policy, state: SearchState, recipe: Recipe
) -> tuple[dict[str, float], tuple[str, ...]]:
    """A short timing of a candidate that failed on quality, once per family: what its family runs at here.

    Never gated on. It is what tells the search whether calibrating otherwise or restoring float layers in this
    family could still beat the best candidate so far (``search.cannot_beat``), and it costs a few seconds where
    one more build of a hopeless family would cost tens.
    """
    fam = search.family(recipe)
    if state.exhaustive or fam in state.probed or state.budget.exhausted:
        return {}, ()
    reference = base.reference if base.reference is not None else base.runner
    if base.reference is None and base.backend.name != reference_name():
        return {}, ()
    state.probed.add(fam)
    inputs = latency_batch(data.evaluation, policy.latency.batch_sizes[0])
    probe = probe_speed(reference, runner, inputs, policy.latency)
    state.timed.append((recipe, probe.ci_high))
    if recipe.options.get("kind") not in search.RESTORING_KINDS:
        state.failed_families[fam] = probe.ci_high
    metrics = {
        "probe_speedup_vs_ort_fp32": probe.speedup,
        "probe_speedup_vs_ort_fp32_ci_low": probe.ci_low,
        "probe_speedup_vs_ort_fp32_ci_high": probe.ci_high,
    }
    note = (
        f"failed on quality, then timed briefly ({probe.blocks} blocks, never gated on) to learn what its family "
        f"({', '.join(fam)}) runs at here: {probe.speedup:.2f}x ONNX Runtime FP32 (95% CI {probe.ci_low:.2f}-"
        f"{probe.ci_high:.2f})"
    )
    return metrics, (note,)


def _record_timing(state: SearchState, recipe: Recipe, metrics: dict[str, float], verdict: Verdict) -> None:
    """What later candidates are compared with: the best passing speed, and every timed family's speed."""
    if "probe_speedup_vs_ort_fp32_ci_high" in metrics:  # a cached candidate that failed quality and was probed
        high = metrics["probe_speedup_vs_ort_fp32_ci_high"]
        state.timed.append((recipe, high))
        state.probed.add(search.family(recipe))
        if recipe.options.get("kind") not in search.RESTORING_KINDS:
            state.failed_families[search.family(recipe)] = high
    if "speedup_vs_ort_fp32" not in metrics:
        return
    if verdict.passed:
        state.best_vs_reference = max(state.best_vs_reference or 0.0, metrics["speedup_vs_ort_fp32"])
        state.passed.append(recipe)
    # The FP32 baselines, measured beside this candidate: their float f32 families' speeds (a point estimate, with
    # the 5% a shared host's noise gives it), what weight-only INT8 and FP16 storage run at.
    fp32 = {reference_name(): 1.05}  # the reference itself
    if "baseline_speedup_vs_ort_fp32" in metrics:
        fp32[recipe.backend] = metrics["baseline_speedup_vs_ort_fp32"] * 1.05
    for backend, high in fp32.items():
        state.timed.append((Recipe.make(backend, "fp32", "fp32"), high))
    high = metrics.get("speedup_vs_ort_fp32_ci_high", metrics["speedup_vs_ort_fp32"])
    state.timed.append((recipe, high))


def _status(verdict: Verdict) -> str:
    return "passed" if verdict.passed else "skipped" if verdict.skipped else "failed"


def _tuning_record(base: Baseline, recipe: Recipe) -> dict[str, Any] | None:
    """The part of the tuning a recipe's result depends on (for the cache key): only tuned recipes depend on it."""
    if base.tuning is None or recipe.options.get("kind") not in TUNED_KINDS:
        return None
    t = base.tuning
    return {"metric": t.metric, "max_drop": t.max_drop, "budget": t.time_budget_s, "limit": t.limit}


# Recipe kinds that tune themselves against the gate (their result depends on its threshold).
TUNED_KINDS = ("accuracy_control", "mixed")


def _from_cache(
    state: SearchState, key: str, policy: Policy, has_labels: bool, validators: list[Validator]
) -> CandidateResult | None:
    """A cached measurement re-gated under this policy; ``None`` when it lacks what this gate needs."""
    assert state.cache is not None
    cached = state.cache.get(key)
    if cached is None:
        return None
    metrics, quality_only = cached.metrics, [v.name for v in validators if v.name != LATENCY]
    quality = gate.judge(metrics, policy.gate, has_labels=has_labels, validators=validators, only=quality_only)
    timed = "latency_p50_ms" in metrics
    if quality.passed and not timed:
        return None  # it failed quality under an earlier, stricter gate: it must be timed now
    verdict = gate.judge(metrics, policy.gate, has_labels=has_labels, validators=validators) if timed else quality
    cached.verdict = verdict
    cached.notes = [*cached.notes, "measured in an earlier run (same model, recipe, data, host, libraries); re-gated"]
    _record_timing(state, cached.recipe, cached.metrics, verdict)
    state.quality_passed += quality.passed
    state.quality_failed += not quality.passed
    return cached


def _build(
    base: Baseline, recipe: Recipe, model: ModelInfo, data: DataSets, policy: Policy, workdir: Path, state: SearchState
) -> Candidate:
    """The recipe's compress step, in the run's build worker when it has one (so the budget can stop it)."""
    calib = Calibration(data.calibration, policy.data.calibration_batch_size, policy.data.calibration_samples)
    tuning = base.tuning
    if tuning is not None and state.budget.seconds is not None:
        tuning = replace(tuning, time_budget_s=max(min(tuning.time_budget_s, state.budget.remaining), 1.0))
    fine_tuning = state.qat.job(state.budget.remaining) if state.qat is not None and qat.is_qat(recipe) else None
    job = BuildJob(base.backend.name, model, recipe, calib, workdir / recipe.backend / recipe.name, tuning, fine_tuning)

    def progress(text: str) -> None:
        state.emit("qat" if fine_tuning is not None else "build", f"{recipe.backend}/{recipe.name}: {text}")

    if state.worker is not None:
        return state.worker.run(job, state.budget.remaining, progress)
    set_build_progress(progress)
    try:
        return build(job, base.backend)
    finally:
        set_build_progress(None)


def skipped_result(recipe: Recipe, reason: str, hardware: Hardware, policy: Policy) -> CandidateResult:
    return CandidateResult(recipe, {}, gate.skip(reason), hardware)


def _context(
    base: Baseline,
    cand: Candidate,
    runner: Runner,
    data: DataSets,
    policy: Policy,
    hardware: Hardware,
    *,
    reopen: bool = True,
    target: LatencyTarget | None = None,
) -> ValidationContext:
    """``reopen``: validators may open fresh runners of baseline and candidate (cold start) and of a trivial model."""
    threads = policy.latency.threads
    backend = base.backend
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
        open_candidate=(lambda: backend.runner(cand, threads=threads)) if reopen else None,
        open_baseline=(lambda: backend.runner(base.candidate, threads=threads)) if reopen else None,
        open_trivial=(lambda: trivial_runner(backend, threads, cand.artifact.parent)) if reopen else None,
        latency_target=target,
    )


def trivial_runner(backend: Backend, threads: int, workdir: Path) -> tuple[Runner, dict[str, np.ndarray]]:
    """A runner of ``backend`` on a one-Add model, and its inputs: what the runner's own per-call work costs."""
    from onnx import TensorProto, helper

    path = workdir / "trivial" / "trivial.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
        one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "trivial", [x], [y], [one])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        onnx.save(proto, str(path))
    info = read_model_info(path)
    runner = backend.runner(backend.baseline(info, path.parent / backend.name), threads=threads)
    return runner, {"x": np.ones((1, 16), dtype=np.float32)}


def _measure(validators: list[Validator], ctx: ValidationContext) -> tuple[dict[str, float], dict[str, object]]:
    """Every applicable validator's metrics, each under the name it owns (``validators.base.metric_key``: a key it
    does not declare lands as ``<validator>.<key>``, so none overwrites another's), and its details by name."""
    metrics: dict[str, float] = {}
    details: dict[str, object] = {}
    for validator in validators:
        if validator.applies(ctx):
            measurement = validator.measure(ctx)
            metrics.update(publish(validator, measurement.metrics))
            details[validator.name] = measurement.details
    return metrics, details


def _validator_notes(details: dict[str, object]) -> list[str]:
    """Notes a validator left in its details (e.g. a runner whose own overhead inflates its latency figure)."""
    out: list[str] = []
    for value in details.values():
        if isinstance(value, dict) and isinstance(value.get("notes"), list):
            out.extend(str(n) for n in value["notes"])
    return out


QUALITY_VALIDATORS = ("accuracy", "fidelity", "size")
LATENCY = "latency"


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
        raise_if_infrastructure(exc, f"{recipe.backend}/{recipe.name}")
        return CandidateRun(failed_result(recipe, str(exc), hardware), time.perf_counter() - t0)
    else:  # the backend became able to run here mid-run (a GPU appeared?): no baseline was built for it
        reason = f"{recipe.backend} became available mid-run ({built.artifact.name}); run again to measure it"
        return CandidateRun(failed_result(recipe, reason, hardware), time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        from quantgate.plugins.onnxruntime import OrtRunner

        runner = OrtRunner(needs.artifact, threads=policy.latency.threads)
    except BackendError as exc:
        reason = f"the prepared ONNX does not run on ONNX Runtime: {exc}"
        return CandidateRun(failed_result(recipe, reason, hardware), t1 - t0)
    prepared = Candidate(recipe, needs.artifact, needs.notes)
    ctx = _context(reference, prepared, runner, data, policy, hardware, reopen=False)
    metrics, details = _measure([v for v in validators if v.name in QUALITY_VALIDATORS], ctx)
    # The size of the ONNX prepared here is not the target artifact's: only output quality is judged here.
    only = [v for v in QUALITY_VALIDATORS if v != "size"]
    quality = gate.judge(metrics, policy.gate, has_labels=has_labels, validators=validators, only=only)
    verdict = gate.needs_target(quality, str(needs))
    notes = [*needs.notes, "quality measured with ONNX Runtime on this host; latency is measured on the target only"]
    result = CandidateResult(recipe, metrics, verdict, hardware, artifact=None, notes=notes, details=details)
    return CandidateRun(result, t1 - t0, time.perf_counter() - t1)


def unavailable_result(planned: PlannedRecipe, hardware: Hardware) -> CandidateResult:
    recipe = Recipe.make(planned.backend, "(backend unavailable)", "none")
    return failed_result(recipe, planned.unavailable, hardware)


# How many of the fastest timed candidates get a shape-specialized variant, and how far behind the best they may be
# (static shapes gained up to 28% on the real models measured here).
SPECIALIZE_TOP = 2
SPECIALIZE_REACH = 1.3


def shape_variants(results: list[CandidateResult], bases: dict[str, Baseline]) -> list[tuple[Baseline, Candidate]]:
    """Shape-specialized variants of the fastest timed candidates whose backend offers them (``SpecializesShapes``).

    Timed means quality passed; a candidate the speed gate refused may pass compiled for its shapes.
    """
    key = "speedup_vs_ort_fp32"
    timed = [r for r in results if key in r.metrics and r.artifact is not None and r.backend in bases]
    best = max((r.metrics[key] for r in timed if r.passed), default=0.0)
    out: list[tuple[Baseline, Candidate]] = []
    for r in sorted(timed, key=lambda r: r.metrics[key], reverse=True):
        base = bases[r.backend]
        if len(out) == SPECIALIZE_TOP or not isinstance(base.backend, SpecializesShapes):
            continue
        if r.metrics.get(key + "_ci_high", r.metrics[key]) * SPECIALIZE_REACH < best:
            continue
        assert r.artifact is not None
        variant = base.backend.specialize(Candidate(r.recipe, r.artifact, tuple(r.notes)))
        if variant is not None:
            out.append((base, variant))
    return out


PLAYOFF_SIZE = 4


def playoff(
    results: list[CandidateResult],
    bases: dict[str, Baseline],
    data: DataSets,
    policy: Policy,
    budget: Budget | None = None,
) -> None:
    """Re-time the passing candidates that could be the fastest side by side, and rank them on those figures.

    Each candidate was timed against ONNX Runtime FP32 in its own measurement, minutes apart on a shared host; the
    top of such a list is biased upwards (the fastest-looking of several near-ties is the luckiest). Finalists: the
    passing candidates whose interval reaches the best one's lower bound, at most ``PLAYOFF_SIZE``.
    """
    key = "speedup_vs_ort_fp32"
    reference = bases.get(reference_name())
    passing = [r for r in results if r.passed and key in r.metrics and r.artifact is not None and r.backend in bases]
    if reference is None or len(passing) < 2:
        return
    passing.sort(key=lambda r: r.metrics[key], reverse=True)
    floor = passing[0].metrics.get(key + "_ci_low", passing[0].metrics[key])
    finalists = [r for r in passing if r.metrics.get(key + "_ci_high", r.metrics[key]) >= floor][:PLAYOFF_SIZE]
    if len(finalists) < 2:
        return
    if budget is not None and budget.exhausted:
        for r in finalists:
            r.notes.append(f"no final side-by-side ranking: the search budget was spent ({budget.describe()})")
        return
    cfg = policy.latency
    try:
        runners = [reference.runner] + [
            bases[r.backend].backend.runner(Candidate(r.recipe, r.artifact or Path()), threads=cfg.threads)
            for r in finalists
        ]
    except BackendError as exc:  # a finalist that no longer opens keeps its own figures
        log.info("no final ranking: %s", exc)
        return
    inputs = latency_batch(data.evaluation, cfg.batch_sizes[0])
    block: int | list[Block] = cfg.block_calls or choose_blocks(runners, inputs, cfg.min_block_ms, cfg.switch_ms)
    deadline = budget.deadline if budget is not None else None
    past = None if deadline is None else (lambda _: time.monotonic() >= deadline)
    rounds = max(cfg.min_rounds, 30)
    timed = measure_blocked(
        runners, inputs, warmup=cfg.warmup, rounds=rounds, block_calls=block, min_rounds=10, stop=past
    )
    ref = timed[0].block_ms
    names = ", ".join(f"{r.backend}/{r.recipe.name}" for r in finalists)
    for result, t in zip(finalists, timed[1:], strict=True):
        before = result.metrics[key]
        result.metrics[key] = paired_speedup(ref, t.block_ms)
        result.metrics[key + "_ci_low"], result.metrics[key + "_ci_high"] = speedup_ci(ref, t.block_ms)
        result.metrics["playoff_blocks"] = float(t.blocks)
        result.notes.append(
            f"final ranking: re-timed side by side with ONNX Runtime FP32 and the other finalists ({names}), "
            f"{result.metrics[key]:.2f}x (its own measurement said {before:.2f}x)"
        )


def winner(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The fastest passing candidate (``gate.choose_winner``), or ``None``; nothing is changed."""
    index = gate.choose_winner([(r.verdict, r.metrics) for r in results])
    return None if index is None else results[index]


def promote(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """Mark and return the fastest passing candidate, for a caller that keeps the results itself."""
    best = winner(results)
    if best is not None:
        best.promoted = True
    return best
