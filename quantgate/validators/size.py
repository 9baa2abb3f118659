"""Size on disk of the candidate against the FP32 baseline, external-data files included; the ``size`` gate check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from quantgate.validators.base import CheckSpec, Measurement, Reading, Threshold, ValidationContext


class SizeSettings(Threshold):
    """``limit``: the largest candidate bytes / FP32 bytes (gate.max_size_ratio)."""

    limit: float = Field(gt=0.0, le=1000.0)


def read_size(m: Mapping[str, float], s: SizeSettings) -> Reading:
    if "size_ratio" not in m:
        return Reading(None, "size_ratio")
    value = m["size_ratio"]
    return Reading(value, "size_ratio", f"size ratio {value:.3f} of FP32, at most {s.limit:.3f} allowed")


SIZE = CheckSpec(
    name="size",
    metric="size_ratio",
    bound="max",
    settings=SizeSettings,
    description="candidate bytes / FP32 bytes (gate.max_size_ratio)",
    # A candidate with the FP32 weights (e.g. computed in BF16) differs from FP32 only in metadata bytes.
    rel_tol=0.001,
    read=read_size,
)


class SizeValidator:
    name = "size"
    metric_names = ("size_bytes", "baseline_size_bytes", "size_ratio")

    def applies(self, ctx: ValidationContext) -> bool:
        return True

    def checks(self) -> Sequence[CheckSpec[Any]]:
        return (SIZE,)

    def measure(self, ctx: ValidationContext) -> Measurement:
        base, cand = ctx.baseline.size_bytes, ctx.candidate.size_bytes
        return Measurement(
            self.name,
            {"size_bytes": float(cand), "baseline_size_bytes": float(base), "size_ratio": cand / base},
        )
