"""Validators on target hardware: which backends run in which work pool, and whether what came back is trustworthy.

A policy's ``targets`` send a backend's compress + validate step to a Prefect work pool whose workers have the
target hardware. The step records the host fingerprint with every candidate; the parent refuses a result whose
fingerprint does not match the target's declared requirements (a worker on the wrong machine, a mislabelled pool),
or whose CPU lacks what the recipe's compute precision needs (BF16/FP16: ``hardware.compute_need``), so a latency
figure measured on the wrong hardware can never pass the gate. Plain functions, no Prefect or MLflow.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from quantgate import gate
from quantgate.hardware import INFERENCE_PRECISIONS, Hardware, compute_need
from quantgate.pipeline import PlannedRecipe, failed_result
from quantgate.plugins.base import Recipe
from quantgate.policy import HardwareRequirements, Policy, TargetPolicy
from quantgate.result import CandidateResult

STEP_DEPLOYMENT = "compress-step"


def deployment_name(pool: str) -> str:
    """The step deployment of a pool: flow ``compress-step``, deployment named after the pool."""
    return f"{STEP_DEPLOYMENT}/{pool}"


def mismatches(hw: Hardware, req: HardwareRequirements) -> list[str]:
    """Every way this host falls short of the requirements; empty when it meets them."""
    out: list[str] = []
    if req.arch is not None and hw.arch != req.arch:
        out.append(f"architecture {hw.arch or '?'} is not {req.arch}")
    if req.cpu is not None and not fnmatch.fnmatchcase(hw.cpu_model, req.cpu):
        out.append(f"CPU '{hw.cpu_model}' does not match '{req.cpu}'")
    missing = [f for f in req.isa if f not in hw.isa_flags]
    if missing:
        out.append(f"CPU lacks {', '.join(missing)}")
    if req.min_cores is not None and hw.logical_cores < req.min_cores:
        out.append(f"{hw.logical_cores} cores, at least {req.min_cores} required")
    if req.gpu is not None:
        if not hw.gpus:
            out.append("no NVIDIA GPU")
        elif not any(fnmatch.fnmatchcase(g, req.gpu) for g in hw.gpus):
            out.append(f"GPU {', '.join(hw.gpus)} does not match '{req.gpu}'")
    return out


def compute_mismatches(hw: Hardware, recipe: Recipe) -> list[str]:
    """Why this host cannot have computed ``recipe`` in the float precision it names (BF16/FP16 need ISA support);
    empty when it can. The requirement is part of every candidate's, whatever the target's ``requires`` say."""
    precision = recipe.options.get("inference_precision")
    if precision is None:
        return []
    if precision not in INFERENCE_PRECISIONS:
        return [f"recipe {recipe.name} names inference precision {precision!r}, which this quantgate does not know"]
    need = compute_need(str(precision))
    if need is None or need.met_by(hw.isa_flags):
        return []
    return [f"recipe {recipe.name} computes in {need.capability}, which needs {need.cpu}; {need.lacking()}"]


def hardware_checked(cand: CandidateResult, target: TargetPolicy, recorded_fingerprint: object) -> CandidateResult:
    """``cand`` with the hardware check of a candidate that had a target: the facts (where it was measured, how that
    host falls short of the target, a fingerprint that contradicts its record) go to the gate, which decides."""
    hw = cand.hardware
    where = f"measured on {hw.cpu_model or '?'} ({hw.logical_cores} cores"
    where += f", {', '.join(hw.gpus)})" if hw.gpus else ")"
    where += f", fingerprint {hw.fingerprint()}"
    forged = None
    if recorded_fingerprint is not None and recorded_fingerprint != hw.fingerprint():
        forged = f"the recorded fingerprint {recorded_fingerprint} does not match the recorded hardware"
    problems = mismatches(hw, target.requires) + compute_mismatches(hw, cand.recipe)
    return replace(cand, verdict=gate.on_hardware(cand.verdict, where, target.pool, problems, forged))


def check_targets(
    results: Sequence[CandidateResult], policy: Policy, fingerprints: Sequence[object] | None = None
) -> list[CandidateResult]:
    """Add the hardware check to every measured candidate whose backend has a target (in-process ones included).

    ``fingerprints``: the fingerprint each result recorded, by position, checked against the hardware it recorded
    (results rebuilt from a step's JSON); results measured in this process are checked against their hardware only.
    """
    out: list[CandidateResult] = []
    for i, cand in enumerate(results):
        target = policy.targets.get(cand.backend)
        if target is None:
            out.append(cand)
            continue
        recorded = fingerprints[i] if fingerprints is not None else None
        out.append(hardware_checked(cand, target, recorded))
    return out


@dataclass(frozen=True)
class Split:
    """A plan divided between this process (``local``) and the target pools whose steps run elsewhere (``remote``:
    pool -> its backends)."""

    local: list[PlannedRecipe]
    remote: dict[str, tuple[str, ...]]


def split(planned: Sequence[PlannedRecipe], policy: Policy, here: str | None) -> Split:
    """Which recipes this process measures, and which pools must run a step: a pool other than ``here`` (the pool
    this run was picked up from, ``None`` outside a worker) with a planned backend; the rest runs here."""
    remote = {
        pool: backends
        for pool, backends in policy.pools().items()
        if pool != here and any(p.backend in backends for p in planned)
    }
    routed = {b for backends in remote.values() for b in backends}
    return Split([p for p in planned if p.backend not in routed], remote)


@dataclass
class StepOutcome:
    """What came back from one pool: its candidates, their fingerprints as recorded, and its timings."""

    pool: str
    results: list[CandidateResult]
    fingerprints: list[object] | None = None  # None: nothing was measured on the target (the step failed)
    timings: dict[str, float] = field(default_factory=dict)

    def checked(self, policy: Policy) -> list[CandidateResult]:
        """The results with their hardware checks; a failed step's results already say why they failed."""
        if self.fingerprints is None:
            return list(self.results)
        return check_targets(self.results, policy, self.fingerprints)


def step_document(
    pool: str, flow_run_id: str | None, hardware: Hardware, results: list[CandidateResult], timings: dict[str, float]
) -> dict[str, Any]:
    """The JSON a step leaves on the parent run: every candidate in full, as the parent rebuilds and gates it."""
    return {
        "pool": pool,
        "flow_run_id": flow_run_id,
        "hardware": hardware.as_dict(),
        "candidates": [c.to_record() for c in results],
        "timings_s": timings,
    }


def read_step_document(pool: str, doc: Mapping[str, Any]) -> StepOutcome:
    """Rebuild a step's candidates; a document for another pool or a malformed one is a ``ValueError``."""
    if doc.get("pool") != pool:
        raise ValueError(f"the step document names pool {doc.get('pool')!r}, expected {pool!r}")
    records = doc.get("candidates")
    if not isinstance(records, list):
        raise ValueError("the step document has no candidate list")
    results = [CandidateResult.from_record(r) for r in records]
    fingerprints = [(r.get("hardware") or {}).get("fingerprint") for r in records]
    timings = {str(k): float(v) for k, v in (doc.get("timings_s") or {}).items()}
    return StepOutcome(pool, results, fingerprints, timings)


def failed_step(pool: str, planned: list[PlannedRecipe], reason: str, hardware: Hardware) -> StepOutcome:
    """A pool that returned nothing usable fails its recipes with the reason; the other pools' candidates go on."""
    results: list[CandidateResult] = []
    seen: set[str] = set()
    for item in planned:
        if item.recipe is not None:
            results.append(failed_result(item.recipe, reason, hardware))
        elif item.backend not in seen:
            recipe = Recipe.make(item.backend, "(step failed)", "none")
            results.append(failed_result(recipe, reason, hardware))
        seen.add(item.backend)
    return StepOutcome(pool, results)
