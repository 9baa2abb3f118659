"""The ``compress-model`` Prefect flow: orchestration only; every step is a function of the domain (quantgate.pipeline,
quantgate.candidates, quantgate.targets), wrapped here in a task."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from quantgate import candidates, gate, pipeline, qat, registry, report, search, targets, tracking
from quantgate.candidates import RunContext
from quantgate.errors import InfrastructureError, InputError, infrastructure_cause
from quantgate.flows import orphans, step_runs
from quantgate.flows.locks import PrefectLock
from quantgate.hardware import Hardware, detect
from quantgate.model import ModelInfo
from quantgate.pipeline import Baseline, DataSets, Intake, PlannedRecipe
from quantgate.plugins.base import Candidate
from quantgate.policy import Policy, parse_policy
from quantgate.result import CandidateResult, CompressionResult
from quantgate.validators.base import load_validators
from quantgate.workdir import run_workdir

log = logging.getLogger("quantgate")

# Objects passed between these tasks (open data sets, ONNX Runtime sessions) live in this process only:
# every task has no result persistence and no input hashing (cache_policy=NO_CACHE).


def _tracking_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a step only while the tracking server is unreachable or failing (restarting, answering 5xx); bad input
    fails at once."""
    try:
        state.result()
    except Exception as exc:  # MLflow wraps connection failures in MlflowException after its own retries
        return registry.is_outage(exc)
    return False


# Steps that talk to MLflow survive a tracking-server restart of up to about a minute (the delay is an environment
# setting so the fault suite can ride out its outages in seconds).
MLFLOW_RETRY: dict[str, Any] = {
    "retries": 4,
    "retry_delay_seconds": float(os.environ.get("QUANTGATE_MLFLOW_RETRY_DELAY_S", 15)),
    "retry_condition_fn": _tracking_unreachable,
}


@task(name="resolve", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def resolve_task(model_uri: str, tracking_uri: str) -> registry.SourceVersion:
    client = registry.connect(tracking_uri)
    return registry.resolve(client, registry.parse_model_uri(model_uri))


@task(name="intake", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def intake_task(source: registry.SourceVersion, workdir: Path, allow_pickle: bool = False) -> Intake:
    return pipeline.intake(source, workdir, allow_pickle=allow_pickle)


@task(name="load-data", cache_policy=NO_CACHE, persist_result=False)
def data_task(policy: Policy, source: registry.SourceVersion, model: ModelInfo, workdir: Path) -> DataSets:
    return pipeline.load_data(policy, source, model, workdir)


@task(name="baseline", task_run_name="baseline-{backend}", cache_policy=NO_CACHE, persist_result=False)
def baseline_task(backend: str, ctx: RunContext, reference: Baseline | None) -> Baseline | str:
    """The baseline, or why it failed (returned, not raised: one runtime's failure is a result, not a crash)."""
    return candidates.measure_baseline(backend, ctx, reference)


@task(
    name="compress-and-validate",
    task_run_name="{planned.backend}-{planned.recipe.name}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def candidate_task(
    planned: PlannedRecipe,
    base: Baseline,
    ctx: RunContext,
    state: pipeline.SearchState | None = None,
    prebuilt: Candidate | None = None,
) -> pipeline.CandidateRun:
    """``base``: the backend's FP32 baseline, or ONNX Runtime's for a recipe this host can only prepare;
    ``prebuilt``: a variant of a measured candidate (nothing to build)."""
    return candidates.measure_candidate(planned, base, ctx, state, prebuilt)


# The same task under its own name, so the Prefect UI says which recipes only ran their host-independent step.
prepared_task = candidate_task.with_options(name="prepare-and-check")

# The search's steps as task runs of this flow.
TASK_STEPS = candidates.Steps(baseline=baseline_task, candidate=candidate_task, prepare=prepared_task)


@task(name="gate", cache_policy=NO_CACHE, persist_result=False)
def gate_task(results: list[CandidateResult]) -> CandidateResult | None:
    """The candidate to promote (the fastest passing one), or ``None``; the results are left as they are."""
    return pipeline.winner(results)


@task(name="register", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def register_task(
    tracking_uri: str,
    result: CompressionResult,
    policy: Policy,
    model: ModelInfo,
    data: DataSets,
    parent_id: str | None = None,
) -> None:
    client = registry.connect(tracking_uri)
    uris = {"calibration": data.calibration_uri, "evaluation": data.evaluation_uri}
    tracking.record(client, result, policy, model, uris, parent_id, PrefectLock())


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)
def publish_task(doc: dict[str, Any]) -> None:
    """The gate table and the summary as Prefect artifacts, next to the flow run in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = report.artifact_key(doc)
    source = doc["source"]
    where = f"{source['name']} v{source['version']}"
    create_table_artifact(
        table=report.comparison_rows(doc),
        key=key + "-table",
        description=f"quantgate gate table for {where} (MLflow run {doc['parent_run_id']})",
    )
    create_markdown_artifact(
        markdown=report.markdown_report(doc),
        key=key + "-report",
        description=f"quantgate report for {where} (MLflow run {doc['parent_run_id']})",
    )


class Clock:
    """Wall time per step, reported in the result so pipeline overhead can be told from the work."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._start = time.perf_counter()
        self._last = self._start
        self.steps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[f"{step}_s"] = self.steps.get(f"{step}_s", 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        return time.perf_counter() - self._start


def _progress_artifact(key: str) -> ProgressArtifact | None:
    """A progress artifact when this runs inside a flow run; a failure to create one never fails the run."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    try:
        return ProgressArtifact(key)
    except Exception as exc:  # the Prefect API refused it: progress is a convenience, not part of the result
        log.warning("no progress artifact: %s", exc)
        return None


class ProgressArtifact:
    """The search's progress as a Prefect progress artifact on the flow run, updated after each candidate."""

    def __init__(self, key: str) -> None:
        from prefect.artifacts import create_progress_artifact

        created = create_progress_artifact(0.0, key=key, description="quantgate search: starting")
        assert isinstance(created, UUID)  # called from a synchronous flow: not a coroutine
        self._id = created

    def update(self, state: pipeline.SearchState) -> None:
        from prefect.artifacts import update_progress_artifact

        event = search.ProgressEvent("build", state.index + 1, state.total, "", state.budget.used, state.budget.seconds)
        text = f"quantgate search: {state.index} of {state.total} candidates, {state.budget.describe()}"
        update_progress_artifact(self._id, min(event.fraction * 100, 99.0), description=text)

    def on_event(self, event: search.ProgressEvent) -> None:
        """A fine-tuning's epochs and loss, as they come (other stages update after each candidate)."""
        from prefect.artifacts import update_progress_artifact

        if event.stage == "qat":
            update_progress_artifact(self._id, min(event.fraction * 100, 99.0), description=event.describe())

    def finish(self, state: pipeline.SearchState) -> None:
        from prefect.artifacts import update_progress_artifact

        text = f"quantgate search done: {state.total} candidates, {state.budget.describe()}"
        update_progress_artifact(self._id, 100.0, description=text)


@task(name="start-parent-run", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def start_parent_task(
    tracking_uri: str, source: registry.SourceVersion, policy: Policy, hardware: Hardware, data: DataSets
) -> str:
    uris = {"calibration": data.calibration_uri, "evaluation": data.evaluation_uri}
    return tracking.start_parent(registry.connect(tracking_uri), source, policy, hardware, uris)


@task(name="start-step", task_run_name="start-step-{pool}", cache_policy=NO_CACHE, persist_result=False)
def start_step_task(pool: str, parameters: dict[str, Any], key: str) -> step_runs.StepRun:
    return step_runs.start(pool, parameters, key)


@task(name="wait-step", task_run_name="wait-step-{step.pool}", cache_policy=NO_CACHE, persist_result=False)
def wait_step_task(step: step_runs.StepRun, deadline: float) -> str | None:
    return step_runs.wait(step, deadline)


@task(name="read-step", task_run_name="read-step-{pool}", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def read_step_task(tracking_uri: str, parent_id: str, pool: str) -> dict[str, Any]:
    return tracking.read_step(registry.connect(tracking_uri), parent_id, pool)


def _collect_step(
    step: step_runs.StepRun,
    deadline: float,
    tracking_uri: str,
    parent_id: str,
    planned: list[PlannedRecipe],
    hardware: Hardware,
) -> targets.StepOutcome:
    """Wait for one pool's step and rebuild its candidates; a step that failed fails only its own recipes."""
    why = wait_step_task(step, deadline)
    if why is None:
        try:
            return targets.read_step_document(step.pool, read_step_task(tracking_uri, parent_id, step.pool))
        except Exception as exc:  # any unreadable result is that pool's failure, reported as such
            why = f"the step in pool {step.pool} completed but its results could not be read: {exc}"
    return targets.failed_step(step.pool, planned, why, hardware)


def _start_steps(
    remote: dict[str, tuple[str, ...]],
    source: registry.SourceVersion,
    data: DataSets,
    policy: Policy,
    tracking_uri: str,
    parent_id: str,
) -> list[tuple[step_runs.StepRun, float]]:
    """Each pool's step with the deadline of its slowest target; the data URIs are pinned for every step."""
    with_data = policy.with_data(data.calibration_uri, data.evaluation_uri, data.training_uri or None)
    pinned = with_data.model_dump(mode="json")
    out = []
    for pool, backends in remote.items():
        timeout = max(policy.targets[b].timeout_s for b in backends)
        parameters = {
            "model_uri": source.uri,
            "policy": pinned,
            "tracking_uri": registry.flow_tracking_uri(tracking_uri),
            "parent_run_id": parent_id,
            "pool": pool,
            "backends": list(backends),
        }
        out.append((start_step_task(pool, parameters, f"{parent_id}-{pool}"), time.monotonic() + timeout))
    return out


def run_compression(model_uri: str, policy: Policy, tracking_uri: str, workdir: Path) -> CompressionResult:
    """The body of the flow, callable inside any flow run.

    Backends with a target pool (``policy.targets``) other than the pool this run is in are compressed and measured
    by a step flow run in their pool, started before the local candidates and gated here with them.
    """
    clock = Clock()
    validators = tuple(load_validators())  # entry points are read once per run, not once per candidate
    gate.configure(policy.gate, validators)  # the policy's checks against what they declare, before any work
    source = resolve_task(model_uri, tracking_uri)
    clock.lap("resolve")
    taken = intake_task(source, workdir, policy.intake.allow_pickle)
    clock.lap("intake")
    data = data_task(policy, source, taken.model, workdir)
    hardware = detect()
    planned = pipeline.plan(policy, taken.model)
    qat.refuse_flavor([p.recipe for p in planned], taken.flavor, source.uri)
    clock.lap("data")
    split = targets.split(planned, policy, step_runs.current_pool() if policy.targets else None)
    remote = split.remote
    parent_id = start_parent_task(tracking_uri, source, policy, hardware, data) if remote else None
    try:
        steps = _start_steps(remote, source, data, policy, tracking_uri, parent_id) if parent_id else []
        key = report.artifact_key({"source": {"name": source.name, "version": source.version}}) + "-progress"
        ctx = RunContext(taken, data, policy, hardware, workdir, validators)
        results, compress_s, validate_s = candidates.run_candidates(
            split.local, ctx, TASK_STEPS, _progress_artifact(key)
        )
        results = targets.check_targets(results, policy)
        clock.lap("candidates")
        for step, deadline in steps:
            mine = [p for p in planned if p.backend in remote[step.pool]]
            assert parent_id is not None
            outcome = _collect_step(step, deadline, tracking_uri, parent_id, mine, hardware)
            results.extend(outcome.checked(policy))
            compress_s += outcome.timings.get("compress_s", 0.0)
            validate_s += outcome.timings.get("validate_s", 0.0)
        clock.lap("steps")
        order = {b: i for i, b in enumerate(policy.backends)}
        results.sort(key=lambda r: order.get(r.backend, len(order)))  # policy order, as without target pools
        winner = gate_task(results)
        result = CompressionResult(
            source=source,
            flavor=taken.flavor,
            policy_hash=policy.digest(),
            hardware=hardware,
            candidates=[replace(r, promoted=True) if r is winner else r for r in results],
            experiment=policy.registry.experiment,
            tracking_uri=tracking_uri,
        )

        def timings() -> dict[str, float]:
            work = {"compress_s": compress_s, "validate_s": validate_s}
            return {"flow_started_at": clock.started_at, "flow_s": clock.total(), **work, **clock.steps}

        result.timings = timings()  # up to the gate: what result.json in MLflow records
        register_task(tracking_uri, result, policy, taken.model, data, parent_id)
    except BaseException:
        if parent_id is not None:  # record() closes the run itself; this covers failures before it
            _close_failed(tracking_uri, parent_id)
        raise
    clock.lap("register")
    publish_task(result.to_document())
    result.timings = timings()
    return result


def _close_failed(tracking_uri: str, parent_id: str) -> None:
    try:
        client = registry.connect(tracking_uri)
        if client.get_run(parent_id).info.status == "RUNNING":
            client.set_terminated(parent_id, "FAILED")
    except Exception as exc:  # the original error is the one to report
        log.warning("could not mark MLflow run %s failed: %s", parent_id, exc)


@flow(name="compress-model", persist_result=False, log_prints=False)
def compress_model(
    model_uri: str,
    policy: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    tag_failures: bool = False,
) -> dict[str, Any]:
    """Compress one registered model version and register what passes the gate.

    ``policy`` is the policy file's content as a mapping (so a deployment can carry it as a parameter);
    ``tracking_uri`` has its credentials masked (they come from ``MLFLOW_TRACKING_URI``: Prefect stores parameters);
    ``tag_failures``: automatic runs have nobody watching, so a run that fails says why on the source version
    (``quantgate.outcome=failed``, ``quantgate.failure`` = input, infrastructure or internal) for the nightly pass.
    """
    parsed = parse_policy(policy or {})
    uri = registry.resolve_tracking_uri(tracking_uri)
    orphans.claim_current_run()
    orphans.crash_dead_runs()
    try:
        with run_workdir() as tmp:
            return run_compression(model_uri, parsed, uri, tmp).to_document()
    except BaseException as exc:
        failure = classify(exc)
        if tag_failures:
            _tag_failed(uri, model_uri, failure)
        if failure.error is not exc:
            raise failure.error from exc
        raise


@dataclass(frozen=True)
class Failure:
    kind: str  # "input" (not retried until the input changes), "infrastructure" or "internal" (retried nightly)
    reason: str
    error: BaseException  # what the run raises: the original, or an InfrastructureError naming the outage


def classify(exc: BaseException) -> Failure:
    """Which kind of failure ended a run: only a measured gate failure is a verdict, and that is no exception."""
    if isinstance(exc, InputError):
        return Failure("input", str(exc), exc)
    if isinstance(exc, InfrastructureError):
        return Failure("infrastructure", str(exc), exc)
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return Failure("infrastructure", "the run was interrupted (SIGTERM or cancelled)", exc)
    cause = infrastructure_cause(exc) or ("MLflow is failing" if registry.is_outage(exc) else None)
    if cause is not None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Failure("infrastructure", f"{cause}: {first}", InfrastructureError(f"{cause}: {first}"))
    return Failure("internal", f"{type(exc).__name__}: {exc}", exc)


def _tag_failed(tracking_uri: str, model_uri: str, failure: Failure) -> None:
    """Best effort: the source version says the run failed and why; MLflow itself may be what failed."""
    try:
        client = registry.connect(tracking_uri)
        source = registry.resolve(client, registry.parse_model_uri(model_uri))
        tracking.tag_failure(client, source, failure.reason, failure.kind)
    except Exception as exc:  # the original failure is the one to report
        log.warning("could not record the failure on %s: %s", model_uri, exc)
