"""Where pass/fail/skip is decided, and nowhere else: the policy's thresholds against measured metrics, a reason for
every failed check; then the winner.

The checks are declared by validators (``CheckSpec`` on the ``Gates`` protocol of ``quantgate/validators/base.py``),
the built-in four like any third party's. A policy sets them under ``gate.checks.<validator>.<check>``; the built-in
ones with the gate keys that are older than that (``TOP_LEVEL``). The rest of quantgate hands this module facts (a
build error, a search that stopped, a recipe that needs its target, the hardware a step ran on) and gets verdicts.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from quantgate.errors import PolicyError
from quantgate.policy import GatePolicy
from quantgate.validators.base import (
    CheckSpec,
    Threshold,
    Validator,
    declared_checks,
    load_validators,
    metric_key,
    own_metrics,
)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  # human-readable: what was measured against what was required


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    @property
    def skipped(self) -> bool:
        """Not measured to the end (a quick check, the budget): neither a pass nor a measured failure."""
        return any(c.name == SKIPPED for c in self.checks)


# The checks this module adds from facts it is handed; no validator may declare these names (validators/base.py).
BUILD, SKIPPED, TARGET, HARDWARE = "build", "skipped", "target", "hardware"

# The gate keys that are older than gate.checks (documented, and in policies out there): each sets one setting of a
# built-in validator's declared check, as (validator, check, setting).
TOP_LEVEL: dict[str, tuple[str, str, str]] = {
    "max_accuracy_drop": ("accuracy", "accuracy", "limit"),
    "min_fidelity": ("fidelity", "fidelity", "limit"),
    "min_speedup": ("latency", "speedup", "limit"),
    "speedup_statistic": ("latency", "speedup", "statistic"),
    "speedup_against": ("latency", "speedup", "against"),
    "speedup_on": ("latency", "speedup", "on"),
    "max_size_ratio": ("size", "size", "limit"),
}


@dataclass(frozen=True)
class GateCheck:
    """A declared check with the settings the policy gives it: what ``judge`` applies."""

    validator: Validator
    spec: CheckSpec[Any]
    settings: Threshold


def configure(gate: GatePolicy, validators: Sequence[Validator]) -> tuple[GateCheck, ...]:
    """The checks the policy sets, in validator order, each with its settings validated against the schema its
    validator declares. An unknown validator or check (with the closest declared name), a built-in check set under
    ``gate.checks`` too, a top-level key whose validator is not installed, or a bad setting is a one-line
    ``PolicyError``."""
    declared = {v.name: {s.name: s for s in declared_checks(v)} for v in validators}
    legacy: dict[tuple[str, str], dict[str, object]] = {}
    for key, (owner, check, setting) in TOP_LEVEL.items():
        legacy.setdefault((owner, check), {})[setting] = getattr(gate, key)
    _check_names(gate, declared, legacy)
    out: list[GateCheck] = []
    for v in validators:
        for spec in declared[v.name].values():
            raw: object
            if (v.name, spec.name) in legacy:
                values = legacy[(v.name, spec.name)]
                if values["limit"] is None:
                    continue  # null: not checked
                raw, where = values, "gate." + _top_level_key(v.name, spec.name)
            elif spec.name in gate.checks.get(v.name, {}):
                raw, where = gate.checks[v.name][spec.name], f"gate.checks.{v.name}.{spec.name}"
            else:
                continue  # a declared check the policy does not set is not checked
            out.append(GateCheck(v, spec, _settings(spec, raw, where)))
    return tuple(out)


def _top_level_key(validator: str, check: str) -> str:
    """The top-level key that sets the limit of a built-in check."""
    return next(k for k, (v, c, s) in TOP_LEVEL.items() if (v, c, s) == (validator, check, "limit"))


def policy_key(validator: str, check: str) -> str:
    """Where a policy sets a validator's check: its top-level key for a built-in one, else under gate.checks."""
    if any((v, c) == (validator, check) for v, c, _ in TOP_LEVEL.values()):
        return "gate." + _top_level_key(validator, check)
    return f"gate.checks.{validator}.{check}"


def _check_names(
    gate: GatePolicy, declared: Mapping[str, Mapping[str, CheckSpec[Any]]], legacy: Mapping[tuple[str, str], Any]
) -> None:
    gating = sorted(n for n, checks in declared.items() if checks)
    for name, checks in gate.checks.items():
        where = f"gate.checks.{name}"
        if name not in declared:
            raise _unknown(where, "validator", name, gating)
        if not declared[name]:
            raise PolicyError(f"invalid policy: {where}: validator '{name}' declares no gate checks")
        for check in checks:
            if check not in declared[name]:
                raise _unknown(f"{where}.{check}", "check", check, sorted(declared[name]), f" of validator '{name}'")
            if (name, check) in legacy:
                keys = ", ".join(f"gate.{k}" for k, (v, c, _) in TOP_LEVEL.items() if (v, c) == (name, check))
                raise PolicyError(f"invalid policy: {where}.{check}: this check is set with {keys}; set it there")
    for (owner, check), raw in legacy.items():
        if raw["limit"] is not None and check not in declared.get(owner, {}):
            raise PolicyError(
                f"invalid policy: gate.{_top_level_key(owner, check)} needs the {check} check of the '{owner}' "
                "validator, which is not installed (`quantgate validators` lists what is)"
            )


def _unknown(where: str, what: str, name: str, known: Sequence[str], of: str = "") -> PolicyError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    maybe = f"; did you mean '{close[0]}'?" if close else ""
    return PolicyError(
        f"invalid policy: {where}: unknown {what} '{name}'{of}{maybe} (declared: {', '.join(known) or 'none'})"
    )


def _settings(spec: CheckSpec[Any], raw: object, where: str) -> Threshold:
    """The policy's value for a check, validated by the check's own schema: a number is its ``limit``."""
    data = {"limit": raw} if isinstance(raw, int | float | str) and not isinstance(raw, bool) else raw
    try:
        settings: Threshold = spec.settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PolicyError(f"invalid policy: {where}{'.' + loc if loc else ''}: {msg}{more}") from None
    return settings


def judge(
    metrics: Mapping[str, float],
    gate: GatePolicy,
    *,
    has_labels: bool,
    validators: Sequence[Validator] | None = None,
    only: Collection[str] | None = None,
    error: str | None = None,
) -> Verdict:
    """Every check the policy sets, applied to ``metrics``.

    ``validators``: the run's (default: every installed one); ``only``: the names of those whose checks apply (the
    ones measured so far: quality before latency); checks that need labels are left out without them. A candidate
    that failed to build (``error``) fails with that reason only.
    """
    if error is not None:
        return failed(error)
    configured = configure(gate, validators if validators is not None else load_validators())
    checks = tuple(
        _decide(c, metrics)
        for c in configured
        if (only is None or c.validator.name in only) and (has_labels or not c.spec.needs_labels)
    )
    return Verdict(all(c.passed for c in checks), checks)


def _decide(check: GateCheck, metrics: Mapping[str, float]) -> Check:
    spec, limit = check.spec, check.settings.limit
    reading = spec.reading(own_metrics(check.validator, metrics), check.settings)
    key = metric_key(check.validator, reading.metric)
    if reading.value is None:
        return Check(spec.name, False, f"{key} was not measured, so the {spec.name} check cannot pass")
    slack = spec.abs_tol + spec.rel_tol * abs(limit)
    passed = reading.value >= limit - slack if spec.bound == "min" else reading.value <= limit + slack
    need = f"at least {limit:.6g} required" if spec.bound == "min" else f"at most {limit:.6g} allowed"
    return Check(spec.name, passed, reading.detail or f"{key} {reading.value:.6g}, {need}")


def failed(reason: str) -> Verdict:
    """A candidate that was never measured (its build failed, its backend is unavailable): that reason only."""
    return Verdict(False, (Check(BUILD, False, reason),))


def skip(reason: str, measured: Verdict | None = None) -> Verdict:
    """A candidate the search stopped before the end, with why; ``measured``: the checks it did get."""
    return Verdict(False, (*(measured.checks if measured else ()), Check(SKIPPED, False, reason)))


def needs_target(quality: Verdict, reason: str) -> Verdict:
    """A recipe whose host-independent step ran here: its quality checks, and a failure naming the hardware its
    latency must be measured on (never off-target)."""
    return Verdict(False, (*quality.checks, Check(TARGET, False, reason)))


def on_hardware(verdict: Verdict, where: str, pool: str, problems: Sequence[str], forged: str | None = None) -> Verdict:
    """``verdict`` with the hardware check of a candidate that had a target pool: ``where`` it was measured,
    ``problems``: how that host falls short of the pool's requirements; ``forged``: why its record cannot be
    trusted (a fingerprint that does not match the hardware it records)."""
    if forged is not None:
        check = Check(HARDWARE, False, f"{where}: {forged}")
    elif problems:
        check = Check(HARDWARE, False, f"{where}: refused for pool {pool}: {'; '.join(problems)}")
    else:
        check = Check(HARDWARE, True, f"{where}: meets the requirements of pool {pool}")
    return Verdict(verdict.passed and check.passed, (*verdict.checks, check))


def choose_winner(candidates: Sequence[tuple[Verdict, Mapping[str, float]]]) -> int | None:
    """Index of the fastest passing candidate (ties go to the smaller one), or ``None``.

    Each candidate's own speedup is against FP32 on its own runtime; across runtimes they are ranked by the speedup
    against ONNX Runtime FP32, measured side by side with each candidate, when every passing candidate has it.
    """
    passing = [m for v, m in candidates if v.passed]
    common = "speedup_vs_ort_fp32" if passing and all("speedup_vs_ort_fp32" in m for m in passing) else "speedup"
    best: int | None = None
    best_key: tuple[float, float] = (0.0, 0.0)
    for i, (verdict, metrics) in enumerate(candidates):
        if not verdict.passed:
            continue
        key = (metrics.get(common, 0.0), -metrics.get("size_ratio", 1.0))
        if best is None or key > best_key:
            best, best_key = i, key
    return best
