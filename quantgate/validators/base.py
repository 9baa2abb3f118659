"""The validator interface: (baseline, candidate, data, host) in, measurements out. Validators never decide: they
declare their checks (``Gates``) and the metrics they own (``DeclaresMetrics``), and ``gate.py`` decides."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from quantgate.data import NpzDataset
from quantgate.errors import PolicyError
from quantgate.hardware import Hardware
from quantgate.plugins.base import Candidate, Runner
from quantgate.plugins.registry import PLUGIN_API_VERSION as PLUGIN_API_VERSION  # a plugin imports it from here
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


# -- what a validator declares: the metric names it owns, and its gate checks ----------------------------------


@runtime_checkable
class DeclaresMetrics(Protocol):
    """A validator that names the metrics it reports: those keep their names in the JSON document and in MLflow.

    ``metric_names``: names, or families (a prefix ending in ``*``, e.g. ``"latency_p50_ms_b*"``). A key a validator
    reports without declaring it is published as ``<validator>.<key>``, so two validators never overwrite each
    other's figures; a declared name that another installed validator also declares stops every run (exit 2) until
    one of them is uninstalled (``check_declarations``).
    """

    metric_names: tuple[str, ...]


class Threshold(BaseModel):
    """A check's settings in the policy: ``limit``, the number the measured value is held to. A check with more
    settings subclasses it; strict, so an unknown or out-of-range setting is a policy error (exit 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    limit: float


S = TypeVar("S", bound=Threshold)


@dataclass(frozen=True)
class Reading:
    """What one check holds to its limit: the measured value (``None``: not measured), the metric it came from (the
    validator's own key), and the line a reader sees (what was measured against what was required; by default the
    metric's published name, its value and the limit)."""

    value: float | None
    metric: str
    detail: str = ""


@dataclass(frozen=True)
class CheckSpec(Generic[S]):
    """One gate check a validator declares; a policy sets it as ``gate.checks.<validator>.<name>``.

    ``gate.py`` decides it: the value must be at least (``bound="min"``) or at most (``"max"``) the policy's
    ``limit``, give or take ``abs_tol + rel_tol * |limit|``; a value that was not measured fails. ``settings``: the
    schema of the policy's value (a bare number is its ``limit``). ``read``: what to hold to the limit, from the
    validator's own metrics (its keys as it reported them) and the settings; by default the metric ``metric``. A
    check with ``needs_labels`` is left out when the evaluation data has no labels.
    """

    name: str
    metric: str
    bound: Literal["min", "max"]
    settings: type[S]
    description: str = ""
    needs_labels: bool = False
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    read: Callable[[Mapping[str, float], S], Reading] | None = None

    def reading(self, metrics: Mapping[str, float], settings: S) -> Reading:
        """What this check holds to the limit (the gate words a reading without a ``detail`` itself)."""
        if self.read is not None:
            return self.read(metrics, settings)
        return Reading(metrics.get(self.metric), self.metric)


@runtime_checkable
class Gates(Protocol):
    """A validator that declares gate checks."""

    def checks(self) -> Sequence[CheckSpec[Any]]: ...


# What no validator may declare. Metrics the pipeline writes beside the validators' (a quality failure's short
# timing, the final ranking's re-timing, a fine-tuning's training figures); the checks the gate adds from facts
# (a failed build, a stopped search, a recipe that needs its target, the target's hardware: gate.py).
PIPELINE_METRICS = ("probe_speedup_vs_ort_fp32*", "playoff_blocks", "qat_*")
GATE_CHECKS = ("build", "skipped", "target", "hardware")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def declared_metrics(validator: Validator) -> tuple[str, ...]:
    return tuple(validator.metric_names) if isinstance(validator, DeclaresMetrics) else ()


def declared_checks(validator: Validator) -> tuple[CheckSpec[Any], ...]:
    return tuple(validator.checks()) if isinstance(validator, Gates) else ()


def _covers(pattern: str, key: str) -> bool:
    return key == pattern or (pattern.endswith("*") and key.startswith(pattern[:-1]))


def _overlap(a: str, b: str) -> bool:
    """Whether two declarations (names or families) can name the same metric."""
    if a.endswith("*") and b.endswith("*"):
        return a[:-1].startswith(b[:-1]) or b[:-1].startswith(a[:-1])
    return _covers(a, b) or _covers(b, a)


def metric_key(validator: Validator, key: str) -> str:
    """Where ``validator``'s metric ``key`` is published: as it is when the validator declares it, else
    ``<validator>.<key>``."""
    return key if any(_covers(p, key) for p in declared_metrics(validator)) else f"{validator.name}.{key}"


def publish(validator: Validator, metrics: Mapping[str, float]) -> dict[str, float]:
    """A validator's measurement as it enters a candidate's metrics (see ``metric_key``)."""
    return {metric_key(validator, k): v for k, v in metrics.items()}


def own_metrics(validator: Validator, metrics: Mapping[str, float]) -> dict[str, float]:
    """The published metrics that are ``validator``'s, under its own keys: what its checks read."""
    prefix = validator.name + "."
    declared = declared_metrics(validator)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
        elif any(_covers(p, key) for p in declared):
            out[key] = value
    return out


def check_declarations(validators: Sequence[Validator]) -> None:
    """Refuse, in one ``PolicyError`` line, validators whose declarations collide: a metric name or family, or a
    check name, declared by two of them or reserved by quantgate, or not a plain name."""
    metrics: list[tuple[str, str]] = [(p, "quantgate itself") for p in PIPELINE_METRICS]
    checks: dict[str, str] = dict.fromkeys(GATE_CHECKS, "quantgate itself")
    for v in validators:
        if "." in v.name:  # its undeclared metrics are published as <validator>.<key>: that must read one way
            raise PolicyError(f"validator '{v.name}': a validator's name has no '.' (rename its entry point)")
        for name in declared_metrics(v):
            if not _NAME.fullmatch(name.removesuffix("*")):
                raise PolicyError(
                    f"validator '{v.name}' declares metric {name!r}: letters, digits and '_' (a family ends in '*')"
                )
            other = next((owner for p, owner in metrics if owner != v.name and _overlap(p, name)), None)
            if other is not None:
                raise PolicyError(
                    f"validator '{v.name}' declares metric '{name}', which {_owner(other)} declares too: declared "
                    "metric names must be unique among installed validators (uninstall one of them)"
                )
            metrics.append((name, v.name))
        for spec in declared_checks(v):
            if not _NAME.fullmatch(spec.name):
                raise PolicyError(f"validator '{v.name}' declares check {spec.name!r}: letters, digits and '_' only")
            other = checks.get(spec.name)
            if other is not None:
                raise PolicyError(
                    f"validator '{v.name}' declares gate check '{spec.name}', which {_owner(other)} declares too: "
                    "check names must be unique among installed validators (uninstall one of them)"
                )
            checks[spec.name] = v.name


def _owner(name: str) -> str:
    return name if name == "quantgate itself" else f"validator '{name}'"


def _install_hint(name: str) -> str:
    return f"install the package that provides the '{name}' validator"


VALIDATORS: PluginRegistry[Validator] = PluginRegistry(VALIDATORS_GROUP, "validator", Validator, _install_hint)


def load_validators() -> list[Validator]:
    """Every validator registered in the ``quantgate.validators`` group, ours included, each built once per process.

    A third-party validator that is refused at load is skipped with a one-line warning, as MLflow does for plugins;
    two that declare the same metric or check name are a ``PolicyError`` (which one is wrong cannot be known).
    """
    out = VALIDATORS.loadable()
    if not out:
        raise PolicyError("no validators are installed (entry-point group quantgate.validators is empty)")
    check_declarations(out)
    return out
