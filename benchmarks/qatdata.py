"""Generated images on which MobileNetV2 learns well and INT8 post-training quantization loses points.

Each image is a strong, smooth random background (the range every activation quantizer must cover) plus one of ten
faint class patterns and pixel noise: the class lives in a signal far below the background's amplitude, so the
rounding error of an 8-bit grid sized for the background costs accuracy, which fine-tuning under fake quantization
can learn to avoid (suppress the background early, widen the margins that survive rounding). Seeded, no downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = 10
SIZE = 64


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [N, 3, SIZE, SIZE]
    y: np.ndarray  # int64 [N]


def _smooth(rng: np.random.Generator, n: int, channels: int, grid: int) -> np.ndarray:
    """Random fields on a coarse grid, upsampled bilinearly-ish (repeat + box blur): low-frequency structure."""
    coarse = rng.standard_normal((n, channels, grid, grid)).astype(np.float32)
    scale = SIZE // grid
    up = coarse.repeat(scale, axis=2).repeat(scale, axis=3)
    kernel = scale
    out = up.copy()
    for axis in (2, 3):
        acc = np.zeros_like(out)
        for shift in range(-kernel // 2, kernel // 2 + 1):
            acc += np.roll(out, shift, axis=axis)
        out = acc / (kernel + 1)
    return out


def patterns(seed: int = 1234) -> np.ndarray:
    """The ten class patterns: mid-frequency random textures, unit variance."""
    rng = np.random.default_rng(seed)
    p = _smooth(rng, CLASSES, 3, SIZE // 4)
    p -= p.mean(axis=(1, 2, 3), keepdims=True)
    return (p / p.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)


def make(n: int, seed: int, signal: float = 0.35, background: float = 4.0, noise: float = 0.5) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = (
        background * _smooth(rng, n, 3, max(SIZE // 16, 2))
        + signal * patterns()[y]
        + noise * rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    )
    return Split(np.ascontiguousarray(x, dtype=np.float32), y)
