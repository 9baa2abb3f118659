"""The ``compress-step`` Prefect flow: one target pool's share of a ``compress-model`` run, on that pool's worker.

The parent run (quantgate.flows.compress) starts it through the pool's deployment ``compress-step/<pool>``; it
compresses and measures the backends the policy targets at this pool, logs them under the parent's MLflow run and
leaves ``steps/<pool>.json`` there. The parent checks the recorded hardware, gates and registers; a step never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from quantgate import candidates, gate, pipeline, registry, targets, tracking
from quantgate.candidates import RunContext
from quantgate.flows import orphans
from quantgate.flows.compress import MLFLOW_RETRY, TASK_STEPS, Clock, data_task, intake_task, resolve_task
from quantgate.hardware import detect
from quantgate.model import ModelInfo
from quantgate.policy import Policy, parse_policy
from quantgate.result import CandidateResult
from quantgate.validators.base import load_validators
from quantgate.workdir import run_workdir


def run_step(
    model_uri: str,
    policy: Policy,
    tracking_uri: str,
    parent_run_id: str,
    pool: str,
    backends: tuple[str, ...],
    workdir: Path,
) -> dict[str, Any]:
    """One pool's share of a compression, on that pool's worker: compress and measure its backends' recipes here,
    log them under the parent run, and leave the results there for the parent to gate. Registers nothing."""
    from prefect.runtime import flow_run

    clock = Clock()
    validators = tuple(load_validators())
    gate.configure(policy.gate, validators)
    source = resolve_task(model_uri, tracking_uri)
    taken = intake_task(source, workdir, policy.intake.allow_pickle)
    data = data_task(policy, source, taken.model, workdir)
    hardware = detect()
    planned = pipeline.plan(policy, taken.model, backends)
    ctx = RunContext(taken, data, policy, hardware, workdir, validators)
    results, compress_s, validate_s = candidates.run_candidates(planned, ctx, TASK_STEPS)
    timings = {"compress_s": compress_s, "validate_s": validate_s, "step_s": clock.total()}
    doc = targets.step_document(pool, str(flow_run.id or "") or None, hardware, results, timings)
    log_step_task(tracking_uri, parent_run_id, source.uri, results, taken.model, doc)
    return {
        "pool": pool,
        "hardware": hardware.fingerprint(),
        "candidates": [{"recipe": f"{r.backend}/{r.recipe.name}", "passed": r.passed} for r in results],
    }


@task(name="log-step", cache_policy=NO_CACHE, persist_result=False, **MLFLOW_RETRY)
def log_step_task(
    tracking_uri: str,
    parent_run_id: str,
    source_uri: str,
    results: list[CandidateResult],
    model: ModelInfo,
    doc: dict[str, Any],
) -> None:
    tracking.log_step(registry.connect(tracking_uri), parent_run_id, source_uri, results, model, doc)


@flow(name="compress-step", persist_result=False, log_prints=False)
def compress_step(
    model_uri: str,
    policy: dict[str, Any],
    tracking_uri: str,
    parent_run_id: str,
    pool: str,
    backends: list[str],
) -> dict[str, Any]:
    """Compress and validate ``backends``' recipes on this target pool's hardware for a ``compress-model`` run.

    Started by the parent run (one per pool, deployment ``compress-step/<pool>``); results go to the parent's
    MLflow run, where the parent checks their hardware fingerprint against the target and gates them.
    """
    parsed = parse_policy(policy)
    uri = registry.resolve_tracking_uri(tracking_uri)
    orphans.claim_current_run()
    with run_workdir() as tmp:
        return run_step(model_uri, parsed, uri, parent_run_id, pool, tuple(backends), tmp)
