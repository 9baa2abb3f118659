"""Quantization-aware fine-tuning: real torch (torchao PT2E), real ONNX Runtime, real MLflow and Prefect.

Tiny budgets on the digits CNN: each fine-tuning here takes a few seconds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate import qat
from quantgate.data import NpzDataset
from quantgate.plugins.base import Recipe
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend

# What the tests fine-tune with: a few steps, so a run costs seconds.
FAST_QAT = {"epochs": 2, "batch_size": 32, "samples": 64, "learning_rate": 1e-4, "time_budget_s": 120}


@pytest.fixture(scope="session")
def pt2_dir(digits_cnn: Any, digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN saved in MLflow's default pytorch format (a torch.export program), as intake downloads it."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        y = digits_cnn(torch.from_numpy(digits.x_test[:2])).numpy()
    out = tmp_path_factory.mktemp("pt2") / "model"
    mlflow.pytorch.save_model(
        digits_cnn, str(out), signature=infer_signature(digits.x_test[:2], y), input_example=digits.x_test[:2]
    )
    return out


@pytest.fixture(scope="session")
def unlabelled_calib(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qat-data") / "calibration.npz"
    np.savez(path, input=digits.x_train[:128])
    return path


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _recipe(**settings: Any) -> Recipe:
    base = OnnxRuntimeBackend().qat_recipes(None)[0]  # type: ignore[arg-type]
    return Recipe.make(base.backend, base.name, base.precision, **(base.options | settings))


def test_distillation_only_qat_runs_without_labels_and_never_touches_the_source(
    pt2_dir: Path, unlabelled_calib: Path, tmp_path: Path
) -> None:
    before = _tree_digest(pt2_dir)
    calib = NpzDataset.open(unlabelled_calib)
    assert not calib.has_labels
    job = qat.QatJob(pt2_dir, calib, None, str(unlabelled_calib), time_budget_s=60.0)  # not the budget test
    recipe = _recipe(epochs=2, batch_size=32, samples=64)

    tuned = qat.finetune(job, recipe, tmp_path / "qat", "onnxruntime")

    record = tuned.details["qat"]
    assert record["objective"] == "distillation" and record["samples"] == 64
    assert record["epochs_done"] == 2 and record["steps_done"] == 4 and not record["stopped_by_budget"]
    assert [step for step, _ in record["loss_by_step"]] == [1, 2, 3, 4]
    assert all(np.isfinite(loss) for _, loss in record["loss_by_step"])
    assert tuned.model.path.is_file() and [t.name for t in tuned.model.inputs] == ["input"]
    assert "distillation" in tuned.notes[0] and "calibration inputs" in tuned.notes[0]
    assert _tree_digest(pt2_dir) == before  # the fine-tuned weights never go back into the source


def _node_values(model_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of an ONNX model on input ``x``."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    floats = {v.name for v in (*model.graph.value_info, *model.graph.output) if v.type.tensor_type.elem_type == 1}
    names = [model.graph.input[0].name, *(o for n in model.graph.node for o in n.output if o in floats)]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(None, {model.graph.input[0].name: x}), strict=True))


def _activation_scales(qdq: Path) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each per-tensor QuantizeLinear on an activation of a QDQ model, by tensor name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.input[0]: (float(init[n.input[1]]), int(init[n.input[2]]))
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init and init[n.input[1]].size == 1
    }


def test_onnxruntime_qat_trains_with_the_activation_ranges_its_qdq_model_then_uses(
    pt2_dir: Path, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's MinMax calibration takes each activation's extremes over the whole calibration set; the fake
    quantizers must train on those ranges, not on a moving average of per-batch extremes (which hardly moves for a
    wide sample met in one batch among many: here one sample at 4x the range of the others)."""
    import torch
    from torchao.quantization.pt2e import FakeQuantizeBase

    from quantgate.plugins.base import Calibration
    from quantgate.plugins.onnxruntime import RECIPES

    x = digits.x_train[:96].copy()
    x[-1] *= 4.0
    calib_path = tmp_path / "calibration.npz"
    np.savez(calib_path, input=x)
    students: list[Any] = []
    prepare = qat._prepare
    monkeypatch.setattr(
        qat, "_prepare", lambda module, scheme: students.append(prepare(module, scheme)) or students[-1]
    )
    job = qat.QatJob(pt2_dir, NpzDataset.open(calib_path), None, str(calib_path), time_budget_s=120)
    recipe = _recipe(epochs=1, batch_size=32, samples=96, learning_rate=1e-9)  # weights as calibrated

    tuned = qat.finetune(job, recipe, tmp_path / "qat", "onnxruntime")
    finish = next(r for r in RECIPES if r.name == recipe.options["finish"])
    calib = Calibration(NpzDataset.open(calib_path), 16, 96)
    qdq = OnnxRuntimeBackend().compress(tuned.model, finish, calib, tmp_path / "ort" / "build")

    (student,) = students
    quantizers = [m for m in student.modules() if isinstance(m, FakeQuantizeBase)]
    inputs: dict[int, np.ndarray] = {}

    def keep(i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:  # returning a value would replace the input
            inputs.setdefault(i, args[0].detach().numpy().copy())

        return hook

    hooks = [
        q.register_forward_pre_hook(keep(i)) for i, q in enumerate(quantizers) if q.qscheme == torch.per_tensor_affine
    ]
    for q in quantizers:
        q.disable_fake_quant()
    with torch.no_grad():
        student(torch.from_numpy(x[:4]))
    for h in hooks:
        h.remove()
    ort_scales = _activation_scales(qdq.artifact)
    values = _node_values(tmp_path / "ort" / "preprocessed.onnx", x[:4])  # the graph ONNX Runtime quantized
    compared: list[str] = []
    for i, seen in inputs.items():
        names = [
            n
            for n, v in values.items()
            if v.shape == seen.shape and np.allclose(v, seen, atol=1e-4) and n in ort_scales
        ]
        if not names:
            continue  # a tensor ONNX Runtime does not quantize, or whose name preprocessing changed
        scale, zero_point = ort_scales[names[0]]
        assert float(quantizers[i].scale) == pytest.approx(scale, rel=2e-3), names[0]
        assert abs(int(quantizers[i].zero_point) - zero_point) <= 1, names[0]
        compared.append(names[0])
    assert "input" in compared, (compared, sorted(ort_scales))


def test_the_budget_stops_qat_and_it_says_how_far_it_got(pt2_dir: Path, unlabelled_calib: Path, tmp_path: Path) -> None:
    job = qat.QatJob(pt2_dir, NpzDataset.open(unlabelled_calib), None, str(unlabelled_calib), time_budget_s=5.0)
    recipe = _recipe(epochs=10_000, batch_size=8, samples=128)

    started = time.monotonic()
    tuned = qat.finetune(job, recipe, tmp_path / "qat", "onnxruntime")
    wall = time.monotonic() - started

    record = tuned.details["qat"]
    assert record["stopped_by_budget"] and 0 < record["steps_done"] < record["steps_planned"]
    assert any("stopped by its budget (5 s)" in n and "of 160000 steps" in n for n in tuned.notes), tuned.notes
    # The whole fine-tuning, preparation and export included, stays within its budget (+10%).
    assert record["train_s"] <= 5.5, record["train_s"]
    assert wall < 60  # a bound on the whole call; train_s above is what the budget governs


def test_labelled_training_set_adds_the_task_loss(
    pt2_dir: Path, digits: Any, unlabelled_calib: Path, tmp_path: Path
) -> None:
    training = tmp_path / "training.npz"
    np.savez(training, input=digits.x_train[:64], labels=digits.y_train[:64])
    job = qat.QatJob(
        pt2_dir, NpzDataset.open(unlabelled_calib), NpzDataset.open(training), str(training), time_budget_s=120
    )
    tuned = qat.finetune(job, _recipe(epochs=1, objective="task+distillation", samples=64), tmp_path / "q", "openvino")
    assert tuned.details["qat"]["objective"] == "task+distillation"
    assert "cross-entropy" in tuned.notes[0] and "symmetric INT8" in tuned.notes[0]


def _qat_policy(calib: Path, evaluation: Path, **overrides: Any) -> dict[str, Any]:
    from tests.conftest import test_policy

    policy = test_policy(
        calib,
        evaluation,
        recipes=["int8-qat"],
        qat={k: v for k, v in FAST_QAT.items()},
        gate={"max_accuracy_drop": 0.05, "min_speedup": None},
        registry={"register_all_passing": True},
    )
    policy.update(overrides)
    return policy


@pytest.mark.usefixtures("prefect_harness")
def test_a_qat_candidate_is_gated_registered_with_lineage_and_loads_as_pyfunc(
    tracking_uri: str, digits_cnn: Any, digits: Any, unlabelled_calib: Path, eval_npz: Path
) -> None:
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from quantgate.flows.compress import compress_model
    from tests.conftest import register_pytorch

    uri = register_pytorch(digits_cnn, digits, "pt")
    doc = compress_model(uri, _qat_policy(unlabelled_calib, eval_npz), tracking_uri)

    (cand,) = doc["candidates"]
    assert cand["recipe"] == "int8-qat" and cand["passed"] and cand["promoted"], cand["reasons"]
    settings = cand["settings"]
    assert settings["epochs"] == 2 and settings["seed"] == 0 and settings["learning_rate"] == 1e-4
    assert settings["training_data_sha256"] == qat.file_sha256(unlabelled_calib)
    assert cand["all_metrics"]["qat_steps"] == 4 and cand["all_metrics"]["qat_train_s"] > 0
    assert doc["promoted_uri"] == cand["registered_uri"] == "models:/pt-onnxruntime-int8/1"

    client = MlflowClient(tracking_uri=tracking_uri)
    tags = client.get_model_version("pt-onnxruntime-int8", "1").tags
    assert tags["quantgate.recipe"] == "int8-qat" and tags["quantgate.qat"] == "true"
    assert tags["quantgate.qat_objective"] == "distillation"
    assert tags["quantgate.training_data_uri"] == str(unlabelled_calib)
    history = client.get_metric_history(cand["run_id"], "qat_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert len(client.get_metric_history(cand["run_id"], "qat_epoch_loss")) == 2

    served = mlflow.pyfunc.load_model(doc["promoted_uri"])
    scores = served.predict({"input": digits.x_test[:8]})
    top1 = np.argmax(np.asarray(next(iter(scores.values()))), axis=1)
    assert (top1 == digits.y_test[:8]).mean() >= 0.75


@pytest.mark.usefixtures("prefect_harness")
def test_qat_runs_by_itself_only_when_no_post_training_candidate_holds_the_quality_gate(
    tracking_uri: str, digits_cnn: Any, digits: Any, unlabelled_calib: Path, eval_npz: Path
) -> None:
    from quantgate.flows.compress import compress_model
    from tests.conftest import register_pytorch

    uri = register_pytorch(digits_cnn, digits, "pt")
    # Fidelity no INT8 model reaches: the post-training candidate fails on quality, so QAT is tried after it.
    strict = _qat_policy(
        unlabelled_calib, eval_npz, recipes=["int8-static-qdq-minmax"],
        gate={"max_accuracy_drop": None, "min_fidelity": 0.9999999, "min_speedup": None},
    )  # fmt: skip
    doc = compress_model(uri, strict, tracking_uri)
    assert [c["recipe"] for c in doc["candidates"]] == ["int8-static-qdq-minmax", "int8-qat"]
    assert not any(c["passed"] for c in doc["candidates"])

    relaxed = _qat_policy(unlabelled_calib, eval_npz, recipes=["int8-static-qdq-minmax"])
    doc = compress_model(uri, relaxed, tracking_uri)
    assert [c["recipe"] for c in doc["candidates"]] == ["int8-static-qdq-minmax"]  # it passed: no QAT


def test_a_policy_naming_qat_for_an_onnx_model_is_refused_in_one_line(
    tracking_uri: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    from tests.conftest import model_versions, register_onnx
    from tests.test_cli import assert_clean_failure, run_cli, write_policy

    register_onnx(tracking_uri, digits_onnx, "digits")
    policy = write_policy(tmp_path / "p.yaml", _qat_policy(calib_npz, eval_npz))
    proc = run_cli(["compress", "models:/digits/1", "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
    assert_clean_failure(proc, "is a 'onnx' flavor model; QAT needs a 'pytorch' flavor model")
    assert "int8-qat" in proc.stderr
    assert [name for name, _, _ in model_versions(tracking_uri)] == ["digits"]
