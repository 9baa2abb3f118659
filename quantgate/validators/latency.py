"""Latency of candidate vs FP32 baseline, measured interleaved in one process on this host.

Interleaving (ABBA order, round by round) makes both models see the same machine noise, which matters on
a shared host: the ratio of medians is stable even when absolute times drift.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from quantgate.plugins.base import Runner
from quantgate.validators.base import Measurement, ValidationContext

REFERENCE_BACKEND = "onnxruntime"
_BOOTSTRAP = 1000
_SEED = 20261123


def _time_once(runner: Runner, inputs: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter_ns()
    runner.run(inputs)
    return (time.perf_counter_ns() - start) / 1e6


def measure_interleaved(
    baseline: Runner, candidate: Runner, inputs: Mapping[str, np.ndarray], *, warmup: int, rounds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-round milliseconds for baseline and candidate, alternating which goes first."""
    base, cand = measure_rotating([baseline, candidate], inputs, warmup=warmup, rounds=rounds)
    return base, cand


def measure_rotating(
    runners: Sequence[Runner], inputs: Mapping[str, np.ndarray], *, warmup: int, rounds: int
) -> list[np.ndarray]:
    """Per-round milliseconds for every runner; each round starts with the next runner, so none is always first."""
    for _ in range(warmup):
        for runner in runners:
            runner.run(inputs)
    times = [np.empty(rounds) for _ in runners]
    n = len(runners)
    for i in range(rounds):
        for j in range(n):
            k = (i + j) % n
            times[k][i] = _time_once(runners[k], inputs)
    return times


def speedup_ci(base: np.ndarray, cand: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(base)/median(cand), resampling paired rounds."""
    rng = np.random.default_rng(_SEED)
    idx = rng.integers(0, len(base), size=(_BOOTSTRAP, len(base)))
    ratios = np.median(base[idx], axis=1) / np.median(cand[idx], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def _batch(ctx: ValidationContext, size: int) -> dict[str, np.ndarray]:
    head = ctx.evaluation.take(size).inputs
    n = next(iter(head.values())).shape[0]
    if n >= size:
        return head
    reps = -(-size // n)
    return {k: np.concatenate([v] * reps)[:size] for k, v in head.items()}


class LatencyValidator:
    name = "latency"

    def applies(self, ctx: ValidationContext) -> bool:
        return True

    def measure(self, ctx: ValidationContext) -> Measurement:
        cfg = ctx.latency
        metrics: dict[str, float] = {"threads": float(cfg.threads), "rounds": float(cfg.rounds)}
        rounds_ms: dict[str, list[float]] = {}
        reference = ctx.reference_runner
        on_reference = ctx.baseline.recipe.backend == REFERENCE_BACKEND
        for i, size in enumerate(cfg.batch_sizes):
            inputs = _batch(ctx, size)
            runners = [ctx.baseline_runner, ctx.candidate_runner]
            if reference is not None and not on_reference:
                runners.append(reference)
            timed = measure_rotating(runners, inputs, warmup=cfg.warmup, rounds=cfg.rounds)
            base, cand = timed[0], timed[1]
            low, high = speedup_ci(base, cand)
            per_batch = {
                "baseline_latency_p50_ms": float(np.median(base)),
                "baseline_latency_p95_ms": float(np.percentile(base, 95)),
                "latency_p50_ms": float(np.median(cand)),
                "latency_p95_ms": float(np.percentile(cand, 95)),
                "speedup": float(np.median(base) / np.median(cand)),
                "speedup_ci_low": low,
                "speedup_ci_high": high,
            }
            if on_reference:  # the baseline is ONNX Runtime FP32 already
                per_batch["speedup_vs_ort_fp32"] = per_batch["speedup"]
            elif len(timed) == 3:
                ref = timed[2]
                per_batch["ort_fp32_latency_p50_ms"] = float(np.median(ref))
                per_batch["speedup_vs_ort_fp32"] = float(np.median(ref) / np.median(cand))
                per_batch["baseline_speedup_vs_ort_fp32"] = float(np.median(ref) / np.median(base))
            metrics.update({f"{k}_b{size}": v for k, v in per_batch.items()})
            if i == 0:  # the first batch size is the one the gate reads
                metrics.update(per_batch)
                metrics["gate_batch_size"] = float(size)
                # Every round, so a report can draw the distributions and not only p50/p95.
                rounds_ms = {"baseline": _rounded(base), "candidate": _rounded(cand)}
        details = {"threads": cfg.threads, "batch_sizes": list(cfg.batch_sizes), "rounds_ms": rounds_ms}
        return Measurement(self.name, metrics, details)


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]
