"""The outcome of one compression: candidates, verdicts, the promoted one, as objects and as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.gate import Check, Verdict
from quantgate.hardware import Hardware
from quantgate.plugins.base import Recipe
from quantgate.redact import redact_data
from quantgate.registry import SourceVersion

# Metrics every candidate reports in the JSON document's short form, in this order.
HEADLINE_METRICS = (
    "speedup",
    "speedup_ci_low",
    "speedup_ci_high",
    "size_ratio",
    "latency_p50_ms",
    "baseline_latency_p50_ms",
    "accuracy_drop",
    "accuracy",
    "fidelity",
)


@dataclass
class CandidateResult:
    recipe: Recipe
    metrics: dict[str, float]
    verdict: Verdict
    hardware: Hardware
    artifact: Path | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    run_id: str | None = None
    registered_uri: str | None = None
    promoted: bool = False
    logged_model_uri: str | None = None  # set when a target-pool step already logged the model (models:/m-...)

    @property
    def backend(self) -> str:
        return self.recipe.backend

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def status(self) -> str:
        """promoted, passed, failed, or skipped (not measured to the end: a quick check or the budget stopped it)."""
        if self.promoted:
            return "promoted"
        return "passed" if self.passed else "skipped" if self.verdict.skipped else "failed"

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "recipe": self.recipe.name,
            "recipe_hash": self.recipe.digest,
            "settings": self.recipe.options,
            "passed": self.passed,
            "promoted": self.promoted,
            "status": self.status,
            "reasons": self.verdict.reasons,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.verdict.checks],
            "metrics": {k: self.metrics[k] for k in HEADLINE_METRICS if k in self.metrics},
            "all_metrics": dict(sorted(self.metrics.items())),
            "notes": self.notes,
            "registered_uri": self.registered_uri,
            "run_id": self.run_id,
            "hardware_fingerprint": self.hardware.fingerprint(),
            "latency_rounds_ms": _rounds(self.details),
        }

    def to_record(self) -> dict[str, object]:
        """Everything needed to rebuild this result in another process (a child run's ``report.json``)."""
        record: dict[str, object] = redact_data(
            self.to_dict()
            | {
                "precision": self.recipe.precision,
                "details": self.details,
                "hardware": self.hardware.as_dict(),
                "logged_model_uri": self.logged_model_uri,
            }
        )
        return record

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> CandidateResult:
        """The inverse of ``to_record``: a result measured by a step on another worker, as the parent gates it."""
        settings = d.get("settings") or {}
        recipe = Recipe.make(str(d["backend"]), str(d["recipe"]), str(d.get("precision", "none")), **settings)
        if recipe.digest != d.get("recipe_hash"):
            raise ValueError(f"{d['backend']}/{d['recipe']}: its settings do not hash to the recorded recipe hash")
        checks = tuple(Check(str(c["name"]), bool(c["passed"]), str(c["detail"])) for c in d.get("checks", []))
        return cls(
            recipe=recipe,
            metrics={str(k): float(v) for k, v in (d.get("all_metrics") or {}).items()},
            verdict=Verdict(bool(d["passed"]) and all(c.passed for c in checks), checks),
            hardware=Hardware.from_dict(d.get("hardware") or {}),
            notes=[str(n) for n in d.get("notes", [])],
            details=dict(d.get("details") or {}),
            run_id=d.get("run_id"),
            logged_model_uri=d.get("logged_model_uri"),
        )


def _rounds(details: dict[str, object]) -> object:
    latency = details.get("latency")
    return latency.get("rounds_ms") if isinstance(latency, dict) else None


@dataclass
class CompressionResult:
    source: SourceVersion
    flavor: str
    policy_hash: str
    hardware: Hardware
    candidates: list[CandidateResult]
    experiment: str
    parent_run_id: str | None = None
    tracking_uri: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> CandidateResult | None:
        return next((c for c in self.candidates if c.promoted), None)

    @property
    def promoted_uri(self) -> str | None:
        winner = self.promoted
        return winner.registered_uri if winner else None

    @property
    def host_notes(self) -> list[str]:
        """What a reader must know about this host to read the figures right."""
        notes = []
        if not self.hardware.int8_dot_product:
            notes.append(
                "this host has no INT8 dot-product instructions (no VNNI/AMX): INT8 may be slower than FP32 here; "
                "the latency gate decided from measurements, not from that assumption"
            )
        return notes

    def to_document(self) -> dict[str, object]:
        """The result as JSON-ready data, credentials in any URI or message masked (it is printed and logged)."""
        doc: dict[str, object] = redact_data(
            {
                "source": {"name": self.source.name, "version": self.source.version, "uri": self.source.uri},
                "flavor": self.flavor,
                "policy_hash": self.policy_hash,
                "outcome": "promoted" if self.promoted else "none_passed",
                "promoted_uri": self.promoted_uri,
                "candidates": [c.to_dict() for c in self.candidates],
                "hardware": self.hardware.as_dict(),
                "host_notes": self.host_notes,
                "experiment": self.experiment,
                "parent_run_id": self.parent_run_id,
                "tracking_uri": self.tracking_uri,
                "timings_s": self.timings,
            }
        )
        return doc
