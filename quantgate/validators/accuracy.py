"""Top-1 accuracy against the evaluation set's ``labels``, for baseline and candidate; the ``accuracy`` gate check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from quantgate.validators.base import CheckSpec, Measurement, Reading, Threshold, ValidationContext


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=1) == labels))


class AccuracySettings(Threshold):
    """``limit``: the largest top-1 drop allowed, absolute (0.01 = 1 point; gate.max_accuracy_drop)."""

    limit: float = Field(ge=0.0, le=1.0)


def read_accuracy(m: Mapping[str, float], s: AccuracySettings) -> Reading:
    if "accuracy_drop" not in m:
        return Reading(None, "accuracy_drop")
    drop = m["accuracy_drop"]
    text = (
        f"top-1 accuracy {m['accuracy_baseline']:.4f} -> {m['accuracy']:.4f} "
        f"(drop {drop * 100:.2f} points, at most {s.limit * 100:.2f} allowed)"
    )
    return Reading(drop, "accuracy_drop", text)


ACCURACY = CheckSpec(
    name="accuracy",
    metric="accuracy_drop",
    bound="max",
    settings=AccuracySettings,
    description="top-1 accuracy drop against FP32 (gate.max_accuracy_drop)",
    needs_labels=True,
    # A drop is a difference of two means: float noise must not fail a drop of exactly the limit.
    abs_tol=1e-12,
    read=read_accuracy,
)


class AccuracyValidator:
    name = "accuracy"
    metric_names = ("accuracy_baseline", "accuracy", "accuracy_drop")

    def applies(self, ctx: ValidationContext) -> bool:
        return ctx.evaluation.has_labels

    def checks(self) -> Sequence[CheckSpec[Any]]:
        return (ACCURACY,)

    def measure(self, ctx: ValidationContext) -> Measurement:
        labels = ctx.baseline_outputs.labels
        assert labels is not None  # applies() guarantees labels
        base = top1(ctx.baseline_outputs.outputs, labels)
        cand = top1(ctx.candidate_outputs.outputs, labels)
        return Measurement(
            self.name,
            {"accuracy_baseline": base, "accuracy": cand, "accuracy_drop": base - cand},
            {"samples": len(labels)},
        )
