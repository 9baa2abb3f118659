"""Feed ONNX Runtime's static calibration from an ``NpzDataset`` without holding the whole set in memory.

``quantize_static`` keeps the augmented model's outputs for every batch a reader yields until
``collect_data`` returns; the histogram calibrators (Entropy, Percentile) keep every intermediate
activation, so peak memory grows with the number of samples. With ``CalibStridedMinMax`` set (the name is
historical: quantize_static applies it to every calibrator), it asks ``len(reader)``, then calls
``set_range`` + ``collect_data`` once per stride; MinMax merges its ranges across calls and the
HistogramCollector merges its histograms, so each call only holds one chunk of batches.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import HistogramCollector

from quantgate.data import Batch, NpzDataset
from quantgate.errors import DataError


def streaming_extra_options() -> dict[str, object]:
    """``extra_options`` for ``quantize_static`` that make it calibrate one reader chunk at a time."""
    return {"CalibStridedMinMax": 1}


class StreamingCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Batches of an ``NpzDataset`` grouped in chunks of ``batches_per_chunk``; ``len()`` counts chunks.

    A short last batch always gets a chunk of its own: the histogram calibrators stack a chunk's outputs
    with ``np.asarray``, which fails when batch sizes differ within one call.
    Without ``set_range`` (no striding) ``get_next`` walks the whole set once.
    """

    def __init__(
        self, dataset: NpzDataset, *, batch_size: int, batches_per_chunk: int = 4, limit: int | None = None
    ) -> None:
        if batch_size < 1 or batches_per_chunk < 1:
            raise ValueError(f"batch_size and batches_per_chunk must be >= 1, got {batch_size}, {batches_per_chunk}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.batches_per_chunk = batches_per_chunk
        self.n_samples = dataset.n_samples if limit is None else min(max(limit, 0), dataset.n_samples)
        if self.n_samples == 0:
            raise DataError(f"{dataset.path.name}: no calibration samples to read (limit={limit})")
        self._chunk_starts = self._plan_chunks()
        self._iter: Generator[Batch, None, None] | None = None
        self._next_batch = 0  # index of the batch the open iterator yields next
        self._range = (0, self.n_batches)  # batch indices [first, end) that get_next may return

    @property
    def n_batches(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def _plan_chunks(self) -> list[int]:
        """First batch index of every chunk, plus the end sentinel."""
        full = self.n_samples // self.batch_size
        starts = list(range(0, full, self.batches_per_chunk))
        if self.n_samples % self.batch_size:
            starts.append(full)
        return [*starts, self.n_batches]

    def __len__(self) -> int:
        return len(self._chunk_starts) - 1

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict ``get_next`` to chunks ``[start_index, end_index)``."""
        if not 0 <= start_index < end_index <= len(self):
            raise IndexError(f"chunk range [{start_index}, {end_index}) is outside [0, {len(self)})")
        first, end = self._chunk_starts[start_index], self._chunk_starts[end_index]
        if self._iter is None or self._next_batch > first:
            self._restart()
        self._range = (first, end)
        while self._next_batch < first:
            self._pull()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next_batch >= self._range[1]:
            if self._next_batch >= self.n_batches:
                self._close()  # quantize_static never closes its reader; free the zip file now
            return None
        if self._iter is None:  # only before the first batch: set_range reopens the stream itself
            self._restart()
        return self._pull().inputs

    def _restart(self) -> None:
        self._close()
        self._iter = self.dataset.batches(self.batch_size, limit=self.n_samples)
        self._next_batch = 0

    def _close(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def _pull(self) -> Batch:
        assert self._iter is not None
        batch = next(self._iter)
        self._next_batch += 1
        return batch


# -- calibration that survives infinite activations --------------------------------------------------

# Magnitudes at or beyond this are sentinels, not signal: attention masks add -inf, finfo(float32).min or -1e9 to
# masked scores. One such value makes the histogram calibrators crash (numpy cannot bin an infinite range) and
# makes a MinMax range useless (scale ~1e36: every real value quantizes to the zero point).
SENTINEL_ABS = 1e9


@dataclass(frozen=True)
class CalibrationResult:
    """Ranges computed once, as a ``quantize_static`` calibration cache, and the tensors that have no usable range."""

    cache: Path
    unbounded: tuple[str, ...]  # tensors that carried non-finite or sentinel-magnitude values


def quantizable_op_types() -> list[str]:
    """What ``quantize_static`` quantizes (and calibrates) when ``op_types_to_quantize`` is empty."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibrate(
    model: Path,
    reader: StreamingCalibrationReader,
    method: str,
    cache: Path,
    *,
    percentile: float | None = None,
    check: Callable[[], None] | None = None,
) -> CalibrationResult:
    """Compute activation ranges with ``method`` ("minmax", "entropy", "percentile") one reader chunk at a time and
    save them where ``quantize_static(calibration_cache_path=cache)`` reads them.

    Non-finite and sentinel-magnitude values (``SENTINEL_ABS``) are left out of the histograms; the tensors that had
    any are returned in ``unbounded``, so the caller keeps the nodes next to them in float. ``check`` is called
    before every chunk (a deadline raises from it).
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCalibrater, create_calibrator, save_tensors_data

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    options: dict[str, object] = {} if percentile is None else {"percentile": percentile}
    with tempfile.TemporaryDirectory(prefix="quantgate-calib-") as tmp:
        calibrator = create_calibrator(
            model,
            quantizable_op_types(),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calibrate_method,
            extra_options=options,
        )
        collector: _FiniteHistogramCollector | None = None
        if isinstance(calibrator, HistogramCalibrater):
            # collect_data() creates its HistogramCollector only when none is set yet: ours filters what it is given.
            collector = _FiniteHistogramCollector(calibrator)
            calibrator.collector = collector
        for chunk in range(len(reader)):
            if check is not None:
                check()
            reader.set_range(start_index=chunk, end_index=chunk + 1)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator  # its InferenceSession holds the augmented model open
    unbounded = set(collector.unbounded if collector is not None else ())
    for name, data in ranges.items():
        if not all(_bounded(v) for v in data.range_value):
            unbounded.add(name)
            ranges.data[name] = _clipped(data)
    save_tensors_data(ranges, cache)
    return CalibrationResult(cache, tuple(sorted(unbounded)))


def _bounded(value: Any) -> bool:
    values = np.asarray(value, dtype=np.float64)
    return bool(np.all(np.isfinite(values) & (np.abs(values) < SENTINEL_ABS)))


def _clipped(data: Any) -> Any:
    """A MinMax range clipped to +-SENTINEL_ABS; nothing quantizes with it (its nodes stay float), but the cache
    must hold finite numbers."""
    from onnxruntime.quantization.calibrate import TensorData

    low, high = (np.nan_to_num(np.asarray(v, dtype=np.float32)) for v in data.range_value)
    limit = np.float32(SENTINEL_ABS)
    return TensorData(lowest=np.clip(low, -limit, limit), highest=np.clip(high, -limit, limit))


class _FiniteHistogramCollector(HistogramCollector):  # type: ignore[misc]
    """onnxruntime's HistogramCollector fed only finite, non-sentinel values; remembers which tensors had others."""

    def __init__(self, calibrator: Any) -> None:
        super().__init__(
            method=calibrator.method,
            symmetric=calibrator.symmetric,
            num_bins=calibrator.num_bins,
            num_quantized_bins=calibrator.num_quantized_bins,
            percentile=calibrator.percentile,
            scenario=calibrator.scenario,
        )
        self.unbounded: set[str] = set()

    def collect(self, name_to_arr: dict[str, Any]) -> Any:
        kept: dict[str, np.ndarray] = {}
        for name, arrays in name_to_arr.items():
            parts = arrays if isinstance(arrays, list) else [arrays]
            flat = np.concatenate([np.asarray(a).reshape(-1) for a in parts]) if parts else np.empty(0, np.float32)
            ok = np.isfinite(flat) & (np.abs(flat) < SENTINEL_ABS)
            if not ok.all():
                self.unbounded.add(name)
                flat = flat[ok]
            if flat.size or name not in self.histogram_dict:
                kept[name] = flat if flat.size else np.zeros(1, dtype=flat.dtype)
        return super().collect(kept)


def unbounded_neighbours(model: Path, tensors: Iterable[str]) -> list[str]:
    """Names of the nodes that produce or consume any of ``tensors``: keeping them in float keeps those tensors out
    of quantization (a QDQ node quantizes its own inputs and outputs)."""
    import onnx

    wanted = set(tensors)
    if not wanted:
        return []
    graph = onnx.load(str(model), load_external_data=False).graph
    return [n.name for n in graph.node if wanted & (set(n.input) | set(n.output))]
