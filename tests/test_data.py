"""NpzDataset: streaming reads, checks against model inputs, and resolving data URIs (local and MLflow)."""

from __future__ import annotations

import tracemalloc
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import mlflow
import numpy as np
import pytest

from quantgate.data import NpzDataset, resolve_data_uri
from quantgate.errors import DataError
from quantgate.model import TensorSpec

Saver = Callable[..., None]
SAVERS = pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])

INPUTS = (
    TensorSpec("x", np.dtype("float32"), (None, 1, 4, 4)),
    TensorSpec("mask", np.dtype("int64"), (None, 3)),
)


def _arrays(n: int = 37) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 1, 4, 4)).astype(np.float32),
        "mask": rng.integers(0, 9, (n, 3)).astype(np.int64),
        "labels": rng.integers(0, 10, n).astype(np.int64),
    }


def _write(directory: Path, arrays: Mapping[str, np.ndarray], save: Saver = np.savez, name: str = "data.npz") -> Path:
    path = directory / name
    save(path, **arrays)
    return path


def _concat(batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, arr in batch.items():
            parts.setdefault(name, []).append(arr)
    return {name: np.concatenate(arrs) for name, arrs in parts.items()}


# --- reading -----------------------------------------------------------------------------------


@SAVERS
def test_open_reads_headers_only(tmp_path: Path, save: Saver) -> None:
    ds = NpzDataset.open(_write(tmp_path, _arrays(), save))
    assert ds.array_names == ["x", "mask"]
    assert ds.n_samples == 37
    assert ds.has_labels
    assert ds.dtype("x") == np.float32
    assert ds.shape("x") == (37, 1, 4, 4)
    assert ds.shape("labels") == (37,)


@SAVERS
def test_batches_reproduce_the_arrays_exactly(tmp_path: Path, save: Saver) -> None:
    arrays = _arrays()
    ds = NpzDataset.open(_write(tmp_path, arrays, save))
    batches = list(ds.batches(8))
    assert [len(b.inputs["x"]) for b in batches] == [8, 8, 8, 8, 5]
    got = _concat({**b.inputs, "labels": b.labels} for b in batches if b.labels is not None)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(got[name], arr)
        assert got[name].dtype == arr.dtype
    # Inputs are handed to ONNX Runtime and to user code: they must be writable copies.
    assert all(b.inputs["x"].flags.writeable for b in batches)


@SAVERS
def test_batches_stop_at_limit(tmp_path: Path, save: Saver) -> None:
    arrays = _arrays()
    ds = NpzDataset.open(_write(tmp_path, arrays, save))
    batches = list(ds.batches(8, limit=20))
    assert [len(b.inputs["x"]) for b in batches] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([b.inputs["mask"] for b in batches]), arrays["mask"][:20])
    assert sum(len(b.inputs["x"]) for b in ds.batches(8, limit=1000)) == 37
    assert list(ds.batches(8, limit=0)) == []


def test_batches_without_labels(tmp_path: Path) -> None:
    arrays = _arrays()
    del arrays["labels"]
    ds = NpzDataset.open(_write(tmp_path, arrays))
    assert not ds.has_labels
    assert all(b.labels is None for b in ds.batches(10))


def test_batches_reject_bad_arguments(tmp_path: Path) -> None:
    ds = NpzDataset.open(_write(tmp_path, _arrays()))
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)
    with pytest.raises(ValueError, match="limit"):
        ds.batches(4, limit=-1)


@SAVERS
def test_take_returns_the_first_samples(tmp_path: Path, save: Saver) -> None:
    arrays = _arrays()
    ds = NpzDataset.open(_write(tmp_path, arrays, save))
    batch = ds.take(5)
    np.testing.assert_array_equal(batch.inputs["x"], arrays["x"][:5])
    assert batch.labels is not None
    np.testing.assert_array_equal(batch.labels, arrays["labels"][:5])
    assert len(ds.take(1000).inputs["x"]) == 37
    empty = ds.take(0)
    assert empty.inputs["x"].shape == (0, 1, 4, 4)
    assert empty.labels is not None and empty.labels.shape == (0,)


def test_large_rows_stream_in_bounded_reads(tmp_path: Path) -> None:
    # Rows far bigger than zipfile's internal read chunk, deflated: exercises partial reads.
    big = np.random.default_rng(1).standard_normal((6, 300_000)).astype(np.float32)
    ds = NpzDataset.open(_write(tmp_path, {"big": big}, np.savez_compressed))
    np.testing.assert_array_equal(np.concatenate([b.inputs["big"] for b in ds.batches(4)]), big)


@SAVERS
def test_batches_memory_does_not_depend_on_the_file_size(tmp_path: Path, save: Saver) -> None:
    # 16 MiB of data read in 64 kB batches: streaming keeps the traced peak near a few batches.
    x = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024) % 977
    ds = NpzDataset.open(_write(tmp_path, {"x": x}, save))
    del x
    tracemalloc.start()
    try:
        rows = sum(len(b.inputs["x"]) for b in ds.batches(16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 4096
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB while streaming a 16 MiB array"


# --- open errors -------------------------------------------------------------------------------


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file not found: .*nope\.npz"):
        NpzDataset.open(tmp_path / "nope.npz")


def test_open_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a file"):
        NpzDataset.open(tmp_path)


def test_open_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"^data\.npz is not an \.npz file \(not a zip archive\)"):
        NpzDataset.open(path)


def test_open_plain_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="not a zip archive"):
        NpzDataset.open(path)


def test_open_zip_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match=r"member 'readme\.txt' is not a \.npy array"):
        NpzDataset.open(path)


def test_open_member_with_a_broken_header(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"not numpy at all")
    with pytest.raises(DataError, match=r"array 'x' is not a readable \.npy array"):
        NpzDataset.open(path)


def test_open_empty_archive(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    with pytest.raises(DataError, match="holds no input arrays"):
        NpzDataset.open(path)


def test_open_arrays_disagree_in_length(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["mask"] = arrays["mask"][:30]
    with pytest.raises(DataError, match=r"disagree on the number of samples .*'x': 37, 'mask': 30"):
        NpzDataset.open(_write(tmp_path, arrays))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((37, 2), np.int64), r"'labels' has dtype int64 and shape \[37,2\]; it must be 1-D integer"),
        (np.zeros(37, np.float32), r"'labels' has dtype float32 and shape \[37\]; it must be 1-D integer"),
        (np.zeros(36, np.int64), "'labels' has 36 entries but the arrays have 37 samples"),
    ],
    ids=["2-d", "float", "short"],
)
def test_open_bad_labels(tmp_path: Path, labels: np.ndarray, match: str) -> None:
    arrays = {**_arrays(), "labels": labels}
    with pytest.raises(DataError, match=match):
        NpzDataset.open(_write(tmp_path, arrays))


def test_open_object_array(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x": np.array([{"a": 1}] * 37, dtype=object)}
    with pytest.raises(DataError, match="array 'x' holds Python objects"):
        NpzDataset.open(_write(tmp_path, arrays))


def test_open_fortran_ordered_array(tmp_path: Path) -> None:
    arrays = {**_arrays(), "mask": np.asfortranarray(_arrays()["mask"])}
    with pytest.raises(DataError, match="array 'mask' is Fortran-ordered"):
        NpzDataset.open(_write(tmp_path, arrays))


def test_open_scalar_array(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="array 'x' is a scalar"):
        NpzDataset.open(_write(tmp_path, {"x": np.array(1.0, np.float32)}))


def test_open_truncated_member(tmp_path: Path) -> None:
    src = _write(tmp_path, _arrays(), name="good.npz")
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(src) as good, zipfile.ZipFile(path, "w") as bad:
        bad.writestr("x.npy", good.read("x.npy")[:-10])
    with pytest.raises(DataError, match="array 'x' is truncated"):
        NpzDataset.open(path)


def test_corrupt_member_is_a_data_error_when_read(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x": np.zeros((8, 256), np.float32)})
    raw = bytearray(path.read_bytes())
    raw[raw.index(bytes(1024))] = 1  # one data byte of the stored member: the CRC no longer matches
    path.write_bytes(bytes(raw))
    ds = NpzDataset.open(path)
    with pytest.raises(DataError, match=r"^data\.npz: array 'x' is corrupt \(Bad CRC-32"):
        list(ds.batches(4))


# --- check_against -----------------------------------------------------------------------------


def _check(tmp_path: Path, arrays: Mapping[str, np.ndarray], role: str = "calibration") -> None:
    NpzDataset.open(_write(tmp_path, arrays)).check_against(INPUTS, role=role)


def test_check_against_accepts_matching_data(tmp_path: Path) -> None:
    _check(tmp_path, _arrays())


def test_check_against_missing_input(tmp_path: Path) -> None:
    arrays = _arrays()
    del arrays["mask"]
    with pytest.raises(DataError) as info:
        _check(tmp_path, arrays)
    assert str(info.value) == (
        "data.npz: calibration data has no array for model input(s) ['mask']; "
        "it has ['x'], it needs one array per input named ['x', 'mask']"
    )


def test_check_against_extra_array(tmp_path: Path) -> None:
    arrays = {**_arrays(), "y": np.zeros(37, np.float32)}
    with pytest.raises(DataError, match=r"^data\.npz: evaluation data has array\(s\) \['y'\] that are not"):
        _check(tmp_path, arrays, role="evaluation")


def test_check_against_wrong_dtype(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x": _arrays()["x"].astype(np.float64)}
    with pytest.raises(DataError) as info:
        _check(tmp_path, arrays, role="evaluation")
    assert str(info.value) == (
        "data.npz: evaluation data array 'x' has dtype float64, the model input 'x' needs float32"
    )


def test_check_against_big_endian_is_not_float32(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x": _arrays()["x"].astype(">f4")}
    with pytest.raises(DataError, match="array 'x' has dtype >f4, the model input 'x' needs float32"):
        _check(tmp_path, arrays)


def test_check_against_wrong_rank(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x": np.zeros((37, 4, 4), np.float32)}
    with pytest.raises(DataError) as info:
        _check(tmp_path, arrays)
    assert str(info.value) == (
        "data.npz: calibration data array 'x' has shape [N,4,4] (rank 3), the model input 'x' needs [?,1,4,4] (rank 4)"
    )


def test_check_against_wrong_fixed_dim(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x": np.zeros((37, 1, 4, 5), np.float32)}
    with pytest.raises(DataError) as info:
        _check(tmp_path, arrays)
    assert str(info.value) == (
        "data.npz: calibration data array 'x' has shape [N,1,4,5], the model input 'x' needs [?,1,4,4] (axis 3 differs)"
    )


def test_check_against_ignores_dynamic_dims_and_batch_axis(tmp_path: Path) -> None:
    inputs = (TensorSpec("x", np.dtype("float32"), (8, None, 4)),)
    ds = NpzDataset.open(_write(tmp_path, {"x": np.zeros((3, 7, 4), np.float32)}))
    ds.check_against(inputs, role="calibration")


def test_check_against_no_samples(tmp_path: Path) -> None:
    arrays = {name: arr[:0] for name, arr in _arrays().items()}
    with pytest.raises(DataError, match=r"^data\.npz: calibration data has no samples \(N=0\)$"):
        _check(tmp_path, arrays)


def test_check_against_messages_are_one_line(tmp_path: Path) -> None:
    arrays = _arrays()
    del arrays["x"]
    with pytest.raises(DataError) as info:
        _check(tmp_path, arrays)
    assert "\n" not in str(info.value)


# --- resolve_data_uri --------------------------------------------------------------------------


def test_resolve_local_path_and_file_uri(tmp_path: Path) -> None:
    path = _write(tmp_path, _arrays())
    assert resolve_data_uri(str(path), tmp_path / "work") == path
    assert resolve_data_uri(path.as_uri(), tmp_path / "work") == path


def test_resolve_missing_local_path(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing.npz")
    with pytest.raises(DataError) as info:
        resolve_data_uri(uri, tmp_path)
    assert str(info.value) == f"calibration data not found: {uri}"
    with pytest.raises(DataError, match=r"^evaluation data not found: file://"):
        resolve_data_uri((tmp_path / "missing.npz").as_uri(), tmp_path, role="evaluation")


def test_resolve_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is a directory; point at a single \.npz file"):
        resolve_data_uri(str(tmp_path), tmp_path)


def test_resolve_non_npz_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(DataError, match=r"is not an \.npz file"):
        resolve_data_uri(str(path), tmp_path)


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[Path]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        yield tmp_path
    finally:
        mlflow.set_tracking_uri(previous)


def test_resolve_runs_uri_downloads_the_artifact(mlflow_store: Path) -> None:
    arrays = _arrays()
    src = _write(mlflow_store, arrays, name="calib.npz")
    (mlflow_store / "sets").mkdir()
    _write(mlflow_store / "sets", arrays, name="a.npz")
    experiment = mlflow.create_experiment("data", artifact_location=(mlflow_store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(src))
        mlflow.log_artifacts(str(mlflow_store / "sets"), artifact_path="sets")
    work = mlflow_store / "work"

    local = resolve_data_uri(f"runs:/{run.info.run_id}/calib.npz", work)

    assert local.is_relative_to(work) and local.name == "calib.npz"
    batch = NpzDataset.open(local).take(100)
    np.testing.assert_array_equal(batch.inputs["x"], arrays["x"])
    with pytest.raises(DataError, match="is a directory"):
        resolve_data_uri(f"runs:/{run.info.run_id}/sets", work)
    with pytest.raises(DataError) as info:
        resolve_data_uri(f"runs:/{run.info.run_id}/nope.npz", work)
    assert str(info.value).startswith(f"cannot download calibration data runs:/{run.info.run_id}/nope.npz: ")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"^cannot download evaluation data runs:/0123456789abcdef/x\.npz: "):
        resolve_data_uri("runs:/0123456789abcdef/x.npz", work, role="evaluation")


# --- values no metric survives -----------------------------------------------------------------


def _check_values(path: Path, **kwargs: object) -> None:
    from quantgate.data import check_values

    settings: dict[str, object] = {"role": "evaluation", "limit": None, "n_classes": 10, "allow_non_finite": False}
    check_values(NpzDataset.open(path), **(settings | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_unless_allowed(tmp_path: Path, bad: float) -> None:
    arrays = _arrays()
    arrays["x"][5, 0, 1, 1] = bad
    arrays["x"][30, 0, 2, 2] = bad
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError, match=r"evaluation data has NaN or Inf in 'x' \(2 values\).*allow_non_finite"):
        _check_values(path)
    _check_values(path, allow_non_finite=True)
    _check_values(path, limit=5)  # only the samples the run uses are checked


@pytest.mark.parametrize(
    ("labels", "shown"), [((3, 1000), "from 0 to 1000"), ((-5, 2), "from -5 to"), ((0, 10), "from 0 to 10")]
)
def test_labels_must_be_class_indices_of_the_model(tmp_path: Path, labels: tuple[int, int], shown: str) -> None:
    arrays = _arrays()
    arrays["labels"][:2] = labels
    arrays["labels"][arrays["labels"] < 0] = -5
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError, match=rf"'labels' range {shown}.*the model outputs 10 classes"):
        _check_values(path)
    _check_values(_write(tmp_path, _arrays(), name="ok.npz"))
