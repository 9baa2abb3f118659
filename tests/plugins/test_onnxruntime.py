from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from quantgate.data import NpzDataset
from quantgate.demo import export_bert_encoder
from quantgate.errors import BackendError
from quantgate.model import read_model_info
from quantgate.plugins.base import Calibration, Recipe, load_backend
from quantgate.plugins.onnxruntime import RECIPES, OnnxRuntimeBackend
from quantgate.validators.fidelity import cosine_per_row


def test_builtin_backend_is_found_through_the_entry_point() -> None:
    backend = load_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.available().ok


def test_recipe_names_are_unique_and_hashes_stable_and_distinct() -> None:
    names = [r.name for r in RECIPES]
    assert len(set(names)) == len(names) == 11
    assert len({r.digest for r in RECIPES}) == len(RECIPES)
    assert (
        RECIPES[0].digest == RECIPES[0].make(RECIPES[0].backend, RECIPES[0].name, "int8", **RECIPES[0].options).digest
    )


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# Dynamic recipes leave the CNN's Conv in float and ORT cannot quantize Gemm dynamically: tested on their own below,
# like int8-static-mixed, which needs accuracy control configured first.
PLAIN = [r for r in RECIPES if r.options["kind"] in ("static", "fp16")]


@pytest.mark.parametrize("recipe", PLAIN, ids=lambda r: r.name)
def test_every_recipe_builds_a_model_that_runs_close_to_fp32(
    recipe: Any, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend()
    info = read_model_info(digits_onnx)
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    cand = backend.compress(info, recipe, calib, tmp_path / recipe.name)
    ops = _op_types(cand.artifact)
    kind = recipe.options["kind"]
    if kind == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    else:
        assert onnx.TensorProto.FLOAT16 in {i.data_type for i in onnx.load(str(cand.artifact)).graph.initializer}
    x = NpzDataset.open(eval_npz).take(32).inputs
    base = backend.runner(backend.baseline(info, tmp_path), threads=1).run(x)[0]
    out = backend.runner(cand, threads=1).run(x)[0]
    assert out.shape == base.shape
    assert float(np.mean(cosine_per_row(base, out))) > 0.99
    assert cand.size_bytes < digits_onnx.stat().st_size


def test_preprocessing_falls_back_when_symbolic_shape_inference_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transformer exports break symbolic shape inference; the recipe must still build, with a note,
    and onnxruntime's debug dump must not be left in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = tmp_path / "bert.onnx"
    export_bert_encoder(path)
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=rng.integers(0, 100, (32, 8)), attention_mask=np.ones((32, 8), dtype=np.int64))
    info = read_model_info(path)
    recipe = next(r for r in RECIPES if r.name == "int8-static-qdq-minmax")
    cand = OnnxRuntimeBackend().compress(info, recipe, Calibration(NpzDataset.open(data), 8, None), tmp_path / "w")
    assert any("symbolic shape inference" in n or "pre-processing" in n for n in cand.notes), cand.notes
    assert list(cwd.iterdir()) == []
    x = NpzDataset.open(data).take(4).inputs
    out = OnnxRuntimeBackend().runner(cand, threads=1).run(x)[0]
    base = OnnxRuntimeBackend().runner(OnnxRuntimeBackend().baseline(info, tmp_path), threads=1).run(x)[0]
    assert float(np.mean(cosine_per_row(base.reshape(4, -1), out.reshape(4, -1)))) > 0.95


def test_a_model_that_cannot_be_loaded_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    from quantgate.plugins.base import Candidate, Recipe

    with pytest.raises(BackendError, match=r"onnxruntime cannot load bad\.onnx"):
        OnnxRuntimeBackend().runner(Candidate(Recipe.make("onnxruntime", "fp32", "fp32"), bad), threads=1)


# --- calibration of transformers with a padding mask ----------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The random-weight BERT encoder and calibration data whose attention masks pad some sequences: the masked
    scores carry -inf / finfo(float32).min into the activations."""
    root = tmp_path_factory.mktemp("bert")
    path = root / "bert.onnx"
    export_bert_encoder(path)
    rng = np.random.default_rng(0)
    mask = np.ones((32, 8), dtype=np.int64)
    mask[::2, 5:] = 0
    data = root / "calib.npz"
    np.savez(data, input_ids=rng.integers(0, 100, (32, 8)), attention_mask=mask)
    return path, data


@pytest.mark.parametrize("name", ["int8-static-qdq-entropy", "int8-static-qdq-percentile-perchannel"])
def test_histogram_calibration_survives_infinite_attention_mask_values(
    name: str, masked_bert: tuple[Path, Path], tmp_path: Path
) -> None:
    path, data = masked_bert
    info = read_model_info(path)
    recipe = next(r for r in RECIPES if r.name == name)
    backend = OnnxRuntimeBackend()
    cand = backend.compress(info, recipe, Calibration(NpzDataset.open(data), 8, None), tmp_path / "w")
    note = next(n for n in cand.notes if "infinite" in n)
    assert "Softmax" in note and "stay float" in note, cand.notes
    assert "QuantizeLinear" in _op_types(cand.artifact)
    x = NpzDataset.open(data).take(16).inputs
    out = backend.runner(cand, threads=1).run(x)[0]
    base = backend.runner(backend.baseline(info, tmp_path), threads=1).run(x)[0]
    assert float(np.mean(cosine_per_row(base.reshape(16, -1), out.reshape(16, -1)))) > 0.99


# --- dynamic INT8: operator rules -----------------------------------------------------------------------------------


def conv_matmul(path: Path) -> Path:
    """x[n, 1, 8, 8] -> Conv -> Relu -> Reshape -> MatMul -> y[n, 8, 10]. The MatMul is 3-D, so ORT's pre-processing
    does not turn it into a Gemm (which quantize_dynamic cannot quantize)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "b": np.zeros(8, np.float32),
        "shape": np.array([0, 8, 36], np.int64),
        "m": (rng.standard_normal((36, 10)) / 6).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "m"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 10])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture()
def conv_model(tmp_path: Path) -> tuple[Any, Calibration]:
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((16, 1, 8, 8)).astype(np.float32))
    return read_model_info(conv_matmul(tmp_path / "m.onnx")), Calibration(NpzDataset.open(data), 8, None)


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-dynamic-perchannel"])
def test_dynamic_recipes_leave_conv_in_float_and_say_why(
    name: str, conv_model: tuple[Any, Calibration], tmp_path: Path
) -> None:
    info, calib = conv_model
    recipe = next(r for r in RECIPES if r.name == name)
    assert "Conv" not in str(recipe.options["op_types_to_quantize"]).split(",")
    backend = OnnxRuntimeBackend()
    cand = backend.compress(info, recipe, calib, tmp_path / "w")
    ops = _op_types(cand.artifact)
    assert "MatMulInteger" in ops and "ConvInteger" not in ops and "Conv" in ops
    assert any("Conv left in float" in n and "op_types_to_quantize" in n for n in cand.notes), cand.notes
    x = calib.dataset.take(8).inputs
    base = backend.runner(backend.baseline(info, tmp_path), threads=1).run(x)[0]
    out = backend.runner(cand, threads=1).run(x)[0]
    assert float(np.mean(cosine_per_row(base.reshape(8, -1), out.reshape(8, -1)))) > 0.99


def test_dynamic_recipe_honours_an_overridden_op_type_list(conv_model: tuple[Any, Calibration], tmp_path: Path) -> None:
    info, calib = conv_model
    base = next(r for r in RECIPES if r.name == "int8-dynamic")
    recipe = Recipe.make(base.backend, base.name, base.precision, **{**base.options, "op_types_to_quantize": "Conv"})
    cand = OnnxRuntimeBackend().compress(info, recipe, calib, tmp_path / "w")
    ops = _op_types(cand.artifact)
    assert "ConvInteger" in ops and "MatMulInteger" not in ops
    assert not any("left in float" in n for n in cand.notes)


def test_dynamic_recipe_with_nothing_to_quantize_fails_fast(
    conv_model: tuple[Any, Calibration], tmp_path: Path
) -> None:
    info, calib = conv_model
    base = next(r for r in RECIPES if r.name == "int8-dynamic")
    recipe = Recipe.make(base.backend, base.name, base.precision, **{**base.options, "op_types_to_quantize": "LSTM"})
    with pytest.raises(BackendError, match=r"int8-dynamic failed: nothing to quantize: the model has no LSTM op"):
        OnnxRuntimeBackend().compress(info, recipe, calib, tmp_path / "w")
    assert not (tmp_path / "w" / "int8-dynamic.onnx").exists()


# --- int8-static-mixed ----------------------------------------------------------------------------------------------

MIXED = next(r for r in RECIPES if r.name == "int8-static-mixed")


def _fidelity(backend: OnnxRuntimeBackend, info: Any, cand: Any, x: dict[str, np.ndarray], tmp_path: Path) -> float:
    base = backend.runner(backend.baseline(info, tmp_path), threads=1).run(x)[0]
    out = backend.runner(cand, threads=1).run(x)[0]
    return float(np.mean(cosine_per_row(base.reshape(len(base), -1), out.reshape(len(out), -1))))


def test_mixed_recipe_needs_accuracy_control(digits_onnx: Path, calib_npz: Path, tmp_path: Path) -> None:
    calib = Calibration(NpzDataset.open(calib_npz), 16, 32)
    with pytest.raises(BackendError, match=r"int8-static-mixed needs .*configure_accuracy_control\(\)"):
        OnnxRuntimeBackend().compress(read_model_info(digits_onnx), MIXED, calib, tmp_path)


def test_mixed_recipe_meets_the_fidelity_threshold_with_the_fewest_float_layers(
    digits_onnx: Path, calib_npz: Path, tmp_path: Path
) -> None:
    """A threshold halfway between the fully quantized model's fidelity and 1 forces the ranking and the search."""
    info = read_model_info(digits_onnx)
    calib = Calibration(NpzDataset.open(calib_npz), 16, 64)
    x = NpzDataset.open(calib_npz).take(64).inputs
    backend = OnnxRuntimeBackend()
    full = next(r for r in RECIPES if r.name == "int8-static-qdq-minmax-perchannel")  # what the search starts from
    max_drop = (1.0 - _fidelity(backend, info, backend.compress(info, full, calib, tmp_path / "full"), x, tmp_path)) / 2
    backend.configure_accuracy_control(NpzDataset.open(calib_npz), "fidelity", max_drop, 120.0, limit=64)

    cand = backend.compress(info, MIXED, calib, tmp_path / "mixed")

    assert _fidelity(backend, info, cand, x, tmp_path) >= 1.0 - max_drop
    layers = {n.name for n in onnx.load(str(digits_onnx)).graph.node if n.op_type in ("Conv", "Gemm")}
    kept = next(n for n in cand.notes if n.startswith("mixed precision:"))
    assert any(name in kept for name in layers), cand.notes
    assert not kept.startswith("mixed precision: 0 of"), cand.notes
    assert any(n.startswith("k search on fidelity") and "k=0:" in n for n in cand.notes), cand.notes
    assert [p.name for p in (tmp_path / "mixed").iterdir()] == ["int8-static-mixed.onnx"]  # variants cleaned up


def test_mixed_recipe_keeps_the_fragile_layer_float(tmp_path: Path) -> None:
    from tests.test_sensitivity import FRAGILE, fragile_data, fragile_mlp

    info = read_model_info(fragile_mlp(tmp_path / "fragile.onnx"))
    data = NpzDataset.open(fragile_data(tmp_path / "calib.npz"))
    backend = OnnxRuntimeBackend()
    backend.configure_accuracy_control(data, "fidelity", 0.01, 60.0, caveat="tuned on the calibration set")
    cand = backend.compress(info, MIXED, Calibration(data, 16, None), tmp_path / "w")
    kept = next(n for n in cand.notes if n.startswith("mixed precision:"))
    assert kept.startswith("mixed precision: 1 of 3 ranked layers kept in float") and FRAGILE in kept, cand.notes
    assert "tuned on the calibration set" in cand.notes
    assert _fidelity(backend, info, cand, data.take(64).inputs, tmp_path) >= 0.99


def test_mixed_recipe_stops_at_its_time_budget(digits_onnx: Path, calib_npz: Path, tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend()
    backend.configure_accuracy_control(NpzDataset.open(calib_npz), "fidelity", 0.0, 1e-6, limit=16)
    calib = Calibration(NpzDataset.open(calib_npz), 16, 32)
    with pytest.raises(BackendError, match=r"time budget of 1e-06 s exhausted .*accuracy_control.time_budget_s"):
        backend.compress(read_model_info(digits_onnx), MIXED, calib, tmp_path)


def test_static_recipes_of_one_calibration_method_share_its_activation_ranges(
    digits_onnx: Path, calib_npz: Path, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend()
    info = read_model_info(digits_onnx)
    by_name = {r.name: r for r in RECIPES}
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    per_tensor = backend.compress(info, by_name["int8-static-qdq-minmax"], calib, tmp_path / "a")
    memo_dirs = list(tmp_path.rglob("_calibration"))
    assert len(memo_dirs) == 1 and len(list(memo_dirs[0].glob("*.unbounded.json"))) == 1
    ranges = next(p for p in memo_dirs[0].glob("*.json") if not p.name.endswith(".unbounded.json"))
    stamp = ranges.stat().st_mtime_ns
    per_channel = backend.compress(info, by_name["int8-static-qdq-minmax-perchannel"], calib, tmp_path / "b")
    assert ranges.stat().st_mtime_ns == stamp and len(list(memo_dirs[0].glob("*.unbounded.json"))) == 1
    backend.compress(info, by_name["int8-static-qdq-entropy"], calib, tmp_path / "c")
    assert len(list(memo_dirs[0].glob("*.unbounded.json"))) == 2  # another method: its own ranges

    def activation_scales(path: Path) -> dict[str, float]:
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        # Q/DQ of activations have a scalar scale; per-channel weight scales are vectors.
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and inits[n.input[1]].ndim == 0}  # fmt: skip

    assert activation_scales(per_tensor.artifact) == activation_scales(per_channel.artifact)


# --- int8-hybrid ----------------------------------------------------------------------------------------------------

HYBRID = next(r for r in RECIPES if r.name == "int8-hybrid")


def test_hybrid_recipe_quantizes_convolutions_statically_and_the_lstm_dynamically(tmp_path: Path) -> None:
    """Conv -> LSTM -> Linear, like a CRNN text recogniser: static QDQ leaves the LSTM float, the hybrid does not."""
    import torch

    from tests.conftest import export_onnx

    class Crnn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8 * 4, 32, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            f = torch.relu(self.conv(x))  # [n, 8, 4, 16]
            seq = f.permute(0, 3, 1, 2).flatten(2)  # [n, 16, 32]
            return self.fc(self.lstm(seq)[0])

    torch.manual_seed(0)
    path = export_onnx(Crnn().eval(), (1, 1, 4, 16), tmp_path / "crnn.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((32, 1, 4, 16)).astype(np.float32))
    info, calib = read_model_info(path), Calibration(NpzDataset.open(data), 8, None)
    assert info.is_recurrent
    backend = OnnxRuntimeBackend()
    cand = backend.compress(info, HYBRID, calib, tmp_path / "w")
    ops = _op_types(cand.artifact)
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops and "QuantizeLinear" in ops, ops
    assert any("dynamic INT8 on LSTM" in n for n in cand.notes), cand.notes
    x = calib.dataset.take(16).inputs
    base = backend.runner(backend.baseline(info, tmp_path), threads=1).run(x)[0]
    out = backend.runner(cand, threads=1).run(x)[0]
    assert float(np.mean(cosine_per_row(base.reshape(16, -1), out.reshape(16, -1)))) > 0.98


def test_hybrid_recipe_on_a_model_without_recurrent_layers_fails_before_calibrating(
    conv_model: tuple[Any, Calibration], tmp_path: Path
) -> None:
    info, calib = conv_model
    assert not info.is_recurrent
    with pytest.raises(BackendError, match=r"int8-hybrid failed: nothing for dynamic INT8: the model has no LSTM op"):
        OnnxRuntimeBackend().compress(info, HYBRID, calib, tmp_path / "w")
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.onnx"))


def test_per_channel_recipes_run_on_an_opset_11_model(digits_onnx: Path, calib_npz: Path, tmp_path: Path) -> None:
    # onnxruntime's quantizer writes per-channel Q/DQ (an `axis`, opset 13) into an opset-11 graph as it is, and its
    # runtime then refuses the model (the real PP-OCR classifier is an opset-11 export).
    model = onnx.load(str(digits_onnx))
    (default,) = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    default.version = 11  # its operators (Conv, Relu, MaxPool, Reshape, Gemm) read the same at opset 11
    onnx.checker.check_model(model)
    old = tmp_path / "opset11.onnx"
    onnx.save(model, str(old))
    before = old.read_bytes()
    backend = OnnxRuntimeBackend()
    info = read_model_info(old)
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    recipe = next(r for r in RECIPES if r.name == "int8-static-qdq-minmax-perchannel")
    cand = backend.compress(info, recipe, calib, tmp_path / recipe.name)
    assert any("converted from opset 11 to 13" in n for n in cand.notes)
    out = backend.runner(cand, threads=1).run(NpzDataset.open(calib_npz).take(8).inputs)[0]
    assert out.shape[0] == 8
    assert old.read_bytes() == before  # converted beside the source, never in place
