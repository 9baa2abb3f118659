"""Top-1 accuracy against the evaluation set's ``labels``, for baseline and candidate."""

from __future__ import annotations

import numpy as np

from quantgate.validators.base import Measurement, ValidationContext


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=1) == labels))


class AccuracyValidator:
    name = "accuracy"

    def applies(self, ctx: ValidationContext) -> bool:
        return ctx.evaluation.has_labels

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
