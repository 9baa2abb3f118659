"""Output fidelity: mean cosine similarity of candidate outputs to the FP32 outputs, sample by sample; the
``fidelity`` gate check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from quantgate.validators.base import CheckSpec, Measurement, Reading, Threshold, ValidationContext


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a64 * b64, axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    # Two all-zero rows are identical outputs; one zero row against a non-zero one is not.
    both_zero = den == 0
    safe = np.where(both_zero, 1.0, den)
    cos = np.where(both_zero, np.where(np.all(a64 == b64, axis=1), 1.0, 0.0), num / safe)
    return np.asarray(cos)


class FidelitySettings(Threshold):
    """``limit``: the least mean cosine similarity to the FP32 outputs (gate.min_fidelity)."""

    limit: float = Field(ge=-1.0, le=1.0)


def read_fidelity(m: Mapping[str, float], s: FidelitySettings) -> Reading:
    if "fidelity" not in m:
        return Reading(None, "fidelity")
    value = m["fidelity"]
    return Reading(value, "fidelity", f"fidelity (mean cosine) {value:.5f}, at least {s.limit:.5f} required")


FIDELITY = CheckSpec(
    name="fidelity",
    metric="fidelity",
    bound="min",
    settings=FidelitySettings,
    description="mean cosine similarity of the outputs to FP32's (gate.min_fidelity)",
    read=read_fidelity,
)


class FidelityValidator:
    name = "fidelity"
    metric_names = ("fidelity", "fidelity_min")

    def applies(self, ctx: ValidationContext) -> bool:
        return True

    def checks(self) -> Sequence[CheckSpec[Any]]:
        return (FIDELITY,)

    def measure(self, ctx: ValidationContext) -> Measurement:
        base, cand = ctx.baseline_outputs.outputs, ctx.candidate_outputs.outputs
        cos = cosine_per_row(base, cand)
        max_abs = float(np.max(np.abs(base - cand))) if base.size else 0.0
        return Measurement(
            self.name,
            {"fidelity": float(np.mean(cos)), "fidelity_min": float(np.min(cos))},
            {"samples": len(cos), "max_abs_diff": max_abs},
        )
