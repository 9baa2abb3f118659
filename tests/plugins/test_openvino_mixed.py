"""``int8-mixed`` / ``int8-mixed-bf16``: NNCF INT8 with the fewest most sensitive layers kept float (ignored_scope)."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate.data import NpzDataset
from quantgate.errors import BackendError
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import Calibration, Candidate, Recipe
from quantgate.plugins.openvino import OpenVinoBackend, OvRunner, cpu_plugin_capabilities
from quantgate.validators.fidelity import cosine_per_row
from tests.test_sensitivity import FRAGILE, fragile_data, fragile_mlp

pytest.importorskip("openvino")
pytest.importorskip("nncf")

MIXED = "int8-mixed"
MIXED_BF16 = "int8-mixed-bf16"
_COMPUTE_LAYERS = ("Convolution", "FullyConnected")

needs_bf16 = pytest.mark.skipif(
    "BF16" not in cpu_plugin_capabilities(), reason="OpenVINO's CPU plugin offers no BF16 compute on this host"
)


def _recipe(backend: OpenVinoBackend, info: ModelInfo, name: str) -> Recipe:
    return next(r for r in backend.recipes(info) if r.name == name)


def _outputs(backend: OpenVinoBackend, cand: Candidate, data: NpzDataset, limit: int) -> np.ndarray:
    runner = backend.runner(cand, threads=1)
    return np.concatenate([runner.run(b.inputs)[0] for b in data.batches(32, limit=limit)])


def _fidelity(reference: np.ndarray, out: np.ndarray) -> float:
    return float(np.mean(cosine_per_row(reference.reshape(len(out), -1), out.reshape(len(out), -1))))


def _runtime_layers(runner: OvRunner) -> list[tuple[str, str]]:
    """(runtime precision, original op names) of every convolution and fully connected layer OpenVINO runs."""
    out = []
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in _COMPUTE_LAYERS:
            out.append((info["runtimePrecision"].astype(str), info["originalLayersNames"].astype(str)))
    return out


def _note(cand: Candidate, prefix: str) -> str:
    return next(n for n in cand.notes if n.startswith(prefix))


def _kept(cand: Candidate) -> tuple[int, int, str]:
    """(k, ranked layers, the note) from the candidate's 'mixed precision: k of n ...' note."""
    note = _note(cand, "mixed precision:")
    match = re.match(r"mixed precision: (\d+) of (\d+) ranked layers kept in float", note)
    assert match, note
    return int(match[1]), int(match[2]), note


# -- recipes ------------------------------------------------------------------------------------------------------


def test_mixed_recipes_are_listed_last_with_the_settings_of_int8_ptq_performance(digits_onnx: Path) -> None:
    info = read_model_info(digits_onnx)
    recipes = OpenVinoBackend().recipes(info)
    assert [r.name for r in recipes[-2:]] == [MIXED, MIXED_BF16]
    by_name = {r.name: r for r in recipes}
    full = by_name["int8-ptq-performance"].options
    for name, precision, label in ((MIXED, "f32", "int8"), (MIXED_BF16, "bf16", "int8-bf16")):
        recipe = by_name[name]
        assert recipe.precision == label
        assert recipe.options == {**full, "kind": "mixed", "inference_precision": precision, "ranking_samples": 16}
    transformer = OpenVinoBackend().recipes(ModelInfo(digits_onnx, (), (), 17, is_transformer=True))
    assert transformer[-1].options["model_type"] == "transformer" and transformer[-1].digest != recipes[-1].digest


def test_mixed_recipe_needs_accuracy_control(digits_onnx: Path, calib_npz: Path, tmp_path: Path) -> None:
    info = read_model_info(digits_onnx)
    backend = OpenVinoBackend()
    with pytest.raises(BackendError, match=r"^int8-mixed needs validation data; .*configure_accuracy_control\(\)"):
        backend.compress(info, _recipe(backend, info, MIXED), Calibration(NpzDataset.open(calib_npz)), tmp_path)


def test_mixed_bf16_is_refused_in_one_line_where_openvino_offers_no_bf16(
    digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal as every -bf16 recipe (tests/plugins/test_openvino.py), before anything is built."""
    import quantgate.plugins.openvino as plugin
    from quantgate.hardware import Hardware

    monkeypatch.setattr(plugin, "cpu_plugin_capabilities", lambda: frozenset({"FP32", "INT8", "EXPORT_IMPORT"}))
    old_xeon = Hardware("Intel(R) Xeon(R) Platinum 8375C", "x86_64", 8, ("avx2", "fma", "avx512f", "avx512_vnni"))
    monkeypatch.setattr(plugin, "detect", lambda: old_xeon)
    info = read_model_info(digits_onnx)
    backend = OpenVinoBackend()
    backend.configure_accuracy_control(NpzDataset.open(eval_npz), "fidelity", 0.01, 60.0)
    with pytest.raises(BackendError) as caught:
        backend.compress(info, _recipe(backend, info, MIXED_BF16), Calibration(NpzDataset.open(calib_npz)), tmp_path)
    assert str(caught.value) == (
        "int8-mixed-bf16 computes in BF16, which needs a CPU with AVX512_BF16 or AMX-BF16; OpenVINO's CPU plugin "
        "does not offer BF16 on this host (this CPU has neither)"
    )
    assert list(tmp_path.iterdir()) == []


# -- ONNX node names -> OpenVINO op names -------------------------------------------------------------------------


def _matmul_zero_bias(path: Path) -> Path:
    """x -> MatMul "mm1" -> Add "bias" (zeros: OpenVINO removes it) -> Relu -> MatMul "mm2" -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "zero_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_nodes_map_to_the_openvino_ops_convert_model_made_of_them(digits_onnx: Path, tmp_path: Path) -> None:
    import openvino as ov

    from quantgate.plugins._ov_mixed import OvNames
    from quantgate.sensitivity import LayerSensitivity

    digits = OvNames(ov.convert_model(str(digits_onnx)), digits_onnx)
    # Conv = Convolution "<node>/WithoutBiases" + bias Add "<node>"; the last Gemm's Add is renamed after the output.
    assert digits.ops("/0/Conv", compute=True) == ["/0/Conv/WithoutBiases", "/0/Conv"]
    assert digits.ops("/11/Gemm", compute=True) == ["/11/Gemm/WithoutBiases", "output"]
    assert digits.ops("/10/Relu", compute=False) == ["/10/Relu"]

    fragile = fragile_mlp(tmp_path / "fragile.onnx")
    names = OvNames(ov.convert_model(str(fragile)), fragile)
    assert names.ops("gemm1", compute=True) == ["gemm1/WithoutBiases"]  # no bias, still "/WithoutBiases"
    assert names.ops("gemm3", compute=True) == ["y"]  # the MatMul producing the graph output: named after it
    layer = LayerSensitivity(FRAGILE, "Gemm", 0.9, (FRAGILE, "outlier", "relu2"))
    assert names.ignored([layer]) == ["gemm2/WithoutBiases", "outlier", "relu2"]

    # A removed op's tensor name moves to the op before it: a neighbour must not bring that layer along.
    zero_bias = _matmul_zero_bias(tmp_path / "zero_bias.onnx")
    names = OvNames(ov.convert_model(str(zero_bias)), zero_bias)
    assert names.ops("bias", compute=True) == [] and names.ops("bias", compute=False) == []
    layer = LayerSensitivity("mm2", "MatMul", 0.1, ("mm2", "relu", "bias"))
    assert names.ignored([layer]) == ["y", "relu"]


# -- on the digits CNN ----------------------------------------------------------------------------------------------

VALIDATION_SAMPLES = 128


@dataclass(frozen=True)
class Digits:
    info: ModelInfo
    calib: Calibration
    validation: NpzDataset
    reference: np.ndarray  # the FP32 IR's outputs on the validation samples


@pytest.fixture(scope="module")
def cnn(digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Digits:
    backend = OpenVinoBackend()
    info = read_model_info(digits_onnx)
    validation = NpzDataset.open(eval_npz)
    fp32 = backend.baseline(info, tmp_path_factory.mktemp("ov-mixed-baseline"))
    calib = Calibration(NpzDataset.open(calib_npz), 16, 64)
    return Digits(info, calib, validation, _outputs(backend, fp32, validation, VALIDATION_SAMPLES))


def _compress(cnn: Digits, name: str, max_drop: float, workdir: Path, budget: float = 60.0) -> Candidate:
    backend = OpenVinoBackend()
    backend.configure_accuracy_control(cnn.validation, "fidelity", max_drop, budget, limit=VALIDATION_SAMPLES)
    return backend.compress(cnn.info, _recipe(backend, cnn.info, name), cnn.calib, workdir)


@pytest.fixture(scope="module")
def full_int8(cnn: Digits, tmp_path_factory: pytest.TempPathFactory) -> tuple[Candidate, float]:
    """int8-mixed under a threshold full INT8 meets, and its fidelity."""
    cand = _compress(cnn, MIXED, 0.5, tmp_path_factory.mktemp("ov-mixed-k0") / "openvino" / MIXED)
    return cand, _fidelity(cnn.reference, _outputs(OpenVinoBackend(), cand, cnn.validation, VALIDATION_SAMPLES))


def test_full_int8_that_meets_the_threshold_is_the_candidate_and_nothing_is_ranked(
    full_int8: tuple[Candidate, float],
) -> None:
    cand, fidelity = full_int8
    assert fidelity >= 0.5
    note = _note(cand, "mixed precision:")
    assert note.startswith("mixed precision: full INT8 (k=0) scores ") and "no layer ranked" in note, cand.notes
    assert not list(cand.artifact.parent.parent.glob("sensitivity-*.json"))
    runner = OvRunner(cand.artifact, 1, "f32")
    assert {precision for precision, _ in _runtime_layers(runner)} <= {"u8", "i8"}  # every layer INT8


@dataclass(frozen=True)
class Mixed:
    f32: Candidate
    max_drop: float
    workdir: Path  # what the pipeline gives a backend's recipes: <run>/openvino/<recipe>
    ranked: list[int]


@pytest.fixture(scope="module")
def mixed(cnn: Digits, full_int8: tuple[Candidate, float], tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    """int8-mixed under a threshold halfway between full INT8's fidelity and 1: the ranking and the search run."""
    import quantgate.plugins._ov_mixed as mod

    max_drop = (1.0 - full_int8[1]) / 2
    root = tmp_path_factory.mktemp("ov-mixed") / "openvino"
    ranked: list[int] = []
    real = mod.rank_layers

    def counting(*args: Any, **kwargs: Any) -> Any:
        ranked.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mod, "rank_layers", counting)
        cand = _compress(cnn, MIXED, max_drop, root / MIXED)
    return Mixed(cand, max_drop, root, ranked)


def test_mixed_meets_a_threshold_full_int8_misses_and_names_its_float_layers(cnn: Digits, mixed: Mixed) -> None:
    cand = mixed.f32
    out = _outputs(OpenVinoBackend(), cand, cnn.validation, VALIDATION_SAMPLES)
    assert _fidelity(cnn.reference, out) >= 1.0 - mixed.max_drop
    k, ranked, note = _kept(cand)
    assert 1 <= k <= ranked == 5 and mixed.ranked == [1]  # 3 Conv + 2 Gemm, ranked once
    float_layers = [name for name in ("/0/Conv", "/2/Conv", "/5/Conv", "/9/Gemm", "/11/Gemm") if f"{name} (" in note]
    assert len(float_layers) == k, note
    assert "OpenVINO ops in NNCF's ignored_scope: " in note
    assert any(
        n.startswith("k search on fidelity") and "k=0: " in n and f"smallest passing k = {k}" in n for n in cand.notes
    )
    assert any(re.fullmatch(r"[\d.]+ s of a 60 s budget", n) for n in cand.notes), cand.notes
    # The float layers run in FP32, every other one in INT8.
    layers = _runtime_layers(OvRunner(cand.artifact, 1, "f32"))
    in_float = [names for precision, names in layers if precision == "f32"]
    ignored = set(note.split("OpenVINO ops in NNCF's ignored_scope: ")[1].split("; ")[0].split(", "))
    assert len(in_float) == k and all(ignored & set(names.split(",")) for names in in_float), (in_float, note)
    assert {precision for precision, _ in layers if precision != "f32"} <= {"u8", "i8"}
    assert sorted(p.name for p in (mixed.workdir / MIXED).iterdir()) == [f"{MIXED}.bin", f"{MIXED}.xml"]


@needs_bf16
def test_mixed_bf16_reuses_the_ranking_and_runs_its_float_layers_in_bf16(cnn: Digits, mixed: Mixed) -> None:
    import quantgate.plugins._ov_mixed as mod

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mod, "rank_layers", lambda *a, **k: pytest.fail("ranked again"))
        cand = _compress(cnn, MIXED_BF16, mixed.max_drop, mixed.workdir / MIXED_BF16)
    assert len(list(mixed.workdir.glob("sensitivity-*.json"))) == 1
    assert any("ranking of 5 layers reused from sensitivity-" in n for n in cand.notes), cand.notes
    assert any(n.startswith("the float model computed in BF16 scores ") for n in cand.notes), cand.notes
    assert any(n.startswith("k search on fidelity") and ", computed in BF16" in n for n in cand.notes), cand.notes
    assert "OpenVINO inference precision in effect: bf16 (the layers left in float compute in BF16)" in cand.notes
    runner = OpenVinoBackend().runner(cand, threads=1)
    assert isinstance(runner, OvRunner) and runner.inference_precision == "bf16"
    k, _, _ = _kept(cand)
    assert sorted(p for p, _ in _runtime_layers(runner) if p not in ("u8", "i8")) == ["bf16"] * k
    # Scored in BF16 against FP32, as the gate scores it.
    out = _outputs(OpenVinoBackend(), cand, cnn.validation, VALIDATION_SAMPLES)
    assert _fidelity(cnn.reference, out) >= 1.0 - mixed.max_drop


def test_mixed_stops_at_its_time_budget_before_any_variant(cnn: Digits, tmp_path: Path) -> None:
    with pytest.raises(BackendError) as caught:
        _compress(cnn, MIXED, 0.0, tmp_path / "openvino" / MIXED, budget=1e-6)
    message = str(caught.value)
    assert message.startswith("int8-mixed failed: time budget of 1e-06 s exhausted after "), message
    assert "while quantizing fully (no variant scored); raise accuracy_control.time_budget_s" in message


# -- a model with one fragile layer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, NpzDataset]:
    root = tmp_path_factory.mktemp("ov-fragile")
    return read_model_info(fragile_mlp(root / "fragile.onnx")), NpzDataset.open(fragile_data(root / "calib.npz"))


def test_mixed_keeps_the_fragile_layer_float(fragile: tuple[ModelInfo, NpzDataset], tmp_path: Path) -> None:
    info, data = fragile
    backend = OpenVinoBackend()
    # Two points of allowance: without VNNI (AVX2) OpenVINO's INT8 costs the other two layers 0.8 of a point
    # (fidelity 0.992 against 0.996 with VNNI), too close to a one-point gate's margin to name one k on every host.
    backend.configure_accuracy_control(data, "fidelity", 0.02, 60.0, caveat="tuned on the calibration set")
    cand = backend.compress(info, _recipe(backend, info, MIXED), Calibration(data, 16, None), tmp_path / "w")
    k, ranked, note = _kept(cand)
    assert (k, ranked) == (1, 3) and f"{FRAGILE} (" in note and "gemm2/WithoutBiases" in note, cand.notes
    assert "tuned on the calibration set" in cand.notes
    layers = _runtime_layers(OvRunner(cand.artifact, 1, "f32"))
    assert [names.split(",")[0] for precision, names in layers if precision == "f32"] == ["gemm2/WithoutBiases"]
    base = backend.runner(backend.baseline(info, tmp_path / "base"), threads=1).run(data.take(64).inputs)[0]
    assert _fidelity(base, backend.runner(cand, threads=1).run(data.take(64).inputs)[0]) >= 0.98


def test_a_budget_spent_mid_search_keeps_the_best_passing_variant(
    fragile: tuple[ModelInfo, NpzDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget runs out right after the first passing variant: it is kept. The galloping search found it at k=1
    right after full INT8 (k=0) failed, so it is the smallest k and the search is complete, not cut short (the
    cut-short case is tests/test_sensitivity.py's)."""
    import quantgate.plugins._ov_mixed as mod

    build = mod._Variants.build_and_score

    def then_out_of_time(self: Any, layers: tuple[str, ...]) -> float:
        score = build(self, layers)
        if layers and score >= self.scorer.threshold:
            self.deadline.budget_s = 0.0
        return float(score)

    monkeypatch.setattr(mod._Variants, "build_and_score", then_out_of_time)
    info, data = fragile
    backend = OpenVinoBackend()
    backend.configure_accuracy_control(data, "fidelity", 0.02, 60.0)
    cand = backend.compress(info, _recipe(backend, info, MIXED), Calibration(data, 16, None), tmp_path / "w")
    k, ranked, note = _kept(cand)
    assert (k, ranked) == (1, 3) and f"{FRAGILE} (" in note, cand.notes
    assert any("k=0: " in n and "smallest passing k = 1" in n for n in cand.notes), cand.notes
    assert not any(n.startswith("search stopped early") for n in cand.notes), cand.notes


# -- a layer only OpenVINO has --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, NpzDataset]:
    """x[n, 8, 16] -> LSTM(32) -> Linear(10): ONNX Runtime's QDQ quantizer leaves the LSTM float, so the ONNX ranking
    never sees it; NNCF quantizes the LSTMSequence OpenVINO makes of it (full INT8 fidelity about 0.9)."""
    import torch

    from tests.conftest import export_onnx

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(16, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            return self.fc(self.lstm(x)[0])

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ov-lstm")
    path = export_onnx(Net().eval(), (1, 8, 16), root / "lstm.onnx")
    np.savez(root / "data.npz", input=np.random.default_rng(0).standard_normal((64, 8, 16)).astype(np.float32))
    return read_model_info(path), NpzDataset.open(root / "data.npz")


def test_a_layer_the_onnx_ranking_cannot_see_is_measured_on_openvino_and_kept_float(
    lstm: tuple[ModelInfo, NpzDataset], tmp_path: Path
) -> None:
    import openvino as ov

    from quantgate.plugins._ov_mixed import OvNames

    info, data = lstm
    first, second = (OvNames(ov.convert_model(str(info.path)), info.path) for _ in range(2))
    alias = next(a for a in (first.alias(op) for op in first.compute) if a.startswith("LSTMSequence#"))
    # The frontend numbers the ops it builds process-wide ("LSTMSequence_64", then "LSTMSequence_140"): the alias
    # names the same op on every conversion, so a ranking cached by one recipe serves the next.
    assert all(names.ops(alias, compute=True)[0].startswith("LSTMSequence_") for names in (first, second))

    backend = OpenVinoBackend()
    backend.configure_accuracy_control(data, "fidelity", 0.01, 60.0)
    # Batches of 1: nncf 3.4 fails on LSTMSequence with batch-wise statistics ("list assignment index out of range").
    cand = backend.compress(info, _recipe(backend, info, MIXED), Calibration(data, 1, 32), tmp_path / "w")
    k, ranked, note = _kept(cand)
    assert (k, ranked) == (1, 2) and f"{alias} (" in note and "ignored_scope: LSTMSequence_" in note, cand.notes
    assert any(f"1 OpenVINO compute ops that ranking cannot see ({alias}: LSTMSequence_" in n for n in cand.notes)
    base = backend.runner(backend.baseline(info, tmp_path / "base"), threads=1).run(data.take(64).inputs)[0]
    assert _fidelity(base, backend.runner(cand, threads=1).run(data.take(64).inputs)[0]) >= 0.99
