"""Feed ONNX Runtime's static calibration from an ``NpzDataset`` without holding the whole set in memory.

``quantize_static`` keeps the augmented model's outputs for every batch a reader yields until
``collect_data`` returns; the histogram calibrators (Entropy, Percentile) keep every intermediate
activation, so peak memory grows with the number of samples. With ``CalibStridedMinMax`` set (the name is
historical: quantize_static applies it to every calibrator), it asks ``len(reader)``, then calls
``set_range`` + ``collect_data`` once per stride; MinMax merges its ranges across calls and the
HistogramCollector merges its histograms, so each call only holds one chunk of batches.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

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
