"""Generated images on which MobileNetV2 learns well and INT8 post-training quantization loses points.

Each image is a strong, smooth random background (the range every activation quantizer must cover) plus one of ten
faint class patterns and little pixel noise: the class lives in a signal far below the background's amplitude, so the
rounding error of an 8-bit grid sized for the background costs accuracy, which fine-tuning under fake quantization
can learn to avoid (suppress the background early, widen the margins that survive rounding). Seeded, no downloads.

Measured on a Zen 2 EPYC (2026-12-07, 3000 training images, 2000 held out, the bench's five PTQ recipes applied
in-process): pixel noise is what decides. At noise 0.5 the network learns to ignore perturbations far larger than
INT8 rounding and PTQ loses nothing; with almost none (0.02, signal 0.15, 24 epochs at 32x32: FP32 top-1 0.9675)
OpenVINO's symmetric INT8 recipes lost 2.1-3.7 points and ONNX Runtime's asymmetric per-channel ones 0.15-0.45. The
same settings through bench_qat.py (another training run, quantgate's own export) lost 1.1-3.3 points on every
recipe: which recipe loses least varies from one trained model to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = 10
SIZE = 32  # a quarter of 64x64's pixels: training and fine-tuning take about a quarter of the time


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


SIGNAL, BACKGROUND, NOISE = 0.15, 4.0, 0.02  # make()'s defaults


def make(n: int, seed: int, signal: float = SIGNAL, background: float = BACKGROUND, noise: float = NOISE) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = (
        background * _smooth(rng, n, 3, max(SIZE // 16, 2))
        + signal * patterns()[y]
        + noise * rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    )
    return Split(np.ascontiguousarray(x, dtype=np.float32), y)
