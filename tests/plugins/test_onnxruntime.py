from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from quantgate.data import NpzDataset
from quantgate.demo import export_bert_encoder
from quantgate.errors import BackendError
from quantgate.model import read_model_info
from quantgate.plugins.base import Calibration, load_backend
from quantgate.plugins.onnxruntime import RECIPES, OnnxRuntimeBackend
from quantgate.validators.fidelity import cosine_per_row


def test_builtin_backend_is_found_through_the_entry_point() -> None:
    backend = load_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.available().ok


def test_recipe_names_are_unique_and_hashes_stable_and_distinct() -> None:
    names = [r.name for r in RECIPES]
    assert len(set(names)) == len(names) == 9
    assert len({r.digest for r in RECIPES}) == len(RECIPES)
    assert (
        RECIPES[0].digest == RECIPES[0].make(RECIPES[0].backend, RECIPES[0].name, "int8", **RECIPES[0].options).digest
    )


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
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
    elif kind == "dynamic":
        assert "DynamicQuantizeLinear" in ops or "ConvInteger" in ops
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
