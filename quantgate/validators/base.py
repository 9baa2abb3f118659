"""The validator interface: (baseline, candidate, data, host) in, measurements out. Validators never decide."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import PolicyError
from quantgate.hardware import Hardware
from quantgate.plugins.base import Candidate, Runner
from quantgate.plugins.registry import PluginRegistry
from quantgate.policy import LatencyPolicy

log = logging.getLogger(__name__)

VALIDATORS_GROUP = "quantgate.validators"
EVAL_BATCH = 64


@dataclass(frozen=True)
class EvalOutputs:
    """A model's first output over the evaluation set, one row per sample."""

    outputs: np.ndarray
    labels: np.ndarray | None


def collect_outputs(runner: Runner, dataset: NpzDataset, limit: int | None) -> EvalOutputs:
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in dataset.batches(EVAL_BATCH, limit=limit):
        out = runner.run(batch.inputs)[0]
        rows.append(np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1))
        if batch.labels is not None:
            labels.append(batch.labels)
    return EvalOutputs(np.concatenate(rows), np.concatenate(labels) if labels else None)


@dataclass(frozen=True)
class LatencyTarget:
    """What the measurement must decide: the gate's speedup threshold and, for ranking, the best so far.

    ``beat``: the best passing candidate's speedup over the reference runner (index ``ref``) so far; measuring can
    stop once this candidate's interval lies wholly above or below it, and wholly on one side of ``min_speedup``.
    """

    min_speedup: float | None
    beat: float | None = None
    ref: int | None = None
    gate_on_reference: bool = False  # ``min_speedup`` is against the reference runner, not the baseline
    deadline: float | None = None  # ``time.monotonic()`` past which measuring stops (the search's budget)


@dataclass
class ValidationContext:
    """Everything a validator may look at for one candidate; evaluation outputs are computed once."""

    baseline: Candidate
    candidate: Candidate
    baseline_runner: Runner
    candidate_runner: Runner
    evaluation: NpzDataset
    baseline_outputs: EvalOutputs
    latency: LatencyPolicy
    hardware: Hardware
    eval_limit: int | None = None
    # ONNX Runtime FP32, when the baseline is another runtime: the common yardstick across backends.
    reference_runner: Runner | None = None
    # Fresh runners for cold-start timing, and a runner of the candidate's backend on a trivial model (with its
    # inputs) for measuring the runner's own per-call overhead.
    open_candidate: Callable[[], Runner] | None = None
    open_baseline: Callable[[], Runner] | None = None
    open_trivial: Callable[[], tuple[Runner, dict[str, np.ndarray]]] | None = None
    # What latency measuring must decide (gate threshold, best so far), so it can stop once it has.
    latency_target: LatencyTarget | None = None

    @cached_property
    def candidate_outputs(self) -> EvalOutputs:
        return collect_outputs(self.candidate_runner, self.evaluation, self.eval_limit)


@dataclass(frozen=True)
class Measurement:
    validator: str
    metrics: dict[str, float]
    details: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Validator(Protocol):
    name: str

    def applies(self, ctx: ValidationContext) -> bool: ...

    def measure(self, ctx: ValidationContext) -> Measurement: ...


def _install_hint(name: str) -> str:
    return f"install the package that provides the '{name}' validator"


VALIDATORS: PluginRegistry[Validator] = PluginRegistry(VALIDATORS_GROUP, "validator", Validator, _install_hint)


def load_validators() -> list[Validator]:
    """Every validator registered in the ``quantgate.validators`` group, ours included, each built once per process.

    A third-party validator that is refused at load is skipped with a one-line warning, as MLflow does for plugins.
    """
    out = VALIDATORS.loadable()
    if not out:
        raise PolicyError("no validators are installed (entry-point group quantgate.validators is empty)")
    return out
