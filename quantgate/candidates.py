"""Every planned recipe of one run measured in this process: the FP32 baselines once per backend, the search loop in
order of expected value within the policy's budget, the shape-specialized variants, the final side-by-side ranking.

Plain functions over a frozen ``RunContext``: the ``compress-model`` flow and a target pool's ``compress-step`` call
``run_candidates`` with their Prefect tasks as the ``Steps`` (each baseline and candidate a task run in the UI);
anything else calls it with the plain steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from quantgate import pipeline, qat_search, search
from quantgate.build import BuildWorker
from quantgate.cache import CandidateCache, RunKey
from quantgate.errors import BackendError
from quantgate.hardware import Hardware
from quantgate.model import ModelInfo
from quantgate.pipeline import Baseline, CandidateRun, DataSets, Intake, PlannedRecipe, SearchState
from quantgate.plugins.base import Candidate, model_files, reference_name
from quantgate.policy import Policy
from quantgate.result import CandidateResult
from quantgate.validators.base import Validator


@dataclass(frozen=True)
class RunContext:
    """What every baseline and candidate of one run is built and measured with."""

    intake: Intake
    data: DataSets
    policy: Policy
    hardware: Hardware
    workdir: Path
    validators: tuple[Validator, ...]

    @property
    def model(self) -> ModelInfo:
        return self.intake.model

    @property
    def has_labels(self) -> bool:
        return self.data.evaluation.has_labels


def measure_baseline(backend: str, ctx: RunContext, reference: Baseline | None) -> Baseline | str:
    """The backend's FP32 baseline, or why it failed (returned: one runtime's failure fails its recipes only)."""
    try:
        return pipeline.baseline_for(backend, ctx.model, ctx.data, ctx.policy, ctx.workdir, reference)
    except BackendError as exc:
        return str(exc)


def measure_candidate(
    planned: PlannedRecipe,
    base: Baseline,
    ctx: RunContext,
    state: SearchState | None = None,
    prebuilt: Candidate | None = None,
) -> CandidateRun:
    """One planned recipe built and measured against ``base`` (ONNX Runtime's baseline for a recipe this host can
    only prepare); ``prebuilt``: a variant of a measured candidate (nothing to build)."""
    validators = list(ctx.validators)
    if planned.prepare_only:
        return pipeline.evaluate_prepared(
            planned, base, ctx.model, ctx.data, ctx.policy, ctx.hardware, ctx.workdir, validators
        )
    assert planned.recipe is not None
    return pipeline.evaluate(
        base, planned.recipe, ctx.model, ctx.data, ctx.policy, ctx.hardware, ctx.workdir, validators, state, prebuilt
    )


class MeasureCandidate(Protocol):
    def __call__(
        self,
        planned: PlannedRecipe,
        base: Baseline,
        ctx: RunContext,
        state: SearchState | None = None,
        prebuilt: Candidate | None = None,
    ) -> CandidateRun: ...


@dataclass(frozen=True)
class Steps:
    """How each step runs: plain calls by default; a flow passes its tasks. ``prepare``: a recipe this host can only
    prepare (the same function, under its own name in a flow so the UI tells them apart)."""

    baseline: Callable[[str, RunContext, Baseline | None], Baseline | str] = measure_baseline
    candidate: MeasureCandidate = measure_candidate
    prepare: MeasureCandidate = measure_candidate


class Progress(Protocol):
    """Who follows the search as it goes (a Prefect progress artifact)."""

    def on_event(self, event: search.ProgressEvent) -> None: ...

    def update(self, state: SearchState) -> None: ...

    def finish(self, state: SearchState) -> None: ...


def run_candidates(
    planned: list[PlannedRecipe], ctx: RunContext, steps: Steps = Steps(), progress: Progress | None = None
) -> tuple[list[CandidateResult], float, float]:
    """Every planned recipe searched here, best expected value first, within the policy's search budget;
    returns (results in plan order, compress_s, validate_s)."""
    policy, hardware = ctx.policy, ctx.hardware
    results: dict[int, CandidateResult] = {}
    compress_s = validate_s = 0.0
    baselines: dict[str, Baseline | str] = {}  # a str says why that backend's FP32 baseline failed
    runnable = [i for i, p in enumerate(planned) if p.recipe is not None]
    model_bytes = sum(f.stat().st_size for f in model_files(ctx.model.path))
    state = SearchState.for_policy(policy, len(runnable), model_bytes)
    if policy.search.cache:
        state.cache = CandidateCache()
        data = ctx.data
        state.run_key = RunKey.make(ctx.model.path, data.calibration.path, data.evaluation.path, hardware, policy)

    def baseline(name: str) -> Baseline | str:
        nonlocal validate_s
        if name not in baselines:
            reference = baseline(reference_name()) if name != reference_name() else None
            t = time.perf_counter()
            state.emit("baseline", name)
            # A str result (e.g. a graph this runtime cannot convert) fails that backend's recipes; others go on.
            baselines[name] = steps.baseline(name, ctx, reference if isinstance(reference, Baseline) else None)
            validate_s += time.perf_counter() - t
        return baselines[name]

    for i, item in enumerate(planned):
        if item.recipe is None:
            results[i] = pipeline.unavailable_result(item, hardware)
    fallback = qat_search.setup(planned, ctx.intake, ctx.data, policy, state)  # QAT, if no post-training one holds
    if progress is not None:
        state.listeners.append(progress.on_event)
    pending = [search.Planned(i, p.recipe, search.model_prior(p.recipe, ctx.model))
               for i, p in enumerate(planned) if p.recipe is not None]  # fmt: skip
    # Sequential on purpose: latency is measured on this host, and parallel candidates would disturb it.
    with BuildWorker() as worker:
        state.worker = worker
        while pending:
            if policy.search.specialize_shapes and state.budget.seconds is not None:
                live = {n: b for n, b in baselines.items() if isinstance(b, Baseline)}
                wanted = bool(pipeline.shape_variants(list(results.values()), live))
                state.budget.reserved = search.SPECIALIZE_RESERVE * state.budget.seconds if wanted else 0.0
            pick = pending.pop(state.pick(pending))
            item = planned[pick.index]
            assert item.recipe is not None
            state.index += 1
            base = baseline(reference_name() if item.prepare_only else item.backend)
            if isinstance(base, str):
                results[pick.index] = pipeline.failed_result(item.recipe, base, hardware)
                continue
            step = steps.prepare if item.prepare_only else steps.candidate
            run = step(item, base, ctx, state)
            compress_s += run.compress_s
            validate_s += run.validate_s
            results[pick.index] = run.result
            if progress is not None:
                progress.update(state)
            if not pending and fallback and qat_search.fallback_due(state):
                pending, fallback = qat_search.enqueue(planned, fallback, state), []
    state.budget.reserved = 0.0
    ready = {name: b for name, b in baselines.items() if isinstance(b, Baseline)}
    if policy.search.specialize_shapes:
        variants = pipeline.shape_variants(list(results.values()), ready)
        state.total += len(variants)
        for base, variant in variants:
            state.index += 1
            item = PlannedRecipe(variant.recipe.backend, variant.recipe)
            run = steps.candidate(item, base, ctx, state, variant)
            validate_s += run.validate_s
            results[len(planned) + state.index] = run.result
            if progress is not None:
                progress.update(state)
    state.emit("playoff", "")
    pipeline.playoff(list(results.values()), ready, ctx.data, policy, state.budget)
    state.emit("done", "")
    if progress is not None:
        progress.finish(state)
    return [results[i] for i in sorted(results)], compress_s, validate_s
