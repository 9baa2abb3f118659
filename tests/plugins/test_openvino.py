import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate.data import NpzDataset
from quantgate.demo import export_bert_encoder
from quantgate.errors import BackendError, DataError
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import Calibration, Candidate
from quantgate.plugins.onnxruntime import OrtRunner
from quantgate.plugins.openvino import OpenVinoBackend
from quantgate.validators.accuracy import top1
from quantgate.validators.fidelity import cosine_per_row

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CNN_RECIPES = ("fp16-ir", "int8-ptq-performance", "int8-ptq-mixed", "int8-weights", "int8-accuracy-control")


@dataclass(frozen=True)
class Fp32:
    info: ModelInfo
    candidate: Candidate
    outputs: np.ndarray
    labels: np.ndarray


def _outputs(backend: OpenVinoBackend, cand: Candidate, data: NpzDataset, batch: int) -> np.ndarray:
    runner = backend.runner(cand, threads=1)
    return np.concatenate([runner.run(b.inputs)[0] for b in data.batches(batch)])


@pytest.fixture(scope="module")
def fp32(digits_onnx: Path, eval_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Fp32:
    backend = OpenVinoBackend()
    info = read_model_info(digits_onnx)
    cand = backend.baseline(info, tmp_path_factory.mktemp("ov-baseline"))
    evaluation = NpzDataset.open(eval_npz)
    labels = evaluation.take(evaluation.n_samples).labels
    assert labels is not None
    return Fp32(info, cand, _outputs(backend, cand, evaluation, 32), labels)


def test_availability_is_ok_with_openvino_and_nncf_installed() -> None:
    assert OpenVinoBackend().available().ok


def test_module_imports_and_reports_unavailable_without_openvino() -> None:
    code = (
        "import sys; sys.modules['openvino'] = None; sys.modules['nncf'] = None\n"
        "from quantgate.plugins.openvino import OpenVinoBackend\n"
        "a = OpenVinoBackend().available()\n"
        "assert not a.ok and 'not importable' in a.reason and a.hint == 'pip install quantgate[openvino]', a\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_recipe_names_are_stable_and_transformer_settings_change_the_digest(fp32: Fp32) -> None:
    cnn = OpenVinoBackend().recipes(fp32.info)
    assert tuple(r.name for r in cnn) == CNN_RECIPES
    assert len({r.digest for r in cnn}) == len(cnn)
    transformer = OpenVinoBackend().recipes(ModelInfo(fp32.info.path, (), (), 17, is_transformer=True))
    assert tuple(r.name for r in transformer) == CNN_RECIPES
    changed = {r.name for r, t in zip(cnn, transformer, strict=True) if r.digest != t.digest}
    assert changed == {"int8-ptq-performance", "int8-ptq-mixed", "int8-accuracy-control"}


def test_baseline_ir_is_fp32_with_a_dynamic_batch_and_matches_onnxruntime(fp32: Fp32, eval_data: Any) -> None:
    xml, bin_ = fp32.candidate.files
    assert (xml.suffix, bin_.suffix) == (".xml", ".bin") and bin_.exists()
    assert fp32.candidate.recipe.name == "fp32-ir"
    # FP32 weights: the .bin is as large as the ONNX initializers (an FP16 IR would be half).
    assert fp32.candidate.size_bytes > 0.95 * fp32.info.path.stat().st_size
    ort = OrtRunner(fp32.info.path, threads=1)
    runner = OpenVinoBackend().runner(fp32.candidate, threads=1)
    for n in (1, 32, 64):
        x = {"input": eval_data["input"][:n]}
        out = runner.run(x)
        assert len(out) == 1 and out[0].shape == (n, 10)
        np.testing.assert_allclose(out[0], ort.run(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CNN_RECIPES)
def test_every_recipe_builds_a_smaller_ir_that_stays_close_to_fp32(
    name: str, fp32: Fp32, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    backend = OpenVinoBackend()
    evaluation = NpzDataset.open(eval_npz)
    budget = 60.0
    backend.configure_accuracy_control(evaluation, "accuracy", max_drop=0.01, time_budget_s=budget, limit=128)
    recipe = next(r for r in backend.recipes(fp32.info) if r.name == name)
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    t0 = time.monotonic()
    cand = backend.compress(fp32.info, recipe, calib, tmp_path)
    assert time.monotonic() - t0 < budget + 30
    assert cand.artifact == tmp_path / f"{name}.xml" and all(f.exists() for f in cand.files)
    assert cand.size_bytes < 0.6 * fp32.candidate.size_bytes  # FP16 halves it, INT8 quarters it

    out = _outputs(backend, cand, evaluation, 32)
    assert float(np.mean(cosine_per_row(fp32.outputs, out))) > 0.99
    assert top1(out, fp32.labels) >= top1(fp32.outputs, fp32.labels) - 0.01
    single = backend.runner(cand, threads=1).run(evaluation.take(1).inputs)[0]
    np.testing.assert_allclose(single, out[:1], rtol=1e-3, atol=1e-3)
    if name == "int8-accuracy-control":
        what = "accuracy control on 128 samples of evaluation.npz by accuracy"
        assert any(what in n and "within max_drop" in n for n in cand.notes)


def test_accuracy_control_stops_when_its_time_budget_is_spent(
    fp32: Fp32, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    """max_drop=0 on fidelity can never be met, so nncf would revert layer after layer; the budget stops it."""
    backend = OpenVinoBackend()
    backend.configure_accuracy_control(NpzDataset.open(eval_npz), "fidelity", max_drop=0.0, time_budget_s=1.0)
    recipe = next(r for r in backend.recipes(fp32.info) if r.name == "int8-accuracy-control")
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"^int8-accuracy-control failed: time budget of 1 s exhausted"):
        backend.compress(fp32.info, recipe, Calibration(NpzDataset.open(calib_npz), 16, 64), tmp_path)
    assert time.monotonic() - t0 < 1.0 + 10


def test_accuracy_control_without_validation_data_is_a_backend_error(
    fp32: Fp32, calib_npz: Path, tmp_path: Path
) -> None:
    backend = OpenVinoBackend()
    recipe = next(r for r in backend.recipes(fp32.info) if r.name == "int8-accuracy-control")
    with pytest.raises(BackendError, match="int8-accuracy-control needs validation data"):
        backend.compress(fp32.info, recipe, Calibration(NpzDataset.open(calib_npz)), tmp_path)
    with pytest.raises(DataError, match="has no 'labels' array"):
        backend.configure_accuracy_control(NpzDataset.open(calib_npz), "accuracy", 0.01, 60.0)


def _bert_onnx(path: Path) -> Path:
    export_bert_encoder(path, pooled=True)
    return path


def test_transformer_gets_transformer_settings_and_weights_only_int8(tmp_path: Path) -> None:
    info = read_model_info(_bert_onnx(tmp_path / "bert.onnx"))
    assert info.is_transformer
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=rng.integers(0, 100, (48, 8)), attention_mask=np.ones((48, 8), dtype=np.int64))
    x = NpzDataset.open(data).take(16).inputs
    backend = OpenVinoBackend()
    base = backend.baseline(info, tmp_path / "base")
    ref = backend.runner(base, threads=1).run(x)
    ort = OrtRunner(info.path, threads=1).run(x)
    assert [o.shape for o in ref] == [o.shape for o in ort] == [(16, 8, 32), (16, 32)]  # ONNX output order
    for ours, theirs in zip(ref, ort, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)

    recipes = {r.name: r for r in backend.recipes(info)}
    assert recipes["int8-ptq-mixed"].options["model_type"] == "transformer"
    assert recipes["int8-accuracy-control"].options["preset"] == "mixed"
    for name in ("int8-ptq-mixed", "int8-weights"):
        cand = backend.compress(info, recipes[name], Calibration(NpzDataset.open(data), 8, 32), tmp_path / name)
        assert cand.size_bytes < base.size_bytes
        out = backend.runner(cand, threads=1).run(x)
        for ours, theirs in zip(out, ref, strict=True):
            assert float(np.mean(cosine_per_row(ours.reshape(16, -1), theirs.reshape(16, -1)))) > 0.99


def _mystery_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "mystery",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_a_model_openvino_cannot_convert_is_a_backend_error_naming_the_op(calib_npz: Path, tmp_path: Path) -> None:
    info = read_model_info(_mystery_onnx(tmp_path / "mystery.onnx"))
    backend = OpenVinoBackend()
    reason = "openvino cannot convert mystery.onnx: No conversion rule found for operations: com.example.Mystery"
    with pytest.raises(BackendError) as caught:
        backend.baseline(info, tmp_path / "base")
    assert str(caught.value) == reason
    recipe = backend.recipes(info)[1]
    with pytest.raises(BackendError) as caught:
        backend.compress(info, recipe, Calibration(NpzDataset.open(calib_npz)), tmp_path / "c")
    assert str(caught.value) == f"{recipe.name} failed: {reason}"


def test_an_ir_that_cannot_be_loaded_is_a_backend_error(fp32: Fp32, tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<net>")
    with pytest.raises(BackendError, match=r"^openvino cannot load bad\.xml: "):
        OpenVinoBackend().runner(Candidate(fp32.candidate.recipe, bad, files=(bad,)), threads=1)
