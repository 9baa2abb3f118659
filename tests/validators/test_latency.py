from collections.abc import Mapping

import numpy as np

from quantgate.validators.latency import measure_interleaved, speedup_ci


class SleepyRunner:
    """A runner whose cost is real work proportional to ``size`` (busy loop over numpy)."""

    def __init__(self, size: int) -> None:
        self.a = np.random.default_rng(0).random((size, size)).astype(np.float32)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [self.a @ self.a]


def test_interleaved_measurement_finds_the_faster_runner() -> None:
    slow, fast = SleepyRunner(256), SleepyRunner(64)
    base, cand = measure_interleaved(slow, fast, {}, warmup=3, rounds=30)
    assert base.shape == cand.shape == (30,)
    low, high = speedup_ci(base, cand)
    assert low > 1.5 and high >= low
    assert low <= np.median(base) / np.median(cand) <= high


def test_speedup_ci_brackets_one_for_identical_distributions() -> None:
    rng = np.random.default_rng(1)
    samples = rng.lognormal(0, 0.1, 400)
    low, high = speedup_ci(samples[:200], samples[200:])
    assert low < 1.0 < high
