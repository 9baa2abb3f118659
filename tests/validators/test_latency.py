import time
from collections.abc import Callable, Mapping

import numpy as np

from quantgate.gate import judge
from quantgate.policy import GatePolicy
from quantgate.validators.base import LatencyTarget
from quantgate.validators.latency import (
    MAX_BLOCK_CALLS,
    BlockTimes,
    choose_block_calls,
    decided,
    measure_blocked,
    measure_interleaved,
    measure_overhead,
    overhead_flagged,
    paired_speedup,
    speedup_ci,
    warm_skip,
)


class MatmulRunner:
    """A runner whose cost is real work proportional to ``size`` (a numpy matrix product)."""

    def __init__(self, size: int) -> None:
        self.a = np.random.default_rng(0).random((size, size)).astype(np.float32)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [self.a @ self.a]

    def bare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], object]:
        a = self.a
        return lambda: a @ a


class PaddedRunner(MatmulRunner):
    """The same runtime call, plus artificial per-call work around it (what a careless runner adds)."""

    def __init__(self, size: int, pad_s: float) -> None:
        super().__init__(size)
        self.pad_s = pad_s

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        end = time.perf_counter() + self.pad_s
        while time.perf_counter() < end:
            pass
        return super().run(inputs)


def test_interleaved_measurement_finds_the_faster_runner() -> None:
    slow, fast = MatmulRunner(256), MatmulRunner(64)
    base, cand = measure_interleaved(slow, fast, {}, warmup=3, rounds=30)
    assert base.shape == cand.shape == (30,)
    low, high = speedup_ci(base, cand)
    assert low > 1.5 and high >= low
    # the interval is of the median paired ratio; the ratio of medians can leave it when the host's speed drifts
    assert low <= paired_speedup(base, cand) <= high


def test_speedup_ci_brackets_one_for_identical_distributions() -> None:
    rng = np.random.default_rng(1)
    samples = rng.lognormal(0, 0.1, 400)
    low, high = speedup_ci(samples[:200], samples[200:])
    assert low < 1.0 < high


def test_blocks_time_consecutive_calls_and_discard_the_leading_ones_after_a_switch() -> None:
    runners = [MatmulRunner(192), MatmulRunner(128)]
    block = choose_block_calls(runners, {}, min_block_ms=1.0)
    assert block >= 2
    timed = measure_blocked(runners, {}, warmup=2, rounds=12, block_calls=block)
    for t in timed:
        assert t.calls_ms.shape == (12, block)
        skip = warm_skip(block)
        assert 1 <= skip < block
        assert t.warm_ms.shape == (12 * (block - skip),)
        assert np.allclose(t.block_ms, t.calls_ms[:, skip:].mean(axis=1))
    # a block of the fastest runner lasts at least the asked-for milliseconds (within timing noise)
    assert block == MAX_BLOCK_CALLS or np.median(timed[1].calls_ms.sum(axis=1)) > 0.5


def test_blocked_confidence_interval_shrinks_with_more_blocks() -> None:
    rng = np.random.default_rng(7)
    base = rng.lognormal(np.log(2.0), 0.15, 800)
    cand = rng.lognormal(np.log(1.0), 0.15, 800)
    widths = []
    for n in (20, 80, 320):
        low, high = speedup_ci(base[:n], cand[:n])
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # and on real timings: more blocks of the same two runners give a narrower interval
    runners = [MatmulRunner(96), MatmulRunner(64)]
    few = measure_blocked(runners, {}, warmup=2, rounds=8, block_calls=4)
    many = measure_blocked(runners, {}, warmup=2, rounds=240, block_calls=4)
    few_ci = speedup_ci(few[0].block_ms, few[1].block_ms)
    many_ci = speedup_ci(many[0].block_ms, many[1].block_ms)
    assert many_ci[1] - many_ci[0] < few_ci[1] - few_ci[0]


def test_runner_with_artificial_per_call_overhead_is_flagged() -> None:
    clean = measure_overhead(MatmulRunner(8), {}, calls=50, blocks=5)
    padded = measure_overhead(PaddedRunner(8, 200e-6), {}, calls=50, blocks=5)
    assert clean.bare_ms is not None and padded.bare_ms is not None
    assert padded.overhead_ms > 0.15  # the 0.2 ms of padding, measured as the runner's own work
    assert clean.overhead_ms < 0.05
    assert overhead_flagged(padded.overhead_ms, latency_ms=2.0)  # 10% of a 2 ms model
    assert not overhead_flagged(clean.overhead_ms, latency_ms=2.0)
    assert not overhead_flagged(padded.overhead_ms, latency_ms=0.5)  # models under 1 ms are not judged


def _times(base_ms: float, cand_ms: float, blocks: int, spread: float = 0.02) -> list[BlockTimes]:
    rng = np.random.default_rng(3)

    def t(ms: float) -> BlockTimes:
        return BlockTimes(rng.normal(ms, ms * spread, size=(blocks, 4)))

    return [t(base_ms), t(cand_ms), t(base_ms * 1.2)]


def test_adaptive_stop_waits_while_the_interval_straddles_the_gate() -> None:
    # speedup ~1.1 against a 1.1 threshold: undecided, keep measuring
    assert not decided(_times(1.1, 1.0, 40, spread=0.2), LatencyTarget(min_speedup=1.1))
    # a clear pass or a clear fail decides
    assert decided(_times(2.0, 1.0, 40), LatencyTarget(min_speedup=1.1))
    assert decided(_times(1.0, 1.0, 40), LatencyTarget(min_speedup=1.5))


def test_adaptive_stop_also_waits_for_the_ranking() -> None:
    times = _times(2.0, 1.0, 40, spread=0.1)  # 2.4x against the reference (third runner), still a wide interval
    assert not decided(times, LatencyTarget(min_speedup=1.1, beat=2.4, ref=2))
    assert decided(times, LatencyTarget(min_speedup=1.1, beat=1.5, ref=2))


def test_adaptive_measurement_stops_early_once_decided() -> None:
    runners = [MatmulRunner(160), MatmulRunner(48)]
    target = LatencyTarget(min_speedup=1.1)
    timed = measure_blocked(
        runners, {}, warmup=2, rounds=400, block_calls=3, min_rounds=10, stop=lambda t: decided(t, target)
    )
    assert 10 <= timed[0].blocks < 400


def test_gate_reads_first_call_speedup_when_asked() -> None:
    m = {"speedup": 2.0, "speedup_ci_low": 1.9, "speedup_ci_high": 2.1, "block_calls": 12.0}
    m |= {"first_call_speedup": 0.8, "first_call_ms": 5.0, "baseline_first_call_ms": 4.0, "size_ratio": 0.5}
    warm = judge(m, GatePolicy(max_accuracy_drop=None, min_speedup=1.5, speedup_against="own_fp32"), has_labels=False)
    assert warm.passed
    assert "warm blocks of 12 calls" in warm.checks[0].detail
    cold = judge(m, GatePolicy(max_accuracy_drop=None, min_speedup=1.5, speedup_on="first_call"), has_labels=False)
    assert not cold.passed
    assert "first-call speedup 0.80x" in cold.reasons[0]


def test_adaptive_stop_calls_a_tie_once_the_interval_is_narrow() -> None:
    times = _times(2.0, 1.0, 60, spread=0.002)  # 2.4x against the reference, very tight
    assert decided(times, LatencyTarget(min_speedup=1.1, beat=2.4, ref=2))
