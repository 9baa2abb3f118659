"""Sensitivity ranking on a model with one fragile layer, the k search on synthetic scores, and the scorer."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantgate.data import NpzDataset
from quantgate.errors import DataError
from quantgate.sensitivity import (
    SEARCH_MARGIN,
    AccuracyControl,
    BudgetExhausted,
    Deadline,
    LayerSensitivity,
    Scorer,
    rank_layers,
    search_float_layers,
)

FRAGILE = "gemm2"  # the layer whose input activation has one channel 1000x the others


def fragile_mlp(path: Path, seed: int = 0) -> Path:
    """x[n, 32] -> Gemm -> Relu -> Mul -> Gemm -> Relu -> Gemm -> y[n, 10]. The Mul scales channel 0 by 1000 and the
    next Gemm's weights undo it, so the FP32 output is ordinary, but ``gemm2``'s input quantized per tensor keeps
    nothing of the other 63 channels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 64)) / np.sqrt(32)).astype(np.float32)
    w2 = (rng.standard_normal((64, 64)) / np.sqrt(64)).astype(np.float32)
    w3 = (rng.standard_normal((64, 10)) / np.sqrt(64)).astype(np.float32)
    scale = np.ones(64, np.float32)
    scale[0] = 1000.0
    w2[0] *= 1e-3
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (scale, "scale"))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h1"], name="gemm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Mul", ["r1", "scale"], ["m1"], name="outlier"),
        helper.make_node("Gemm", ["m1", "w2"], ["h2"], name=FRAGILE),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3"], ["y"], name="gemm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fragile_data(path: Path, n: int = 64, seed: int = 1) -> Path:
    np.savez(path, x=np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(fp32 model, its fully quantized QDQ model, calibration data)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from quantgate.plugins._ort_calibration import StreamingCalibrationReader, streaming_extra_options

    root = tmp_path_factory.mktemp("fragile")
    model, data = fragile_mlp(root / "fragile.onnx"), fragile_data(root / "calib.npz")
    reader = StreamingCalibrationReader(NpzDataset.open(data), batch_size=16)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(model), str(root / "qdq.onnx"), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=streaming_extra_options(),
        )  # fmt: skip
    return model, root / "qdq.onnx", data


def _batches(data: Path, n: int = 32) -> list[dict[str, np.ndarray]]:
    return [b.inputs for b in NpzDataset.open(data).batches(16, limit=n)]


# --- ranking -------------------------------------------------------------------------------------------------------


def test_rank_layers_puts_the_layer_fed_by_an_outlier_activation_first(fragile: tuple[Path, Path, Path]) -> None:
    model, qdq, data = fragile
    ranking = rank_layers(model, qdq, _batches(data))
    assert ranking[0].node == FRAGILE
    assert {layer.node for layer in ranking} == {"gemm1", FRAGILE, "gemm3"}
    assert ranking[0].error > 0.5
    assert ranking[0].error > 100 * ranking[1].error
    # Keeping it float must also keep the Mul that quantizes the same tensor float.
    assert set(ranking[0].exclude) >= {FRAGILE, "outlier"}


class _ExpiresAfter(Deadline):
    """A deadline that expires after ``checks`` calls to ``expired``."""

    def __init__(self, checks: int) -> None:
        super().__init__(1.0)
        self.left = checks

    def expired(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_rank_layers_stops_at_the_deadline_with_the_partial_ranking(fragile: tuple[Path, Path, Path]) -> None:
    model, qdq, data = fragile
    with pytest.raises(BudgetExhausted, match=r"time budget .* while ranking layers \(1 of 3 measured\)") as info:
        rank_layers(model, qdq, _batches(data, 16), deadline=_ExpiresAfter(1))
    assert len(info.value.partial) == 1


# --- search --------------------------------------------------------------------------------------------------------


def _ranking(n: int) -> list[LayerSensitivity]:
    return [LayerSensitivity(f"layer{i}", "Conv", 1.0 / (i + 1)) for i in range(n)]


def _monotone(passing_from: int | None) -> tuple[list[int], Callable[[tuple[str, ...]], float]]:
    """A score that reaches 1.0 from ``passing_from`` float layers on (never when None), and the ks it was asked."""
    asked: list[int] = []

    def score(layers: tuple[str, ...]) -> float:
        asked.append(len(layers))
        assert layers == tuple(f"layer{i}" for i in range(len(layers)))  # always the most sensitive first
        return 1.0 if passing_from is not None and len(layers) >= passing_from else 0.5 + len(layers) / 100

    return asked, score


@pytest.mark.parametrize("n, smallest", [(20, 7), (20, 1), (20, 20), (1, 1), (33, 32)])
def test_search_returns_the_smallest_k_with_few_builds(n: int, smallest: int) -> None:
    asked, score = _monotone(smallest)
    outcome = search_float_layers(_ranking(n), score, threshold=0.99)
    assert outcome.passed and outcome.complete
    assert outcome.k == smallest
    assert outcome.float_layers == tuple(f"layer{i}" for i in range(smallest))
    assert outcome.score == 1.0
    assert asked[0] == 0
    assert [k for k, _ in outcome.trace] == asked
    assert len(asked) <= 2 + 2 * int(np.ceil(np.log2(n)))


def test_search_finds_a_small_k_in_a_few_builds_however_many_layers() -> None:
    asked, score = _monotone(2)  # 2 of 27 convolutions in float held the gate on the real CRAFT detector
    outcome = search_float_layers(_ranking(27), score, threshold=0.99)
    assert outcome.k == 2 and asked == [0, 1, 2]


def test_search_stops_at_k0_when_the_quantized_model_passes() -> None:
    asked, score = _monotone(0)
    outcome = search_float_layers(_ranking(10), score, threshold=0.99)
    assert (outcome.k, outcome.float_layers, asked) == (0, (), [0])


def test_search_tries_all_float_last_and_reports_nothing_passing() -> None:
    asked, score = _monotone(None)
    outcome = search_float_layers(_ranking(10), score, threshold=0.99)
    assert not outcome.passed and outcome.complete
    assert asked[0] == 0 and asked[-1] == 10
    assert outcome.k is None and outcome.float_layers == ()


def test_search_stops_at_the_deadline_with_the_best_passing_so_far() -> None:
    asked, score = _monotone(3)
    # k=0, 1, 2 fail, k=4 passes, then the deadline: the search returns k=4, saying it may not be the smallest.
    outcome = search_float_layers(_ranking(20), score, threshold=0.99, deadline=_ExpiresAfter(4))
    assert asked == [0, 1, 2, 4]
    assert outcome.passed and not outcome.complete
    assert outcome.k == 4
    assert "time budget" in outcome.reason


def test_search_stopped_before_anything_passes_says_so() -> None:
    asked, score = _monotone(15)
    outcome = search_float_layers(_ranking(20), score, threshold=0.99, deadline=_ExpiresAfter(2))
    assert asked == [0, 1]
    assert not outcome.passed and not outcome.complete


# --- scoring -------------------------------------------------------------------------------------------------------


def test_scorer_thresholds_follow_the_metric(fragile: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from quantgate.plugins.onnxruntime import OrtRunner

    model, qdq, data = fragile
    fp32 = OrtRunner(model, threads=1)
    quantized = OrtRunner(qdq, threads=1)
    control = AccuracyControl(NpzDataset.open(data), "fidelity", 0.02, 60.0, limit=40)
    scorer = Scorer(control, lambda x: fp32.run(x)[0], batch_size=16)
    assert scorer.gate_threshold == pytest.approx(0.98)
    assert scorer.threshold == pytest.approx(1 - 0.02 * (1 - SEARCH_MARGIN))  # margin for unseen samples
    assert scorer.score(lambda x: fp32.run(x)[0]) == pytest.approx(1.0)
    assert scorer.score(lambda x: quantized.run(x)[0]) < 0.5

    labelled = tmp_path / "labelled.npz"
    x = np.load(data)["x"]
    labels = fp32.run({"x": x})[0].argmax(axis=1)
    labels[:8] = (labels[:8] + 1) % 10  # FP32 top-1 = 56/64
    np.savez(labelled, x=x, labels=labels)
    control = AccuracyControl(NpzDataset.open(labelled), "accuracy", 0.05, 60.0)
    scorer = Scorer(control, lambda x: fp32.run(x)[0], batch_size=16)
    assert scorer.fp32_score == pytest.approx(56 / 64)
    assert scorer.threshold == pytest.approx(56 / 64 - 0.05 * (1 - SEARCH_MARGIN))

    with pytest.raises(DataError, match="no 'labels' array"):
        AccuracyControl(NpzDataset.open(data), "accuracy", 0.01, 60.0)


def test_the_scorer_decides_on_part_of_the_samples_only_when_the_answer_is_clear(
    fragile: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from quantgate.plugins.onnxruntime import OrtRunner

    model, qdq, data = fragile
    fp32, quantized = OrtRunner(model, threads=1), OrtRunner(qdq, threads=1)
    x = np.load(data)["x"]
    many = tmp_path / "many.npz"
    np.savez(many, x=np.concatenate([x] * 4))  # 256 samples: quarters of 64
    control = AccuracyControl(NpzDataset.open(many), "fidelity", 0.02, 60.0)
    scorer = Scorer(control, lambda b: fp32.run(b)[0], batch_size=16)
    assert scorer.score(lambda b: quantized.run(b)[0]) < 0.5 and scorer.last_samples == 64  # far below: a quarter

    def half(b: dict[str, np.ndarray]) -> np.ndarray:  # every other sample quantized: per-sample scores spread
        out = fp32.run(b)[0].copy()
        out[::2] = quantized.run(b)[0][::2]
        return out

    everything = scorer.score(half)
    assert scorer.last_samples == 64  # far below 0.98 too
    # With the threshold at the mean itself, no part of the samples can decide: all 256 are scored.
    at = Scorer(
        AccuracyControl(NpzDataset.open(many), "fidelity", 1.0 - everything, 60.0), lambda b: fp32.run(b)[0], 16
    )
    at.score(half)
    assert at.last_samples == 256


def test_rank_layers_from_cached_fp32_activations_matches_whole_graph_runs(
    fragile: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variants run only the nodes downstream of their layer, fed FP32 activations; past the cache's memory cap
    they run the whole graph. Both must measure the same thing."""
    import quantgate.sensitivity as sensitivity

    model, qdq, data = fragile
    cached = rank_layers(model, qdq, _batches(data))
    monkeypatch.setattr(sensitivity, "_PREFIX_CACHE_BYTES", 0)
    whole = rank_layers(model, qdq, _batches(data))
    assert [layer.node for layer in whole] == [layer.node for layer in cached]
    np.testing.assert_allclose([layer.error for layer in whole], [layer.error for layer in cached], rtol=1e-5)
