"""NNCF quantization with a run's activation statistics collected once builds what nncf.quantize builds."""

from pathlib import Path

import numpy as np
import pytest

from quantgate.data import NpzDataset
from quantgate.plugins.base import Calibration

pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")

from quantgate.plugins import _ov_stats  # noqa: E402
from quantgate.plugins.openvino import _CalibrationBatches, _convert, _quantize_args, calibration_memo  # noqa: E402


def _constants(model: object) -> list[np.ndarray]:
    """Every constant in graph order (their names carry a process-wide counter, so they differ between builds)."""
    return [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]  # type: ignore[attr-defined]


def _build(onnx: Path, calib: Calibration, memo: _ov_stats.StatsMemo | None, **extra: object) -> object:
    model = _convert(onnx)
    data = _CalibrationBatches(calib)
    opts = {"preset": "performance", "target_device": "CPU", "fast_bias_correction": True, "model_type": None}
    args = _quantize_args(opts, data, model) | extra
    if memo is None:
        return nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), **args)
    return _ov_stats.quantize(model, nncf.Dataset(data), memo, subset_size=len(data), **args)


def _same(a: object, b: object) -> None:
    ca, cb = _constants(a), _constants(b)
    assert len(ca) == len(cb)
    for i, (x, y) in enumerate(zip(ca, cb, strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=f"constant {i}")


def test_memo_builds_what_nncf_builds_and_collects_statistics_once(digits_onnx: Path, calib_npz: Path) -> None:
    _ov_stats.forget()
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    memo = calibration_memo(digits_onnx, calib)
    first = _build(digits_onnx, calib, memo)
    _same(first, _build(digits_onnx, calib, None))
    assert memo.collected_passes == 1 and memo.reused == 0

    convs = [
        op.get_friendly_name() for op in _convert(digits_onnx).get_ordered_ops() if op.get_type_name() == "Convolution"
    ]
    scope = nncf.IgnoredScope(names=convs[:1], validate=False)
    variant = _build(digits_onnx, calib, memo, ignored_scope=scope)
    assert memo.collected_passes == 1 and memo.reused == 1  # the variant needed nothing new
    _same(variant, _build(digits_onnx, calib, None, ignored_scope=scope))
    assert calibration_memo(digits_onnx, calib) is memo


def test_memo_collects_what_another_preset_needs(digits_onnx: Path, calib_npz: Path) -> None:
    _ov_stats.forget()
    calib = Calibration(NpzDataset.open(calib_npz), batch_size=16, limit=64)
    memo = calibration_memo(digits_onnx, calib)
    _build(digits_onnx, calib, memo)
    mixed = _build(digits_onnx, calib, memo, preset=nncf.QuantizationPreset.MIXED)
    assert memo.collected_passes == 2  # asymmetric activations need collectors the symmetric build did not
    fresh = _build(digits_onnx, calib, None, preset=nncf.QuantizationPreset.MIXED)
    # Collected in two passes instead of one, a few ranges differ in the last bit (1e-6 of 11.2 here): the same
    # quantization up to float rounding.
    for i, (x, y) in enumerate(zip(_constants(mixed), _constants(fresh), strict=True)):
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=str(i))


def test_other_calibration_data_gets_other_statistics(digits_onnx: Path, calib_npz: Path) -> None:
    _ov_stats.forget()
    data = NpzDataset.open(calib_npz)
    assert calibration_memo(digits_onnx, Calibration(data, 16, 64)) is not calibration_memo(
        digits_onnx, Calibration(data, 16, 32)
    )
