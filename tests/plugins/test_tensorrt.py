"""TensorRT backend on a host without TensorRT or a GPU: the TensorRT-ready ONNX (step 1) for real, with real ONNX
Runtime; the engine build (step 2) refused with the reason. tests/gpu covers step 2 on an NVIDIA worker."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantgate.data import NpzDataset
from quantgate.demo import export_bert_encoder
from quantgate.errors import BackendError, BackendUnavailable
from quantgate.model import read_model_info
from quantgate.plugins.base import Calibration, Candidate, Recipe
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend, OrtRunner
from quantgate.plugins.tensorrt import INSTALL_HINT, RECIPES, EngineNotBuilt, TensorRtBackend
from quantgate.plugins.tensorrt_qdq import (
    TensorRtQdqError,
    check_tensorrt_qdq,
    make_tensorrt_fp16,
    make_tensorrt_qdq,
)
from quantgate.validators.fidelity import cosine_per_row

no_tensorrt_here = pytest.mark.skipif(
    TensorRtBackend().available().ok, reason="TensorRT and a GPU are here: tests/gpu covers this host"
)
FORBIDDEN = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


def _calib(path: Path, limit: int | None = 64) -> Calibration:
    return Calibration(NpzDataset.open(path), batch_size=16, limit=limit)


def _fidelity(fp32: Path, candidate: Path, data: Path) -> float:
    x = NpzDataset.open(data).take(10_000).inputs
    base = OrtRunner(fp32, threads=1).run(x)[0]
    out = OrtRunner(candidate, threads=1).run(x)[0]
    assert out.shape == base.shape
    n = base.shape[0]
    return float(np.mean(cosine_per_row(base.reshape(n, -1), out.reshape(n, -1))))


@pytest.fixture(scope="module")
def digits_qdq(digits_onnx: Path, calib_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt-digits") / "digits.qdq.onnx"
    make_tensorrt_qdq(digits_onnx, out, _calib(calib_npz, limit=None), fp16_fallback=False)
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny random-weight BERT encoder exported to ONNX, with calibration and evaluation sets of padded ids."""
    d = tmp_path_factory.mktemp("trt-bert")
    export_bert_encoder(d / "bert.onnx", seq_len=16)
    rng = np.random.default_rng(0)
    for name, n in (("calibration", 128), ("evaluation", 128)):
        mask = (np.arange(16) < rng.integers(4, 17, n)[:, None]).astype(np.int64)
        np.savez(d / f"{name}.npz", input_ids=rng.integers(0, 100, (n, 16)), attention_mask=mask)
    return d / "bert.onnx", d / "calibration.npz", d / "evaluation.npz"


def _nodes(path: Path, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


# -- step 1 builds what TensorRT reads ---------------------------------------------------------------------


def test_digits_qdq_is_symmetric_int8_per_channel_and_passes_the_form_check(digits_qdq: Path) -> None:
    assert check_tensorrt_qdq(digits_qdq) == []
    model = onnx.load(str(digits_qdq))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 10
    for node in qdq:
        zp = inits[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), node.name
    assert not FORBIDDEN & {n.op_type for n in model.graph.node}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    producer = {o: n for n in model.graph.node for o in n.output}
    for conv in _nodes(digits_qdq, "Conv"):
        weight_dq = producer[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear" and _attr(weight_dq, "axis", 1) == 0
        assert inits[weight_dq.input[1]].shape == (inits[weight_dq.input[0]].shape[0],)  # one scale per channel
        assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32  # bias stays float
        activation_dq = producer[conv.input[0]]
        assert inits[activation_dq.input[1]].shape == ()  # per-tensor activation scale


def test_digits_qdq_runs_in_onnxruntime_close_to_fp32(digits_qdq: Path, digits_onnx: Path, eval_npz: Path) -> None:
    assert _fidelity(digits_onnx, digits_qdq, eval_npz) > 0.99


def test_transformer_qdq_passes_the_form_check_and_runs_close_to_fp32(
    bert: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Same bar as the CNN (measured ~0.9999): every MatMul, the attention ones included, gets symmetric INT8
    inputs, but LayerNorm, Softmax and GELU stay float, which is where a small encoder loses the most."""
    model, calib, evaluation = bert
    out = tmp_path / "bert.qdq.onnx"
    notes = make_tensorrt_qdq(model, out, _calib(calib, limit=None), fp16_fallback=False)
    assert any("symbolic shape inference" in n for n in notes), notes
    assert check_tensorrt_qdq(out) == []
    matmul_weight_axes = {
        _attr(n, "axis", 1) for n in _nodes(out, "DequantizeLinear") if n.input[0].endswith("_quantized")
    }
    assert matmul_weight_axes == {1}  # [in, out] MatMul weights: the output channel is axis 1
    assert _fidelity(model, out, evaluation) > 0.99


@pytest.mark.parametrize("which", ["digits", "bert"])
def test_fp16_fallback_variant_passes_the_check_and_runs(
    which: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, bert: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, calib, evaluation = (digits_onnx, calib_npz, eval_npz) if which == "digits" else bert
    out = tmp_path / "fallback.onnx"
    notes = make_tensorrt_qdq(model, out, _calib(calib), fp16_fallback=True)
    assert any(n.startswith("fp16 fallback:") for n in notes), notes
    assert check_tensorrt_qdq(out) == []
    onnx.checker.check_model(str(out))  # still topologically sorted and typed after the conversion
    proto = onnx.load(str(out))
    fp16 = {v.name for v in proto.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    assert fp16, "no tensor runs in FP16"
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:  # a DQ still feeds its weighted op directly, in FP32
        if node.op_type in ("Conv", "MatMul", "Gemm") and node.input[1] in producer:
            assert producer[node.input[1]].op_type == "DequantizeLinear", node.name
    assert [i.type.tensor_type.elem_type for i in proto.graph.output] == [onnx.TensorProto.FLOAT]
    assert _fidelity(model, out, evaluation) > 0.99


def test_fp16_recipe_model_passes_the_check_and_runs(digits_onnx: Path, eval_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    make_tensorrt_fp16(digits_onnx, out)
    assert check_tensorrt_qdq(out) == []
    onnx.checker.check_model(str(out))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert _fidelity(digits_onnx, out, eval_npz) > 0.99


# -- the validator catches each broken rule ------------------------------------------------------------------


def _ort_static(
    src: Path, out: Path, calib: Path, *, per_channel: bool, quantize_bias: bool, symmetric: bool = True
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from quantgate.plugins._ort_calibration import StreamingCalibrationReader

    reader = StreamingCalibrationReader(NpzDataset.open(calib), batch_size=16, limit=32)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": symmetric, "QuantizeBias": quantize_bias},
        )  # fmt: skip


def _bad_model(kind: str, digits_onnx: Path, digits_qdq: Path, calib_npz: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{kind}.onnx"
    if kind == "ort-default-asymmetric-u8":
        # What the ONNX Runtime backend builds for CPUs: U8 activations with zero point 128.
        recipe = next(
            r for r in OnnxRuntimeBackend().recipes(read_model_info(digits_onnx)) if r.name.endswith("-perchannel")
        )
        return (
            OnnxRuntimeBackend()
            .compress(read_model_info(digits_onnx), recipe, _calib(calib_npz), tmp_path / "w")
            .artifact
        )
    if kind == "ort-default-static":
        _ort_static(digits_onnx, out, calib_npz, per_channel=True, quantize_bias=True, symmetric=False)
    elif kind == "dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(digits_onnx), str(out))
    elif kind == "opset-11":
        model = onnx.load(str(digits_qdq))
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 11
        onnx.save(model, str(out))
    elif kind == "per-tensor-weights":
        _ort_static(digits_onnx, out, calib_npz, per_channel=False, quantize_bias=False)
    elif kind == "wrong-axis":
        model = onnx.load(str(digits_qdq))
        dq = next(n for n in model.graph.node if n.name == "0.weight_DequantizeLinear")
        next(a for a in dq.attribute if a.name == "axis").i = 1
        onnx.save(model, str(out))
    elif kind == "quantized-bias":
        _ort_static(digits_onnx, out, calib_npz, per_channel=True, quantize_bias=True)
    else:
        out.write_bytes(b"not an onnx file")
    return out


BAD_MODELS = {
    "ort-default-asymmetric-u8": [  # non-negative (post-ReLU) tensors get zero point 0 in U8; the logits do not
        r"^node 'output_QuantizeLinear': zero point must be 0 for TensorRT \(symmetric quantization\), found \d+$",
        r"^node 'input_QuantizeLinear': quantized type must be int8 for TensorRT INT8, found UINT8$",
    ],
    "ort-default-static": [  # onnxruntime 1.32's own defaults: asymmetric S8 activations
        r"^node 'input_QuantizeLinear': zero point must be 0 for TensorRT \(symmetric quantization\), found -128$",
    ],
    "dynamic": [
        r"^node '.+': DynamicQuantizeLinear is rejected by TensorRT: dynamic quantization",
        r"^node '.+': ConvInteger is rejected by TensorRT",
    ],
    "opset-11": [r"^model: opset must be >= 13 for TensorRT .*found 11"],
    "per-tensor-weights": [
        r"^node '0\.weight_DequantizeLinear': weight of Conv '/0/Conv' must be quantized per output channel "
        r"\(axis 0\) for TensorRT, found a per-tensor scale$"
    ],
    "wrong-axis": [
        r"^node '0\.weight_DequantizeLinear': per-channel axis of the weight of Conv '/0/Conv' must be 0 "
        r"for TensorRT, found 1$"
    ],
    "quantized-bias": [r"^node '/0/Conv': bias \(input 2\) must stay float for TensorRT, found it dequantized by"],
    "unreadable": [r"^model: unreadable\.onnx cannot be read as ONNX"],
}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_the_form_check_names_each_broken_rule(
    kind: str, digits_onnx: Path, digits_qdq: Path, calib_npz: Path, tmp_path: Path
) -> None:
    import re

    violations = check_tensorrt_qdq(_bad_model(kind, digits_onnx, digits_qdq, calib_npz, tmp_path))
    for pattern in BAD_MODELS[kind]:
        assert any(re.search(pattern, v) for v in violations), (pattern, violations)
    assert all("\n" not in v and (v.startswith("node '") or v.startswith("model: ")) for v in violations)
    if kind in ONE_RULE:  # only that rule is broken, so only that rule is reported
        assert all(ONE_RULE[kind] in v for v in violations), violations


ONE_RULE = {
    "opset-11": "opset must be >= 13",
    "per-tensor-weights": "must be quantized per output channel",
    "wrong-axis": "per-channel axis of the weight",
    "quantized-bias": "bias (input 2) must stay float",
}


# -- the backend on a host without TensorRT --------------------------------------------------------------------


def test_recipes_are_the_three_tensorrt_ones_with_distinct_digests(digits_onnx: Path) -> None:
    recipes = TensorRtBackend().recipes(read_model_info(digits_onnx))
    assert [(r.name, r.precision) for r in recipes] == [
        ("fp16", "fp16"),
        ("int8-qdq", "int8"),
        ("int8-qdq-fp16-fallback", "int8"),
    ]
    assert len({r.digest for r in RECIPES}) == 3


@no_tensorrt_here
def test_availability_is_false_here_with_the_reason_and_install_hint() -> None:
    status = TensorRtBackend().available()
    assert not status.ok
    assert status.reason.startswith("TensorRT is not installed"), status.reason
    assert status.hint == INSTALL_HINT == "pip install quantgate[tensorrt] on an NVIDIA GPU worker"


@no_tensorrt_here
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_compress_writes_the_checked_onnx_then_says_it_needs_a_gpu_worker(
    recipe: Recipe, digits_onnx: Path, calib_npz: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "tensorrt" / recipe.name
    with pytest.raises(BackendUnavailable) as caught:
        TensorRtBackend().compress(read_model_info(digits_onnx), recipe, _calib(calib_npz), workdir)
    exc = caught.value
    assert isinstance(exc, EngineNotBuilt) and exc.backend == "tensorrt"
    onnx_path = workdir / f"{recipe.name}.onnx"
    assert exc.onnx_path == onnx_path and onnx_path.exists()
    assert "needs an NVIDIA GPU worker: TensorRT is not installed" in str(exc)
    assert onnx_path.name in str(exc)
    assert check_tensorrt_qdq(onnx_path) == []
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert ("QuantizeLinear" in ops) == (recipe.precision == "int8")
    assert not list(workdir.glob("*.engine"))


def test_a_form_violation_in_step_1_is_a_backend_error_naming_the_rule(
    digits_onnx: Path, calib_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def asymmetric(src: Path, out: Path, calib: Calibration, **_: Any) -> tuple[str, ...]:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from quantgate.plugins._ort_calibration import StreamingCalibrationReader

        reader = StreamingCalibrationReader(calib.dataset, batch_size=16, limit=32)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8)
        return ()

    monkeypatch.setattr("quantgate.plugins.tensorrt.make_tensorrt_qdq", asymmetric)
    recipe = next(r for r in RECIPES if r.name == "int8-qdq")
    with pytest.raises(TensorRtQdqError, match=r"^int8-qdq: the ONNX is not in TensorRT's QDQ form: node '") as caught:
        TensorRtBackend().compress(read_model_info(digits_onnx), recipe, _calib(calib_npz), tmp_path / "w")
    assert isinstance(caught.value, BackendError)
    assert any("zero point must be 0 for TensorRT" in v for v in caught.value.violations)


@no_tensorrt_here
def test_runner_here_names_the_gpu_and_tensorrt_version_the_engine_needs(tmp_path: Path) -> None:
    engine = tmp_path / "int8-qdq.engine"
    engine.write_bytes(b"\0" * 16)
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0.35"}
    (tmp_path / "int8-qdq.engine.json").write_text(json.dumps(meta))
    cand = Candidate(RECIPES[1], engine)
    with pytest.raises(BackendUnavailable, match=r"NVIDIA H100 80GB HBM3 \(compute capability 9\.0\).*TensorRT 10\.13"):
        TensorRtBackend().runner(cand, threads=1)


@no_tensorrt_here
def test_baseline_here_is_the_fp32_onnx_and_cannot_run(digits_onnx: Path, tmp_path: Path) -> None:
    base = TensorRtBackend().baseline(read_model_info(digits_onnx), tmp_path)
    assert base.artifact == digits_onnx and base.recipe.precision == "fp32"
    with pytest.raises(BackendUnavailable, match="runs as a TensorRT engine on an NVIDIA GPU worker"):
        TensorRtBackend().runner(base, threads=1)
