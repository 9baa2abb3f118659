"""Calibration and evaluation sets: ``.npz`` files with one array per model input and optional ``labels``.

Arrays are streamed batch by batch from their ``.npy`` members inside the zip (stored or deflated), so
memory per batch does not depend on the number of samples in the file.
"""

from __future__ import annotations

import contextlib
import math
import zipfile
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from numpy.lib import format as npy_format

from quantgate.errors import DataError
from quantgate.model import TensorSpec
from quantgate.redact import has_credentials, redact

LABELS = "labels"


@dataclass(frozen=True)
class Batch:
    """Consecutive samples: one array per input (first axis = sample), plus labels when the file has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass(frozen=True)
class _Member:
    """Where one array lives in the zip and what its ``.npy`` header says."""

    member: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(fp)
    else:
        # Version 3.0 only exists for structured dtypes with non-latin-1 field names, never a model input.
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    return tuple(int(d) for d in shape), bool(fortran_order), np.dtype(dtype)


def _open_member(zf: zipfile.ZipFile, info: _Member, filename: str) -> IO[bytes]:
    """Open an array's member positioned at its first data byte."""
    try:
        fp = zf.open(info.member)
        shape, _, dtype = _read_header(fp)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{filename} changed on disk while it was being read ({exc}); open it again") from exc
    if shape != info.shape or dtype != info.dtype:
        fp.close()
        raise DataError(f"{filename} changed on disk while it was being read; open it again")
    return fp


def _read_rows(fp: IO[bytes], info: _Member, n: int, filename: str) -> np.ndarray:
    want = n * info.row_bytes
    try:
        buf = fp.read(want)
    except (OSError, zipfile.BadZipFile, zlib.error) as exc:  # bad CRC, corrupt deflate stream
        raise DataError(f"{filename}: array '{info.member[:-4]}' is corrupt ({exc})") from exc
    if len(buf) != want:
        raise DataError(f"{filename}: array '{info.member[:-4]}' is truncated; write the file again")
    # frombuffer over bytes is read-only; callers (and ONNX Runtime) may write into inputs.
    return np.frombuffer(buf, dtype=info.dtype).reshape((n, *info.shape[1:])).copy()


def _scan(zf: zipfile.ZipFile, filename: str) -> dict[str, _Member]:
    members: dict[str, _Member] = {}
    for zinfo in zf.infolist():
        if zinfo.is_dir():
            continue
        if not zinfo.filename.endswith(".npy"):
            raise DataError(
                f"{filename} is a zip file but not an .npz archive: member '{zinfo.filename}' is not a .npy "
                "array; write it with numpy.savez"
            )
        name = zinfo.filename[:-4]
        try:
            with zf.open(zinfo) as fp:
                shape, fortran_order, dtype = _read_header(fp)
                header_len = fp.tell()
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{filename}: array '{name}' is not a readable .npy array ({exc})") from exc
        if dtype.hasobject:
            raise DataError(f"{filename}: array '{name}' holds Python objects; save it as a numeric array")
        if fortran_order:
            raise DataError(
                f"{filename}: array '{name}' is Fortran-ordered; save numpy.ascontiguousarray(array) instead"
            )
        if not shape:
            raise DataError(f"{filename}: array '{name}' is a scalar; every array needs a sample axis first")
        member = _Member(member=zinfo.filename, dtype=dtype, shape=shape)
        if zinfo.file_size != header_len + shape[0] * member.row_bytes:
            raise DataError(f"{filename}: array '{name}' is truncated; write the file again")
        members[name] = member
    return members


def _check_lengths(members: dict[str, _Member], filename: str) -> None:
    labels = members.get(LABELS)
    arrays = {name: m.shape[0] for name, m in members.items() if name != LABELS}
    if not arrays:
        raise DataError(f"{filename} holds no input arrays; it needs one array per model input")
    if len(set(arrays.values())) > 1:
        sizes = ", ".join(f"'{name}': {n}" for name, n in arrays.items())
        raise DataError(f"{filename}: arrays disagree on the number of samples (first axis) ({sizes})")
    n = next(iter(arrays.values()))
    if labels is None:
        return
    if len(labels.shape) != 1 or not np.issubdtype(labels.dtype, np.integer):
        shape = ",".join(str(d) for d in labels.shape)
        raise DataError(
            f"{filename}: 'labels' has dtype {labels.dtype} and shape [{shape}]; it must be 1-D integer, "
            "one class index per sample"
        )
    if labels.shape[0] != n:
        raise DataError(f"{filename}: 'labels' has {labels.shape[0]} entries but the arrays have {n} samples")


def _dims(shape: Sequence[int | None], *, first: str | None = None) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    if first is not None and dims:
        dims[0] = first
    return "[" + ",".join(dims) + "]"


class NpzDataset:
    """A .npz data set read lazily; arrays are streamed from the zip member, never loaded whole."""

    def __init__(self, path: Path, members: dict[str, _Member]) -> None:
        """Use :meth:`open`; this trusts ``members`` to be checked already."""
        self.path = path
        self._members = members
        self.array_names: list[str] = [name for name in members if name != LABELS]
        self.n_samples: int = members[self.array_names[0]].shape[0]
        self.has_labels: bool = LABELS in members

    @classmethod
    def open(cls, path: Path) -> NpzDataset:
        """Read every array's header and check the file is a usable data set; no array data is read."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(f"{path} is not a file; point at a single .npz file")
        try:
            with zipfile.ZipFile(path) as zf:
                members = _scan(zf, path.name)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path.name} is not an .npz file (not a zip archive); write it with numpy.savez") from exc
        except OSError as exc:
            raise DataError(f"{path.name} cannot be read: {exc}") from exc
        _check_lengths(members, path.name)
        return cls(path, members)

    def __repr__(self) -> str:
        return f"NpzDataset({self.path.name!r}, arrays={self.array_names}, n_samples={self.n_samples})"

    def _member(self, name: str) -> _Member:
        try:
            return self._members[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no array '{name}' (it has {sorted(self._members)})") from None

    def dtype(self, name: str) -> np.dtype:
        return self._member(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape, sample axis first."""
        return self._member(name).shape

    def check_against(self, inputs: Sequence[TensorSpec], *, role: str) -> None:
        """Raise ``DataError`` unless the arrays match the model inputs by name, dtype, rank and fixed dims.

        ``role`` ("calibration" or "evaluation") only shapes the messages.
        """
        filename = self.path.name
        wanted = [spec.name for spec in inputs]
        missing = [name for name in wanted if name not in self.array_names]
        if missing:
            raise DataError(
                f"{filename}: {role} data has no array for model input(s) {missing}; "
                f"it has {self.array_names}, it needs one array per input named {wanted}"
            )
        extra = [name for name in self.array_names if name not in wanted]
        if extra:
            raise DataError(
                f"{filename}: {role} data has array(s) {extra} that are not model inputs {wanted}; "
                f"remove them (only '{LABELS}' may be added)"
            )
        if self.n_samples == 0:
            raise DataError(f"{filename}: {role} data has no samples (N=0)")
        for spec in inputs:
            self._check_array(spec, role)

    def _check_array(self, spec: TensorSpec, role: str) -> None:
        filename = self.path.name
        dtype, shape = self.dtype(spec.name), self.shape(spec.name)
        if dtype != spec.dtype:
            raise DataError(
                f"{filename}: {role} data array '{spec.name}' has dtype {dtype}, "
                f"the model input '{spec.name}' needs {spec.dtype}"
            )
        ours, theirs = _dims(shape, first="N"), _dims(spec.shape)
        if len(shape) != len(spec.shape):
            raise DataError(
                f"{filename}: {role} data array '{spec.name}' has shape {ours} (rank {len(shape)}), "
                f"the model input '{spec.name}' needs {theirs} (rank {len(spec.shape)})"
            )
        for axis in range(1, len(shape)):
            fixed = spec.shape[axis]
            if fixed is not None and fixed != shape[axis]:
                raise DataError(
                    f"{filename}: {role} data array '{spec.name}' has shape {ours}, "
                    f"the model input '{spec.name}' needs {theirs} (axis {axis} differs)"
                )

    def batches(self, batch_size: int, *, limit: int | None = None) -> Generator[Batch, None, None]:
        """Yield consecutive batches of ``batch_size`` samples, ``limit`` samples in all at most.

        The last batch may be smaller. Every array's member stays open for the whole iteration; one batch
        per array is in memory at a time.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        total = self.n_samples if limit is None else min(limit, self.n_samples)
        return self._stream(batch_size, total)

    def _stream(self, batch_size: int, total: int) -> Generator[Batch, None, None]:
        filename = self.path.name
        names = [*self.array_names, LABELS] if self.has_labels else list(self.array_names)
        try:
            zf = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{filename} cannot be read any more: {exc}") from exc
        with zf, contextlib.ExitStack() as stack:
            streams = {name: stack.enter_context(_open_member(zf, self._members[name], filename)) for name in names}
            done = 0
            while done < total:
                n = min(batch_size, total - done)
                rows = {name: _read_rows(fp, self._members[name], n, filename) for name, fp in streams.items()}
                labels = rows.pop(LABELS, None)
                done += n
                yield Batch(inputs=rows, labels=labels)

    def take(self, n: int) -> Batch:
        """The first ``n`` samples as one batch (fewer if the file has fewer)."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        k = min(n, self.n_samples)
        if k == 0:
            empty = {name: np.empty((0, *self.shape(name)[1:]), self.dtype(name)) for name in self.array_names}
            labels = np.empty((0,), self.dtype(LABELS)) if self.has_labels else None
            return Batch(inputs=empty, labels=labels)
        return next(iter(self.batches(k, limit=k)))


def check_values(
    dataset: NpzDataset, *, role: str, limit: int | None, n_classes: int | None, allow_non_finite: bool
) -> None:
    """Refuse values no metric survives, on the samples a run uses: NaN/Inf in an input (unless allowed), labels
    that are not class indices of the model (top-1 of a label the model cannot output is 0 for both models, a drop
    of 0: such a gate passes anything)."""
    filename = dataset.path.name
    low = high = None
    bad: dict[str, int] = {}
    floats = [n for n in dataset.array_names if np.issubdtype(dataset.dtype(n), np.floating)]
    for batch in dataset.batches(256, limit=limit):
        if not allow_non_finite:
            for name in floats:
                count = int(np.size(batch.inputs[name]) - np.count_nonzero(np.isfinite(batch.inputs[name])))
                if count:
                    bad[name] = bad.get(name, 0) + count
        if batch.labels is not None and batch.labels.size:
            low = min(int(batch.labels.min()), low if low is not None else int(batch.labels.min()))
            high = max(int(batch.labels.max()), high if high is not None else int(batch.labels.max()))
    if bad:
        where = ", ".join(f"'{name}' ({n} values)" for name, n in bad.items())
        raise DataError(
            f"{filename}: {role} data has NaN or Inf in {where}; clean it, or set data.allow_non_finite: true if the "
            "model takes them on purpose"
        )
    if low is None or high is None or n_classes is None:
        return
    if low < 0 or high >= n_classes:
        raise DataError(
            f"{filename}: {role} 'labels' range from {low} to {high}, but the model outputs {n_classes} classes "
            f"(labels must be class indices 0..{n_classes - 1})"
        )


def _local_path(uri: str) -> Path | None:
    """The local path ``uri`` names, or None when it is a remote (MLflow) URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    # A one-letter scheme is a Windows drive ("C:\\data.npz"), not a URI.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(uri).expanduser()
    return None


def _download(uri: str, workdir: Path, role: str) -> Path:
    import mlflow.artifacts  # slow import; only needed for remote data

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir))
    except Exception as exc:  # mlflow raises MlflowException, OSError, boto/http errors... by store
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise DataError(f"cannot download {role} data {redact(uri)}: {redact(reason)}") from exc
    return Path(local)


def resolve_data_uri(uri: str, workdir: Path, *, role: str = "calibration") -> Path:
    """Local path of the single ``.npz`` file ``uri`` names; MLflow artifact URIs land in ``workdir``.

    Plain paths and ``file://`` URIs are used in place; any other scheme (``runs:/``, ``models:/``,
    ``mlflow-artifacts:/``, ``s3://``...) goes through ``mlflow.artifacts.download_artifacts`` with the
    tracking URI the caller has set.
    """
    if has_credentials(uri):
        raise DataError(
            f"{role} data {redact(uri)} carries credentials in the URI (they would be recorded with the run); pass "
            "them through the environment (AWS_*, MLFLOW_TRACKING_*) instead"
        )
    local = _local_path(uri)
    if local is None:
        path = _download(uri, workdir, role)
    else:
        if not local.exists():
            raise DataError(f"{role} data not found: {uri}")
        path = local
    if path.is_dir():
        raise DataError(f"{role} data {uri} is a directory; point at a single .npz file inside it")
    if path.suffix.lower() != ".npz":
        raise DataError(f"{role} data {uri} is not an .npz file; save the arrays with numpy.savez")
    return path
