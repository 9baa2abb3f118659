"""What the latency validator declares: the metric names it reports, and the ``speedup`` gate check.

Apart from the validator (``latency.py``) because they are its contract with the gate and the documents, not its
measuring; every name here is documented (README: the ``--json`` document, "How latency is measured").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from quantgate.plugins.base import reference_label
from quantgate.validators.base import CheckSpec, Reading, Threshold

# Figures of one batch size; the gated (first) batch size's are reported as they are, every batch size's with a
# ``_b<size>`` suffix.
PER_BATCH = (
    "baseline_latency_p50_ms",
    "baseline_latency_p95_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "speedup",
    "speedup_ci_low",
    "speedup_ci_high",
    "speedup_vs_ort_fp32",
    "speedup_vs_ort_fp32_ci_low",
    "speedup_vs_ort_fp32_ci_high",
    "ort_fp32_latency_p50_ms",
    "baseline_speedup_vs_ort_fp32",
    "block_calls",
    "baseline_block_calls",
    "rounds",
)
METRIC_NAMES = (
    *PER_BATCH,
    *(f"{name}_b*" for name in PER_BATCH),
    "threads",
    "gate_batch_size",
    # first call after loading (cold start)
    "load_ms",
    "first_call_ms",
    "baseline_load_ms",
    "baseline_first_call_ms",
    "first_call_speedup",
    # the runner's own per-call work, on a trivial model
    "runner_overhead_ms",
    "runner_trivial_call_ms",
    "runner_overhead_flagged",
)


class SpeedupSettings(Threshold):
    """``limit``: the least speedup (gate.min_speedup); the other settings are gate.speedup_*."""

    limit: float = Field(gt=0.0, le=1000.0)
    statistic: Literal["p50", "ci_low"] = "ci_low"
    against: Literal["reference", "own_fp32"] = "reference"
    on: Literal["warm", "first_call"] = "warm"


def read_speedup(m: Mapping[str, float], s: SpeedupSettings) -> Reading:
    """The speedup the settings name: warm against the reference runtime or the own FP32, its p50 or the lower
    bound of its 95% interval; or the first call after loading."""
    if s.on == "first_call":
        if "first_call_speedup" not in m:
            return Reading(None, "first_call_speedup")
        value = m["first_call_speedup"]
        text = (
            f"first-call speedup {value:.2f}x ({m.get('baseline_first_call_ms', 0):.2f} -> "
            f"{m.get('first_call_ms', 0):.2f} ms after loading), at least {s.limit:.2f}x required"
        )
        return Reading(value, "first_call_speedup", text)
    base = "speedup_vs_ort_fp32" if s.against == "reference" else "speedup"
    key = base if s.statistic == "p50" else f"{base}_ci_low"
    if key not in m:
        return Reading(None, key)
    batch = int(m.get("gate_batch_size", 1))
    ci = f" (95% CI {m.get(base + '_ci_low', 0):.2f}-{m.get(base + '_ci_high', 0):.2f}"
    ci += f", warm blocks of {int(m['block_calls'])} calls)" if "block_calls" in m else ")"
    what = "speedup" if s.statistic == "p50" else "speedup lower bound"
    over = f" over {reference_label()}" if s.against == "reference" else ""
    text = f"{what}{over} {m[key]:.2f}x at batch {batch}{ci}, at least {s.limit:.2f}x required"
    return Reading(m[key], key, text)


SPEEDUP = CheckSpec(
    "speedup",
    "speedup_vs_ort_fp32_ci_low",
    "min",
    SpeedupSettings,
    "FP32 p50 latency / candidate p50 latency at the first latency batch size (gate.min_speedup, gate.speedup_*)",
    read=read_speedup,
)
