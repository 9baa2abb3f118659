from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate import registry
from quantgate.errors import InvalidModel, UnsupportedFlavor
from quantgate.intake import to_onnx
from quantgate.plugins.onnxruntime import OrtRunner
from tests.conftest import register_onnx, register_pytorch


def _download(tracking_uri: str, uri: str, dst: Path) -> Path:
    client = registry.connect(tracking_uri)
    return registry.download(registry.resolve(client, registry.parse_model_uri(uri)), dst)


def test_onnx_flavor_is_taken_as_is(tracking_uri: str, digits_onnx: Path, tmp_path: Path) -> None:
    local = _download(tracking_uri, register_onnx(tracking_uri, digits_onnx, "d"), tmp_path / "dl")
    info, flavor = to_onnx(local, tmp_path / "work")
    assert flavor == "onnx"
    assert info.input_names == ["input"]
    assert info.inputs[0].shape == (None, 1, 32, 32)


def test_pytorch_flavor_is_exported_with_the_signature_shape(
    tracking_uri: str, digits_cnn: Any, digits: Any, tmp_path: Path
) -> None:
    import torch

    register_pytorch(digits_cnn, digits, "pt")
    info, flavor = to_onnx(_download(tracking_uri, "models:/pt/1", tmp_path / "dl"), tmp_path / "work")
    assert flavor == "pytorch"
    assert info.inputs[0].shape == (None, 1, 32, 32)
    out = OrtRunner(info.path, 1).run({"input": digits.x_test[:5]})[0]
    np.testing.assert_allclose(out, digits_cnn(torch.from_numpy(digits.x_test[:5])).detach().numpy(), atol=1e-4)


def test_sklearn_flavor_is_converted_and_gives_probabilities(tracking_uri: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    with mlflow.start_run():
        mlflow.sklearn.log_model(clf, name="m", signature=infer_signature(x, clf.predict(x)),
                                 pip_requirements=["scikit-learn"], registered_model_name="iris")  # fmt: skip
    info, flavor = to_onnx(_download(tracking_uri, "models:/iris/1", tmp_path / "dl"), tmp_path / "work")
    assert flavor == "sklearn"
    probs = OrtRunner(info.path, 1).run({"input": x[:10]})[0]
    np.testing.assert_allclose(probs, clf.predict_proba(x[:10]), atol=1e-4)


def test_unsupported_flavor_names_the_flavor_and_what_is_supported(tracking_uri: str, tmp_path: Path) -> None:
    import mlflow

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context: Any, model_input: Any) -> Any:
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Echo(), registered_model_name="echo", pip_requirements=[])
    local = _download(tracking_uri, "models:/echo/1", tmp_path / "dl")
    with pytest.raises(UnsupportedFlavor, match="quantgate compresses onnx, pytorch, sklearn models"):
        to_onnx(local, tmp_path / "work")


def test_truncated_onnx_is_refused(tracking_uri: str, digits_onnx: Path, tmp_path: Path) -> None:
    local = _download(tracking_uri, register_onnx(tracking_uri, digits_onnx, "d"), tmp_path / "dl")
    model_file = local / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(InvalidModel, match="is not a valid ONNX model"):
        to_onnx(local, tmp_path / "work")
