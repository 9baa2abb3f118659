"""Latency of candidate vs FP32 baseline, measured warm, in blocks, interleaved in one process on this host.

A served model answers call after call: its weights and code stay in cache. Alternating single calls between
models measures each one right after another model evicted it, and hurts runtimes unequally (a real MobileNetV3
classifier read 1.46x that way and 1.73x in blocks of 10). So each runner is timed in a block of consecutive calls,
long enough to last a few tens of milliseconds; the leading calls of a block (while caches refill after the switch)
are not counted as warm. Runners still rotate block by block, so all of them see the same machine noise, and the
speedup and its bootstrap interval come from paired blocks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendError, BackendUnavailable
from quantgate.plugins.base import BareCall, Runner, reference_name
from quantgate.policy import LatencyPolicy
from quantgate.validators import speedup
from quantgate.validators.base import CheckSpec, LatencyTarget, Measurement, ValidationContext

log = logging.getLogger(__name__)

_BOOTSTRAP = 1000
_SEED = 20261123
MAX_BLOCK_CALLS = 64
# Runner overhead above this share of a model's latency is flagged (for models above OVERHEAD_FLOOR_MS).
OVERHEAD_LIMIT = 0.02
OVERHEAD_FLOOR_MS = 1.0
# Adaptive stopping looks at the interval every this many blocks, once ``min_rounds`` are in.
_CHECK_EVERY = 10


def warm_skip(block_calls: int) -> int:
    """Leading calls of a block not counted as warm: measured here, a model's caches take 2-4 calls to refill after
    another model ran (an INT8 MTCNN O-Net: 1.9, 1.4, 1.3, then 1.2 ms), so a quarter of the block, at least one."""
    return max(1, block_calls // 4) if block_calls > 1 else 0


@dataclass(frozen=True)
class BlockTimes:
    """Per-call milliseconds of one runner, one row per block; column 0 is the call right after a switch."""

    calls_ms: np.ndarray  # shape (blocks, block_calls)
    skip: int | None = None  # leading calls not counted as warm; None: ``warm_skip(block_calls)``

    @property
    def block_calls(self) -> int:
        return int(self.calls_ms.shape[1])

    @property
    def _warm(self) -> np.ndarray:
        skip = warm_skip(self.block_calls) if self.skip is None else self.skip
        return self.calls_ms[:, skip:]

    @property
    def warm_ms(self) -> np.ndarray:
        """Every warm call (each block's leading calls, after the switch, are not)."""
        return self._warm.reshape(-1)

    @property
    def block_ms(self) -> np.ndarray:
        """Mean warm per-call milliseconds of each block: the paired samples speedups are computed from."""
        return np.asarray(self._warm.mean(axis=1))

    @property
    def blocks(self) -> int:
        return int(self.calls_ms.shape[0])


def _time_once(runner: Runner, inputs: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter_ns()
    runner.run(inputs)
    return (time.perf_counter_ns() - start) / 1e6


def choose_block_calls(
    runners: Sequence[Runner], inputs: Mapping[str, np.ndarray], min_block_ms: float, probe_calls: int = 5
) -> int:
    """Calls per block so that a block of the fastest runner lasts at least ``min_block_ms``.

    Each runner's fastest of a few calls, after two untimed ones: the first calls after loading or after another
    runner are slow, and a block sized on them would be too short once the runner is warm.
    """

    def warm_call_ms(runner: Runner) -> float:
        for _ in range(2):
            runner.run(inputs)
        return min(_time_once(runner, inputs) for _ in range(probe_calls))

    fastest = min(warm_call_ms(r) for r in runners)
    # The leading calls after a switch are discarded, so a block needs at least two.
    return int(min(MAX_BLOCK_CALLS, max(2, math.ceil(min_block_ms / max(fastest, 1e-3)))))


@dataclass(frozen=True)
class Block:
    """One runner's block: ``calls`` consecutive calls, of which the first ``skip`` are not counted as warm."""

    calls: int
    skip: int


def choose_blocks(
    runners: Sequence[Runner], inputs: Mapping[str, np.ndarray], min_block_ms: float, switch_ms: float
) -> list[Block]:
    """Each runner's own block: enough leading calls to cover ``switch_ms`` after a switch (not counted), then enough
    counted calls to last ``min_block_ms``.

    The refill after a switch takes time, not a number of calls: measured here, a real INT8 CRAFT detector (3 ms a
    call, after ONNX Runtime FP32 ran) took 4.4, 3.7, 3.3, 3.2, 3.0 ms before its steady 2.9 ms; a 1 ms INT8 O-Net
    was steady after three calls. A slow FP32 runner gets short blocks, a fast INT8 one long blocks.
    """
    out = []
    for runner in runners:
        for _ in range(2):
            runner.run(inputs)
        ms = max(min(_time_once(runner, inputs) for _ in range(5)), 1e-3)
        skip = max(1, math.ceil(switch_ms / ms))
        counted = max(1, math.ceil(min_block_ms / ms))
        total = min(MAX_BLOCK_CALLS, skip + counted)
        out.append(Block(total, min(skip, total - 1)))
    return out


StopRule = Callable[[list[BlockTimes]], bool]


def measure_blocked(
    runners: Sequence[Runner],
    inputs: Mapping[str, np.ndarray],
    *,
    warmup: int,
    rounds: int,
    block_calls: int | Sequence[Block],
    min_rounds: int | None = None,
    stop: StopRule | None = None,
) -> list[BlockTimes]:
    """Per-call milliseconds for every runner, in blocks of ``block_calls``; each round starts with the next runner,
    so none is always first. With ``stop``, measuring ends early once ``stop`` says the figures decide (checked
    every few rounds after ``min_rounds``)."""
    for _ in range(warmup):
        for runner in runners:
            runner.run(inputs)
    n = len(runners)
    blocks = [Block(block_calls, warm_skip(block_calls))] * n if isinstance(block_calls, int) else list(block_calls)
    times = [np.empty((rounds, b.calls)) for b in blocks]
    done = rounds
    floor = rounds if min_rounds is None else max(min_rounds, 2)
    for i in range(rounds):
        for j in range(n):
            k = (i + j) % n
            row = times[k][i]
            runner = runners[k]
            for c in range(blocks[k].calls):
                row[c] = _time_once(runner, inputs)
        check = stop is not None and i + 1 >= floor and (i + 1) % _CHECK_EVERY == 0
        if check and stop is not None and stop([BlockTimes(t[: i + 1], b.skip) for t, b in zip(times, blocks)]):  # noqa: B905
            done = i + 1
            break
    return [BlockTimes(t[:done], b.skip) for t, b in zip(times, blocks, strict=True)]


def measure_interleaved(
    baseline: Runner, candidate: Runner, inputs: Mapping[str, np.ndarray], *, warmup: int, rounds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Warm per-block milliseconds for baseline and candidate (blocks as long as the policy's default)."""
    block = choose_block_calls([baseline, candidate], inputs, LatencyPolicy().min_block_ms)
    base, cand = measure_blocked([baseline, candidate], inputs, warmup=warmup, rounds=rounds, block_calls=block)
    return base.block_ms, cand.block_ms


def paired_speedup(base: np.ndarray, cand: np.ndarray) -> float:
    """The median over paired blocks of base/cand: each pair was timed within tens of milliseconds of each other.

    A shared host slows everything for seconds at a time (other tenants on the same cores). Pairing cancels those
    phases: measured on the real MTCNN nets under load, 8 repeats of 40 blocks, the spread of this estimate was half
    that of median(base)/median(cand) (coefficient of variation 0.078 against 0.178 on O-Net, 0.040 against 0.067 on
    R-Net), since the two medians may come from different phases.
    """
    return float(np.median(base / cand))


def speedup_ci(base: np.ndarray, cand: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``paired_speedup``, resampling paired blocks."""
    rng = np.random.default_rng(_SEED)
    ratios = base / cand
    idx = rng.integers(0, len(ratios), size=(_BOOTSTRAP, len(ratios)))
    estimates = np.median(ratios[idx], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


# -- what decides early stopping ------------------------------------------------------------------------------


# An interval narrower than this share of its estimate has decided all a shared host can tell apart.
RESOLUTION = 0.04


def decided(times: list[BlockTimes], target: LatencyTarget) -> bool:
    """True once more blocks could not change the gate's verdict nor the ranking against ``target.beat`` (or could
    only separate candidates within ``RESOLUTION`` of each other: a tie on this host), or once the search's
    deadline has passed (the figures then have the blocks timed so far, and a wider interval)."""
    if target.deadline is not None and time.monotonic() >= target.deadline:
        return True
    cand = times[1].block_ms
    if target.min_speedup is not None:
        gated = target.ref if target.gate_on_reference and target.ref is not None and target.ref < len(times) else 0
        low, high = speedup_ci(times[gated].block_ms, cand)
        if low <= target.min_speedup <= high:
            return False
        if high < target.min_speedup:
            return True  # fails the gate: the ranking no longer matters
    if target.beat is not None and target.ref is not None and target.ref < len(times):
        ref = times[target.ref].block_ms
        low, high = speedup_ci(ref, cand)
        if low <= target.beat <= high:
            return (high - low) < RESOLUTION * paired_speedup(ref, cand)
    return True


# -- a short measurement of what a failed candidate's kind of arithmetic runs at ------------------------------------

PROBE_BLOCKS = 12


@dataclass(frozen=True)
class Probe:
    """A candidate's speed over the reference runner, from a few blocks: what its family can reach on this host."""

    speedup: float
    ci_low: float
    ci_high: float
    blocks: int


def probe_speed(reference: Runner, candidate: Runner, inputs: Mapping[str, np.ndarray], cfg: LatencyPolicy) -> Probe:
    """``PROBE_BLOCKS`` warm blocks of ``candidate`` and ``reference``, rotating, as the validator times them.

    The search times a candidate that failed on quality this way (never gated on it): recipes of the same backend,
    arithmetic and float precision run at about the same speed whatever their calibration, so this says whether
    restoring float layers or calibrating otherwise could still beat the best candidate so far.
    """
    runners = [reference, candidate]
    block: int | list[Block] = cfg.block_calls or choose_blocks(runners, inputs, cfg.min_block_ms, cfg.switch_ms)
    timed = measure_blocked(runners, inputs, warmup=min(cfg.warmup, 5), rounds=PROBE_BLOCKS, block_calls=block)
    ref, cand = timed[0].block_ms, timed[1].block_ms
    low, high = speedup_ci(ref, cand)
    return Probe(paired_speedup(ref, cand), low, high, timed[0].blocks)


# -- cold start and runner overhead ------------------------------------------------------------------------------


def first_call_ms(
    open_runner: Callable[[], Runner], inputs: Mapping[str, np.ndarray], times: int
) -> tuple[float, float]:
    """Median (load ms, first-call ms) over ``times`` fresh loads: what a serverless user waits for."""
    loads, firsts = [], []
    for _ in range(times):
        t0 = time.perf_counter_ns()
        runner = open_runner()
        t1 = time.perf_counter_ns()
        runner.run(inputs)
        t2 = time.perf_counter_ns()
        loads.append((t1 - t0) / 1e6)
        firsts.append((t2 - t1) / 1e6)
        del runner
    return float(np.median(loads)), float(np.median(firsts))


@dataclass(frozen=True)
class Overhead:
    """The Python work a runner does around its runtime call, measured on a trivial model."""

    call_ms: float  # runner.run on the trivial model
    bare_ms: float | None  # the runtime call alone, where the runner exposes it
    overhead_ms: float  # call_ms - bare_ms (or call_ms when the bare call is unknown: an upper bound)


def measure_overhead(
    runner: Runner, inputs: Mapping[str, np.ndarray], *, calls: int = 200, blocks: int = 15
) -> Overhead:
    """Median per-call time of ``runner.run`` and of its bare runtime call, alternating in blocks."""
    bare: Callable[[], object] | None = runner.bare(inputs) if isinstance(runner, BareCall) else None
    run_ms: list[float] = []
    bare_ms: list[float] = []
    for _ in range(blocks):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            runner.run(inputs)
        run_ms.append((time.perf_counter_ns() - t0) / 1e6 / calls)
        if bare is not None:
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                bare()
            bare_ms.append((time.perf_counter_ns() - t0) / 1e6 / calls)
    call = float(np.median(run_ms))
    if bare is None:
        return Overhead(call, None, call)
    raw = float(np.median(bare_ms))
    return Overhead(call, raw, max(call - raw, 0.0))


def overhead_flagged(overhead_ms: float, latency_ms: float) -> bool:
    """Whether a runner's own work distorts a model's latency figure (models above 1 ms; more than 2%)."""
    return latency_ms > OVERHEAD_FLOOR_MS and overhead_ms > OVERHEAD_LIMIT * latency_ms


# -- the validator ---------------------------------------------------------------------------------------------


def _batch(ctx: ValidationContext, size: int) -> dict[str, np.ndarray]:
    return latency_batch(ctx.evaluation, size)


def latency_batch(evaluation: NpzDataset, size: int) -> dict[str, np.ndarray]:
    """The first ``size`` evaluation samples (repeated when there are fewer): the inputs latency is timed on."""
    head = evaluation.take(size).inputs
    n = next(iter(head.values())).shape[0]
    if n >= size:
        return head
    reps = -(-size // n)
    return {k: np.concatenate([v] * reps)[:size] for k, v in head.items()}


class LatencyValidator:
    name = "latency"
    metric_names = speedup.METRIC_NAMES  # what it declares lives in speedup.py

    def __init__(self) -> None:
        # Per run (validators are loaded once per compression run): the baseline's cold start and each runner type's
        # overhead are measured once, not once per candidate.
        self._cold: dict[str, tuple[float, float]] = {}
        self._overhead: dict[str, Overhead | None] = {}

    def applies(self, ctx: ValidationContext) -> bool:
        return True

    def checks(self) -> Sequence[CheckSpec[Any]]:
        return (speedup.SPEEDUP,)

    def measure(self, ctx: ValidationContext) -> Measurement:
        cfg = ctx.latency
        metrics: dict[str, float] = {"threads": float(cfg.threads)}
        details: dict[str, object] = {"threads": cfg.threads, "batch_sizes": list(cfg.batch_sizes)}
        reference = ctx.reference_runner
        on_reference = ctx.baseline.recipe.backend == reference_name()
        for i, size in enumerate(cfg.batch_sizes):
            inputs = _batch(ctx, size)
            runners = [ctx.baseline_runner, ctx.candidate_runner]
            if reference is not None and not on_reference:
                runners.append(reference)
            block: int | list[Block] = cfg.block_calls or choose_blocks(
                runners, inputs, cfg.min_block_ms, cfg.switch_ms
            )
            stop = None
            if cfg.adaptive and i == 0 and ctx.latency_target is not None:
                target = ctx.latency_target
                if target.ref is None:
                    ref = 0 if on_reference else 2
                    target = replace(target, ref=ref)
                stop = _stop_rule(target)
            timed = measure_blocked(
                runners, inputs, warmup=cfg.warmup, rounds=cfg.rounds, block_calls=block,
                min_rounds=cfg.min_rounds, stop=stop,
            )  # fmt: skip
            per_batch = _figures(timed, on_reference)
            per_batch["block_calls"] = float(timed[1].block_calls)
            per_batch["baseline_block_calls"] = float(timed[0].block_calls)
            per_batch["rounds"] = float(timed[0].blocks)
            metrics.update({f"{k}_b{size}": v for k, v in per_batch.items()})
            if i == 0:  # the first batch size is the one the gate reads
                metrics.update(per_batch)
                metrics["gate_batch_size"] = float(size)
                # Every block, so a report can draw the distributions and not only p50/p95.
                details["rounds_ms"] = {
                    "baseline": _rounded(timed[0].block_ms),
                    "candidate": _rounded(timed[1].block_ms),
                }
                details["block_calls"] = [t.block_calls for t in timed]
                details["warm_skip"] = [warm_skip(t.block_calls) if t.skip is None else t.skip for t in timed]
                details["blocks"] = timed[0].blocks
                details["stopped_early"] = timed[0].blocks < cfg.rounds
        first = _batch(ctx, cfg.batch_sizes[0])
        metrics.update(self._cold_start(ctx, first))
        notes = self._overhead_figures(ctx, metrics)
        details["notes"] = notes
        return Measurement(self.name, metrics, details)

    def _cold_start(self, ctx: ValidationContext, inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        cfg = ctx.latency
        if cfg.cold_starts == 0 or ctx.open_candidate is None or ctx.open_baseline is None:
            return {}
        key = str(ctx.baseline.artifact)
        if key not in self._cold:
            self._cold[key] = first_call_ms(ctx.open_baseline, inputs, cfg.cold_starts)
        base_load, base_first = self._cold[key]
        load, first = first_call_ms(ctx.open_candidate, inputs, cfg.cold_starts)
        return {
            "load_ms": load,
            "first_call_ms": first,
            "baseline_load_ms": base_load,
            "baseline_first_call_ms": base_first,
            "first_call_speedup": base_first / first if first > 0 else 0.0,
        }

    def _overhead_figures(self, ctx: ValidationContext, metrics: dict[str, float]) -> list[str]:
        if ctx.open_trivial is None:
            return []
        backend = ctx.candidate.recipe.backend
        if backend not in self._overhead:
            try:
                runner, inputs = ctx.open_trivial()
            except (BackendError, BackendUnavailable) as exc:
                # A backend that converts from the source format (LiteRT from pytorch) cannot open a bare ONNX
                # graph: its runner's own overhead is then not measured, which is all this figure is for.
                log.info("runner overhead of %s not measured: %s", backend, exc)
                self._overhead[backend] = None
            else:
                self._overhead[backend] = measure_overhead(runner, inputs)
        over = self._overhead[backend]
        if over is None:
            return []
        metrics["runner_overhead_ms"] = over.overhead_ms
        metrics["runner_trivial_call_ms"] = over.call_ms
        latency = metrics.get("latency_p50_ms", 0.0)
        if not overhead_flagged(over.overhead_ms, latency):
            return []
        metrics["runner_overhead_flagged"] = 1.0
        what = "its per-call work" if over.bare_ms is not None else "its per-call floor (no bare call to subtract)"
        return [
            f"the {backend} runner's {what} is {over.overhead_ms * 1000:.0f} us on a trivial model, "
            f"{over.overhead_ms / latency:.1%} of this model's {latency:.2f} ms: its latency figure is inflated"
        ]


def _stop_rule(target: LatencyTarget) -> StopRule:
    return lambda times: decided(times, target)


def _figures(timed: list[BlockTimes], on_reference: bool) -> dict[str, float]:
    base, cand = timed[0], timed[1]
    low, high = speedup_ci(base.block_ms, cand.block_ms)
    out = {
        # p50: the median block (a block's mean warm call); p95: of single calls; speedups: paired blocks.
        "baseline_latency_p50_ms": float(np.median(base.block_ms)),
        "baseline_latency_p95_ms": float(np.percentile(base.warm_ms, 95)),
        "latency_p50_ms": float(np.median(cand.block_ms)),
        "latency_p95_ms": float(np.percentile(cand.warm_ms, 95)),
        "speedup": paired_speedup(base.block_ms, cand.block_ms),
        "speedup_ci_low": low,
        "speedup_ci_high": high,
    }
    if on_reference:  # the baseline is ONNX Runtime FP32 already
        out["speedup_vs_ort_fp32"] = out["speedup"]
        out["speedup_vs_ort_fp32_ci_low"], out["speedup_vs_ort_fp32_ci_high"] = low, high
    elif len(timed) == 3:
        ref = timed[2]
        out["ort_fp32_latency_p50_ms"] = float(np.median(ref.block_ms))
        out["speedup_vs_ort_fp32"] = paired_speedup(ref.block_ms, cand.block_ms)
        out["speedup_vs_ort_fp32_ci_low"], out["speedup_vs_ort_fp32_ci_high"] = speedup_ci(ref.block_ms, cand.block_ms)
        out["baseline_speedup_vs_ort_fp32"] = paired_speedup(ref.block_ms, base.block_ms)
    return out


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]
