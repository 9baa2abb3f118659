"""Size on disk of the candidate against the FP32 baseline, external-data files included."""

from __future__ import annotations

from quantgate.validators.base import Measurement, ValidationContext


class SizeValidator:
    name = "size"

    def applies(self, ctx: ValidationContext) -> bool:
        return True

    def measure(self, ctx: ValidationContext) -> Measurement:
        base, cand = ctx.baseline.size_bytes, ctx.candidate.size_bytes
        return Measurement(
            self.name,
            {"size_bytes": float(cand), "baseline_size_bytes": float(base), "size_ratio": cand / base},
        )
