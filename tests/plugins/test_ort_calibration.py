"""StreamingCalibrationReader: chunking semantics, real static quantization, and flat memory in N; ``calibrate``:
ranges without infinite values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

from quantgate.data import NpzDataset
from quantgate.errors import DataError
from quantgate.plugins._ort_calibration import (
    SENTINEL_ABS,
    StreamingCalibrationReader,
    calibrate,
    streaming_extra_options,
    unbounded_neighbours,
)

# Activations per sample of the test model, float32: Conv(1→16) and its ReLU on 30x30, Conv(16→32) and its
# ReLU on 28x28. The histogram calibrators keep all of them for every batch of one collect_data call.
ACTIVATION_BYTES_PER_SAMPLE = 4 * (2 * 16 * 30 * 30 + 2 * 32 * 28 * 28)  # ≈ 316 kB


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 16, 3)
            self.conv2 = torch.nn.Conv2d(16, 32, 3)
            self.fc = torch.nn.Linear(32 * 28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(torch.flatten(h, 1))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "net.onnx"
    torch.onnx.export(
        Net().eval(),
        (torch.randn(2, 1, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path


def _npz(path: Path, n: int, seed: int = 0) -> Path:
    x = np.random.default_rng(seed).standard_normal((n, 1, 32, 32)).astype(np.float32)
    np.savez(path, x=x, labels=np.arange(n, dtype=np.int64))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calib")
    for n in (64, 1024):
        _npz(root / f"calib{n}.npz", n)
    return root


def _first_ids(reader: StreamingCalibrationReader, ds: NpzDataset) -> list[int]:
    """Index of the first sample of each batch get_next returns until None (samples are unique)."""
    x = np.load(ds.path)["x"]
    ids = []
    while (inputs := reader.get_next()) is not None:
        ids.append(int(np.flatnonzero((x == inputs["x"][0]).all(axis=(1, 2, 3)))[0]))
    return ids


# --- reader semantics --------------------------------------------------------------------------


def test_short_last_batch_gets_a_chunk_of_its_own(tmp_path: Path) -> None:
    ds = NpzDataset.open(_npz(tmp_path / "d.npz", 70))
    reader = StreamingCalibrationReader(ds, batch_size=8, batches_per_chunk=3)
    # 8 full batches → chunks of 3, 3, 2 batches; the 6-sample batch alone in a 4th chunk.
    assert len(reader) == 4
    sizes = []
    for chunk in range(len(reader)):
        reader.set_range(start_index=chunk, end_index=chunk + 1)
        chunk_sizes = []
        while (inputs := reader.get_next()) is not None:
            chunk_sizes.append(len(inputs["x"]))
        sizes.append(chunk_sizes)
    assert sizes == [[8, 8, 8], [8, 8, 8], [8, 8], [6]]
    assert reader.get_next() is None


def test_set_range_positions_and_restarts_the_stream(tmp_path: Path) -> None:
    ds = NpzDataset.open(_npz(tmp_path / "d.npz", 64))
    reader = StreamingCalibrationReader(ds, batch_size=4, batches_per_chunk=2)
    assert len(reader) == 8
    reader.set_range(start_index=3, end_index=5)
    assert _first_ids(reader, ds) == [24, 28, 32, 36]
    reader.set_range(start_index=1, end_index=2)  # backwards: the stream starts over
    assert _first_ids(reader, ds) == [8, 12]
    with pytest.raises(IndexError):
        reader.set_range(start_index=7, end_index=9)


def test_without_set_range_the_reader_walks_everything_once(tmp_path: Path) -> None:
    ds = NpzDataset.open(_npz(tmp_path / "d.npz", 30))
    reader = StreamingCalibrationReader(ds, batch_size=8, limit=20)
    assert [len(batch["x"]) for batch in reader] == [8, 8, 4]
    assert reader.get_next() is None


def test_limit_caps_samples_and_zero_samples_is_a_data_error(tmp_path: Path) -> None:
    ds = NpzDataset.open(_npz(tmp_path / "d.npz", 30))
    reader = StreamingCalibrationReader(ds, batch_size=5, batches_per_chunk=2, limit=12)
    assert len(reader) == 2  # batches of 5 and 5, then 2 alone
    assert reader.n_samples == 12
    with pytest.raises(DataError, match="no calibration samples"):
        StreamingCalibrationReader(ds, batch_size=5, limit=0)


def test_streaming_options_stride_one_chunk_at_a_time() -> None:
    assert streaming_extra_options() == {"CalibStridedMinMax": 1}


# --- real quantization -------------------------------------------------------------------------


@pytest.mark.parametrize("method", [CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile])
def test_quantize_static_with_streaming_reader_stays_close_to_fp32(
    model_path: Path, tmp_path: Path, method: CalibrationMethod
) -> None:
    # 100 samples in batches of 16 with 2 per chunk: 3 full chunks and a short 4-sample batch alone.
    calib = NpzDataset.open(_npz(tmp_path / "calib.npz", 100, seed=1))
    reader = StreamingCalibrationReader(calib, batch_size=16, batches_per_chunk=2)
    out = tmp_path / "int8.onnx"

    quantize_static(
        str(model_path),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        calibrate_method=method,
        extra_options=streaming_extra_options(),
    )

    x = np.random.default_rng(2).standard_normal((32, 1, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    cosine = (ref * got).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() > 0.99
    assert {n.op_type for n in onnx.load(str(out)).graph.node} >= {"QuantizeLinear", "Conv"}


# --- infinite activations ----------------------------------------------------------------------------------------


def _masked_scores_model(path: Path) -> Path:
    """x[n, 4] -> MatMul -> Add(additive mask: 0, 0, -inf, finfo.min) -> Softmax -> MatMul -> y[n, 3]: the masked
    scores an attention layer feeds its softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    mask = np.array([0.0, 0.0, -np.inf, np.finfo(np.float32).min], np.float32)
    inits = {
        "w1": rng.standard_normal((4, 4)).astype(np.float32),
        "mask": mask,
        "w2": rng.standard_normal((4, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["scores"], name="qk"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "w2"], ["y"], name="pv"),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibrate_keeps_infinite_values_out_of_ranges_and_names_their_tensors(tmp_path: Path, method: str) -> None:
    from onnxruntime.quantization.calibrate import load_tensors_data

    model = _masked_scores_model(tmp_path / "m.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32))
    reader = StreamingCalibrationReader(NpzDataset.open(data), batch_size=8, batches_per_chunk=2)

    result = calibrate(model, reader, method, tmp_path / "ranges.json", percentile=99.9)

    assert result.unbounded == ("masked",)
    ranges = load_tensors_data(result.cache)
    assert {"x", "scores", "masked", "probs", "y"} <= set(ranges.keys())
    for name, data_range in ranges.items():
        low, high = (float(np.max(np.abs(v))) for v in data_range.range_value)
        assert np.isfinite(low) and np.isfinite(high) and max(low, high) <= SENTINEL_ABS, (name, data_range.range_value)
    assert unbounded_neighbours(model, result.unbounded) == ["add_mask", "softmax"]


def test_calibrate_checks_the_deadline_before_every_chunk(tmp_path: Path) -> None:
    model = _masked_scores_model(tmp_path / "m.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((40, 4), np.float32))
    reader = StreamingCalibrationReader(NpzDataset.open(data), batch_size=8, batches_per_chunk=1)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise TimeoutError("budget")

    with pytest.raises(TimeoutError):
        calibrate(model, reader, "entropy", tmp_path / "ranges.json", check=check)
    assert len(calls) == 3 and not (tmp_path / "ranges.json").exists()


# --- memory ------------------------------------------------------------------------------------

_CALIBRATE = """
import json, resource, sys
from pathlib import Path
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
from quantgate.data import NpzDataset
from quantgate.plugins._ort_calibration import StreamingCalibrationReader, calibrate, streaming_extra_options

model, data, out, method, via = sys.argv[1:]
reader = StreamingCalibrationReader(NpzDataset.open(Path(data)), batch_size=16, batches_per_chunk=4)
if via == "calibrate":
    calibrate(Path(model), reader, method.lower(), Path(out).with_suffix(".json"))
else:
    quantize_static(model, out, reader, quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod[method], extra_options=streaming_extra_options())
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak_rss_mib(model: Path, data: Path, out: Path, method: str, via: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _CALIBRATE, str(model), str(data), str(out), method, via],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    return float(json.loads(last)["maxrss_kib"]) / 1024  # Linux reports ru_maxrss in KiB


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB only on Linux")
@pytest.mark.parametrize("via", ["quantize_static", "calibrate"])
def test_calibration_peak_memory_does_not_grow_with_samples(
    model_path: Path, data_dir: Path, tmp_path: Path, via: str
) -> None:
    # Entropy is the calibrator that hoards activations (MinMax only keeps per-batch min/max scalars).
    # 64 samples fill exactly one chunk (4 batches of 16), so both runs hold one chunk at a time; without
    # striding the 1024-sample run would keep every batch's activations, ≥ 960 * 316 kB ≈ 290 MiB more
    # (measured by hand: +586 MiB). Allow an eighth of that for allocator and histogram noise.
    small = _peak_rss_mib(model_path, data_dir / "calib64.npz", tmp_path / "small.onnx", "Entropy", via)
    large = _peak_rss_mib(model_path, data_dir / "calib1024.npz", tmp_path / "large.onnx", "Entropy", via)
    hoard_mib = (1024 - 64) * ACTIVATION_BYTES_PER_SAMPLE / 2**20
    bound = hoard_mib / 8
    assert large - small < bound, f"peak RSS {small:.0f} MiB at N=64, {large:.0f} MiB at N=1024 (bound {bound:.0f})"
