import os
import platform
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
from quantgate.plugins.openvino import OpenVinoBackend, OvRunner, cpu_plugin_capabilities
from quantgate.validators.accuracy import top1
from quantgate.validators.fidelity import cosine_per_row

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CNN_RECIPES = ("fp16-ir", "int8-ptq-performance", "int8-ptq-mixed", "int8-weights", "int8-accuracy-control")
INT8_RECIPES = CNN_RECIPES[1:]
ALL_RECIPES = (
    *CNN_RECIPES,
    *(name for p in ("bf16", "f16") for name in (p, *(f"{r}-{p}" for r in INT8_RECIPES))),
    "int8-mixed",
    "int8-mixed-bf16",
)


def _needs(capability: str) -> Any:
    """Skip, saying why, on a host whose OpenVINO CPU plugin does not offer BF16/FP16 compute."""
    offered = sorted(cpu_plugin_capabilities())
    reason = f"OpenVINO's CPU plugin offers no {capability} compute on this host (it offers {', '.join(offered)})"
    return pytest.mark.skipif(capability not in offered, reason=reason)


def _runtime_precisions(runner: Any, layer_type: str) -> set[str]:
    """The precisions the compiled graph really runs ``layer_type`` layers in, as OpenVINO's runtime model says."""
    ops = runner.compiled.get_runtime_model().get_ordered_ops()
    info = [op.get_rt_info() for op in ops]
    return {i["runtimePrecision"].astype(str) for i in info if i["layerType"].astype(str) == layer_type}


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
    assert tuple(r.name for r in cnn) == ALL_RECIPES
    assert len({r.digest for r in cnn}) == len(cnn)
    transformer = OpenVinoBackend().recipes(ModelInfo(fp32.info.path, (), (), 17, is_transformer=True))
    assert tuple(r.name for r in transformer) == ALL_RECIPES
    changed = {r.name for r, t in zip(cnn, transformer, strict=True) if r.digest != t.digest}
    tuned = ("int8-ptq-performance", "int8-ptq-mixed", "int8-accuracy-control")
    assert changed == {f"{r}{suffix}" for r in tuned for suffix in ("", "-bf16", "-f16")} | {
        "int8-mixed",
        "int8-mixed-bf16",
    }


def test_inference_precision_is_a_recipe_setting_and_the_baseline_stays_fp32(fp32: Fp32) -> None:
    recipes = {r.name: r for r in OpenVinoBackend().recipes(fp32.info)}
    for name in CNN_RECIPES:
        assert recipes[name].options["inference_precision"] == "f32"
    for p in ("bf16", "f16"):
        assert recipes[p].options == {"kind": "float", "inference_precision": p} and recipes[p].precision == p
        for name in INT8_RECIPES:
            variant = recipes[f"{name}-{p}"]
            assert variant.options == {**recipes[name].options, "inference_precision": p}
            assert variant.precision == f"int8-{p}"  # its own registered model: it needs a CPU with that compute
    assert fp32.candidate.recipe.options == {"inference_precision": "f32"}
    assert OpenVinoBackend().runner(fp32.candidate, threads=1).inference_precision == "f32"
    assert "OpenVINO inference precision in effect: f32 (the float layers compute in FP32)" in fp32.candidate.notes


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


# -- inference precision: BF16/FP16 compute as a recipe setting ------------------------------------------------


def _recipe(backend: OpenVinoBackend, info: ModelInfo, name: str) -> Any:
    return next(r for r in backend.recipes(info) if r.name == name)


@pytest.mark.parametrize(
    ("precision", "capability"),
    [pytest.param("bf16", "BF16", marks=_needs("BF16")), pytest.param("f16", "FP16", marks=_needs("FP16"))],
)
def test_a_reduced_precision_candidate_is_the_fp32_ir_computed_in_that_precision(
    precision: str, capability: str, fp32: Fp32, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    backend = OpenVinoBackend()
    recipe = _recipe(backend, fp32.info, precision)
    cand = backend.compress(fp32.info, recipe, Calibration(NpzDataset.open(calib_npz)), tmp_path)
    assert abs(cand.size_bytes - fp32.candidate.size_bytes) < 4096  # the same FP32 weights: only the compute differs
    expected_note = f"OpenVINO inference precision in effect: {precision} (the float layers compute in {capability})"
    assert cand.notes == (expected_note,)
    runner = backend.runner(cand, threads=1)
    assert isinstance(runner, OvRunner) and runner.inference_precision == precision
    baseline = backend.runner(fp32.candidate, threads=1)
    for layer in ("Convolution", "FullyConnected"):
        assert _runtime_precisions(runner, layer) == {precision}
        assert _runtime_precisions(baseline, layer) == {"f32"}
    out = _outputs(backend, cand, NpzDataset.open(eval_npz), 32)
    assert not np.array_equal(out, fp32.outputs)  # rounded inside the layers...
    assert float(np.mean(cosine_per_row(fp32.outputs, out))) > 0.999  # ...and still the same model
    assert top1(out, fp32.labels) >= top1(fp32.outputs, fp32.labels) - 0.01


@_needs("BF16")
def test_int8_with_bf16_float_parts_keeps_int8_layers_and_compiles_in_bf16(
    fp32: Fp32, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    backend = OpenVinoBackend()
    recipe = _recipe(backend, fp32.info, "int8-ptq-performance-bf16")
    cand = backend.compress(fp32.info, recipe, Calibration(NpzDataset.open(calib_npz), 16, 64), tmp_path)
    assert "OpenVINO inference precision in effect: bf16 (the layers left in float compute in BF16)" in cand.notes
    assert cand.size_bytes < 0.3 * fp32.candidate.size_bytes
    runner = backend.runner(cand, threads=1)
    assert isinstance(runner, OvRunner) and runner.inference_precision == "bf16"
    assert _runtime_precisions(runner, "Convolution") <= {"u8", "i8"}  # on this CNN every conv is INT8
    out = _outputs(backend, cand, NpzDataset.open(eval_npz), 32)
    assert float(np.mean(cosine_per_row(fp32.outputs, out))) > 0.99
    assert top1(out, fp32.labels) >= top1(fp32.outputs, fp32.labels) - 0.01


@_needs("BF16")
def test_the_bf16_variant_of_an_int8_recipe_reuses_the_ir_built_for_fp32_float_parts(
    fp32: Fp32, calib_npz: Path, tmp_path: Path
) -> None:
    backend = OpenVinoBackend()
    calib = Calibration(NpzDataset.open(calib_npz), 16, 64)
    first = backend.compress(fp32.info, _recipe(backend, fp32.info, "int8-ptq-performance"), calib, tmp_path / "a")
    second = backend.compress(
        fp32.info, _recipe(backend, fp32.info, "int8-ptq-performance-bf16"), calib, tmp_path / "b"
    )
    assert any(n.startswith("the same IR as int8-ptq-performance of this run") for n in second.notes), second.notes
    assert first.artifact.with_suffix(".bin").read_bytes() == second.artifact.with_suffix(".bin").read_bytes()
    assert backend.runner(second, threads=1).inference_precision == "bf16"  # type: ignore[attr-defined]
    other = Calibration(NpzDataset.open(calib_npz), 16, 32)  # other data: built anew
    third = backend.compress(fp32.info, _recipe(backend, fp32.info, "int8-ptq-performance-bf16"), other, tmp_path / "c")
    assert not any(n.startswith("the same IR as") for n in third.notes)


@_needs("BF16")
def test_accuracy_control_bf16_validates_inside_nncf_at_the_precision_that_will_run(
    fp32: Fp32, calib_npz: Path, eval_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nncf compiles every model it validates with FP32 pinned; the recipe recompiles each one in BF16 before
    scoring it. A spy around that step (our code, not nncf's) records the precision each scored model ran in."""
    import quantgate.plugins.openvino as plugin

    seen: list[str] = []
    recompile = plugin._AtPrecision.__call__

    def spy(self: Any, compiled: Any) -> Any:
        ours = recompile(self, compiled)
        seen.append(ours.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        return ours

    monkeypatch.setattr(plugin._AtPrecision, "__call__", spy)
    backend = OpenVinoBackend()
    backend.configure_accuracy_control(NpzDataset.open(eval_npz), "accuracy", 0.01, time_budget_s=60.0, limit=128)
    recipe = _recipe(backend, fp32.info, "int8-accuracy-control-bf16")
    cand = backend.compress(fp32.info, recipe, Calibration(NpzDataset.open(calib_npz), 16, 64), tmp_path)
    assert seen and set(seen) == {"bf16"}
    assert any(n.startswith("the float model computed in BF16 scores ") for n in cand.notes)
    assert any("computed in BF16 vs FP32" in n and "within max_drop 0.01" in n for n in cand.notes)
    runner = backend.runner(cand, threads=1)
    assert isinstance(runner, OvRunner) and runner.inference_precision == "bf16"


def test_reduced_precision_recipes_are_refused_in_one_line_where_openvino_does_not_offer_them(
    fp32: Fp32, calib_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU cannot be changed, so our own detection functions (OpenVINO's capability list, the CPU flags) are
    made to see a CPU with neither BF16 nor FP16."""
    import quantgate.plugins.openvino as plugin
    from quantgate.hardware import Hardware

    monkeypatch.setattr(plugin, "cpu_plugin_capabilities", lambda: frozenset({"FP32", "INT8", "EXPORT_IMPORT"}))
    old_xeon = Hardware("Intel(R) Xeon(R) Platinum 8375C", "x86_64", 8, ("avx2", "fma", "avx512f", "avx512_vnni"))
    monkeypatch.setattr(plugin, "detect", lambda: old_xeon)
    backend = OpenVinoBackend()
    calib = Calibration(NpzDataset.open(calib_npz), 16, 64)
    bf16 = "which needs a CPU with AVX512_BF16 or AMX-BF16; OpenVINO's CPU plugin does not offer BF16 on this host"
    fp16 = "which needs a CPU with AVX512-FP16, AMX-FP16 or ARM FP16 arithmetic; OpenVINO's CPU plugin does not offer"
    expected = {
        "int8-ptq-mixed-bf16": f"int8-ptq-mixed-bf16 computes in BF16, {bf16} (this CPU has neither)",
        "f16": f"f16 computes in FP16, {fp16} FP16 on this host (this CPU has none of them)",
    }
    for name, message in expected.items():
        with pytest.raises(BackendError) as caught:
            backend.compress(fp32.info, _recipe(backend, fp32.info, name), calib, tmp_path / name)
        assert str(caught.value) == message
        assert not (tmp_path / name / f"{name}.xml").exists()
    cand = backend.compress(fp32.info, _recipe(backend, fp32.info, "int8-ptq-mixed"), calib, tmp_path / "f32")
    assert "OpenVINO inference precision in effect: f32 (the layers left in float compute in FP32)" in cand.notes


@pytest.mark.skipif(platform.machine() != "x86_64", reason="caps the x86 ISA oneDNN may use")
def test_a_precision_openvino_silently_replaces_is_a_backend_error_not_a_wrong_measurement(fp32: Fp32) -> None:
    """Asked for FP16 on a CPU without it, OpenVINO computes in BF16 (or FP32) without a word. A CPU without FP16 is
    made for real in a fresh process by capping oneDNN's ISA below AVX512-FP16 (``ONEDNN_MAX_CPU_ISA``)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from quantgate.errors import BackendError\n"
        "from quantgate.plugins.openvino import OvRunner, cpu_plugin_capabilities\n"
        "if 'FP16' in cpu_plugin_capabilities(): sys.exit(3)\n"
        "try:\n"
        f"    OvRunner(Path({str(fp32.candidate.artifact)!r}), 1, 'f16')\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(4)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("this OpenVINO ignores ONEDNN_MAX_CPU_ISA when listing FP16")
    assert done.returncode == 0, done.stdout + done.stderr
    # What it falls back to is the CPU's next best: BF16 where it has it (AVX512-BF16, AMX), else FP32 (AVX2).
    fallback = "bf16" if "BF16" in cpu_plugin_capabilities() else "f32"
    assert done.stdout.strip() == f"openvino compiled fp32-ir.xml with inference precision {fallback}, not f16"


@dataclass(frozen=True)
class Bert:
    info: ModelInfo
    calib: Path


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Bert:
    folder = tmp_path_factory.mktemp("bert")
    export_bert_encoder(folder / "bert.onnx", pooled=True)
    rng = np.random.default_rng(0)
    data = folder / "calib.npz"
    np.savez(data, input_ids=rng.integers(0, 100, (48, 8)), attention_mask=np.ones((48, 8), dtype=np.int64))
    return Bert(read_model_info(folder / "bert.onnx"), data)


def test_transformer_gets_transformer_settings_and_weights_only_int8(bert: Bert, tmp_path: Path) -> None:
    info, data = bert.info, bert.calib
    assert info.is_transformer
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


@_needs("BF16")
def test_int8_bf16_runs_the_layers_left_in_float_in_bf16_on_a_transformer(bert: Bert, tmp_path: Path) -> None:
    """On the CNN every layer is INT8; a transformer keeps Softmax in float, which shows where the precision goes."""
    backend = OpenVinoBackend()
    recipes = {r.name: r for r in backend.recipes(bert.info)}
    calib = Calibration(NpzDataset.open(bert.calib), 8, 16)
    x = NpzDataset.open(bert.calib).take(16).inputs
    outputs = []
    for name, float_parts in (("int8-ptq-mixed", "f32"), ("int8-ptq-mixed-bf16", "bf16")):
        runner = backend.runner(backend.compress(bert.info, recipes[name], calib, tmp_path / name), threads=1)
        assert isinstance(runner, OvRunner) and runner.inference_precision == float_parts
        assert _runtime_precisions(runner, "Softmax") == {float_parts}
        assert _runtime_precisions(runner, "MatMul") <= {"u8", "i8"}
        outputs.append(runner.run(x))
    for ours, theirs in zip(*outputs, strict=True):  # the same INT8 model, its float parts rounded to BF16
        assert float(np.mean(cosine_per_row(ours.reshape(16, -1), theirs.reshape(16, -1)))) > 0.99


def test_a_static_shape_runner_compiles_once_per_input_shape_and_matches_the_dynamic_one(
    fp32: Fp32, eval_data: Any
) -> None:
    backend = OpenVinoBackend()
    variant = backend.specialize(fp32.candidate)
    assert variant is not None and variant.files == fp32.candidate.files
    assert any(n.startswith("static shapes: the IR is reshaped") for n in variant.notes)
    assert variant.recipe.digest != fp32.candidate.recipe.digest
    static, dynamic = backend.runner(variant, threads=1), backend.runner(fp32.candidate, threads=1)
    assert isinstance(static, OvRunner) and static.static_shapes
    for n in (4, 1, 4):
        x = {"input": np.ascontiguousarray(eval_data["input"][:n])}
        np.testing.assert_allclose(static.run(x)[0], dynamic.run(x)[0], rtol=1e-4, atol=1e-5)
        assert static.compiled.inputs[0].get_partial_shape()[0].get_length() == n
    assert len(static._shapes) == 2


def test_a_runner_hands_out_outputs_that_the_next_call_does_not_overwrite(fp32: Fp32, eval_data: Any) -> None:
    backend = OpenVinoBackend()
    variant = backend.specialize(fp32.candidate)
    assert variant is not None
    static, dynamic = backend.runner(variant, threads=1), backend.runner(fp32.candidate, threads=1)
    assert isinstance(static, OvRunner) and isinstance(dynamic, OvRunner)
    a = {"input": np.ascontiguousarray(eval_data["input"][:4])}
    b = {"input": np.ascontiguousarray(eval_data["input"][4:8])}
    first = static.run(a)
    assert static._outs is not None  # every output static: bound to preallocated arrays
    assert dynamic._outs is None  # a dynamic batch: OpenVINO sizes the outputs per call
    second = static.run(b)
    # What a call returned is not overwritten by the next call into the same output buffers.
    np.testing.assert_allclose(first[0], dynamic.run(a)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second[0], dynamic.run(b)[0], rtol=1e-4, atol=1e-5)
    assert not np.shares_memory(first[0], static._outs[0]) and not np.allclose(first[0], second[0])
    kept = dynamic.run(a)
    dynamic.run(b)
    np.testing.assert_allclose(kept[0], first[0], rtol=1e-4, atol=1e-5)
    # Another shape binds the other compiled model's own outputs.
    one = {"input": np.ascontiguousarray(eval_data["input"][:1])}
    np.testing.assert_allclose(static.run(one)[0], dynamic.run(one)[0], rtol=1e-4, atol=1e-5)
    assert static._outs is not None and static._outs[0].shape[0] == 1


def test_a_runner_called_again_with_the_same_arrays_reads_their_new_contents_at_their_shape(
    fp32: Fp32, eval_data: Any
) -> None:
    backend = OpenVinoBackend()
    variant = backend.specialize(fp32.candidate)
    assert variant is not None
    static, dynamic = backend.runner(variant, threads=1), backend.runner(fp32.candidate, threads=1)
    assert isinstance(static, OvRunner)
    source = np.ascontiguousarray(eval_data["input"][:8])
    x = {"input": source[:4].copy()}
    first = static.run(x)[0]
    # The same array with new contents (a caller reusing its buffer): the call reads what is in it now.
    x["input"][:] = source[4:8]
    np.testing.assert_allclose(static.run(x)[0], dynamic.run({"input": source[4:8].copy()})[0], rtol=1e-4, atol=1e-5)
    # bare() at another shape switches the compiled model; run() with the first arrays switches back.
    static.bare({"input": np.ascontiguousarray(source[:1])})
    x["input"][:] = source[:4]
    np.testing.assert_allclose(static.run(x)[0], first, rtol=1e-4, atol=1e-5)
