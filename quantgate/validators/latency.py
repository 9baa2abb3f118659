"""Latency of candidate vs FP32 baseline, measured interleaved in one process on this host.

Interleaving (ABBA order, round by round) makes both models see the same machine noise, which matters on
a shared host: the ratio of medians is stable even when absolute times drift.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from quantgate.plugins.base import Runner
from quantgate.validators.base import Measurement, ValidationContext

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
    for _ in range(warmup):
        baseline.run(inputs)
        candidate.run(inputs)
    base = np.empty(rounds)
    cand = np.empty(rounds)
    for i in range(rounds):
        if i % 2 == 0:
            base[i] = _time_once(baseline, inputs)
            cand[i] = _time_once(candidate, inputs)
        else:
            cand[i] = _time_once(candidate, inputs)
            base[i] = _time_once(baseline, inputs)
    return base, cand


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
        for i, size in enumerate(cfg.batch_sizes):
            inputs = _batch(ctx, size)
            base, cand = measure_interleaved(
                ctx.baseline_runner, ctx.candidate_runner, inputs, warmup=cfg.warmup, rounds=cfg.rounds
            )
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
            metrics.update({f"{k}_b{size}": v for k, v in per_batch.items()})
            if i == 0:  # the first batch size is the one the gate reads
                metrics.update(per_batch)
                metrics["gate_batch_size"] = float(size)
        return Measurement(self.name, metrics, {"threads": cfg.threads, "batch_sizes": list(cfg.batch_sizes)})
