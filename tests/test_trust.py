"""The trust model: a registered model that runs code when loaded never runs it by default, and runs it only in the
isolated process (no credentials in its environment, ``nobody`` in its own network namespace when we are root)
when the run allows pickle. The malicious models are real MLflow models whose files were replaced in the artifact
store by payloads that write a marker file, as an attacker with registry write access would do."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from quantgate import isolation, registry
from quantgate.errors import UnsafeModel
from quantgate.intake import load_exported_program, to_onnx
from quantgate.plugins.onnxruntime import OrtRunner
from tests.conftest import register_pytorch, test_policy
from tests.test_cli import run_cli, write_policy

# What the payload records about the process it runs in.
_PROBE = (
    "__import__('pathlib').Path({marker!r}).write_text(__import__('json').dumps({{"
    "'pid': __import__('os').getpid(), 'uid': __import__('os').getuid(), 'env': sorted(__import__('os').environ),"
    "'net': __import__('socket').socket().connect_ex(('127.0.0.1', 5432))}}))"
)


class _Payload:
    """Unpickles to ``inner`` after running the probe: the model still works, so nothing looks wrong."""

    def __init__(self, marker: Path, inner: Any) -> None:
        self.marker, self.inner = marker, inner

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        code = (
            f"({_PROBE.format(marker=str(self.marker))}, __import__('pickle').loads({pickle.dumps(self.inner)!r}))[1]"
        )
        return (eval, (code,))


def _artifact_dir(tracking_uri: str, name: str) -> Path:
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version(name, "1")
    return Path(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location.removeprefix("file://"))


def _download(tracking_uri: str, name: str, dst: Path) -> Path:
    client = registry.connect(tracking_uri)
    return registry.download(registry.resolve(client, registry.parse_model_uri(f"models:/{name}/1")), dst)


def _iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def register_malicious_sklearn(tracking_uri: str, marker: Path, fmt: str = "cloudpickle") -> Any:
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    x, y = _iris()
    clf = LogisticRegression(max_iter=500).fit(x, y)
    with mlflow.start_run():
        mlflow.sklearn.log_model(clf, name="m", signature=infer_signature(x, clf.predict(x)), serialization_format=fmt,
                                 pip_requirements=["scikit-learn"], registered_model_name="evil-sk")  # fmt: skip
    (_artifact_dir(tracking_uri, "evil-sk") / "model.pkl").write_bytes(pickle.dumps(_Payload(marker, clf)))
    return clf


def register_malicious_pytorch(tracking_uri: str, model: Any, digits: Any, marker: Path) -> None:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        y = model(torch.from_numpy(digits.x_test[:2])).numpy()
    with mlflow.start_run():
        mlflow.pytorch.log_model(model, name="m", signature=infer_signature(digits.x_test[:2], y), pip_requirements=[
            "torch"], serialization_format="pickle", registered_model_name="evil-pt")  # fmt: skip
    torch.save(_Payload(marker, model), _artifact_dir(tracking_uri, "evil-pt") / "data" / "model.pth")


def _child_record(marker: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(marker.read_text())
    assert record["pid"] != os.getpid()
    leaked = [k for k in record["env"] if k.startswith(("MLFLOW_", "PREFECT_", "QUANTGATE_", "AWS_"))]
    assert leaked == [], leaked
    sandbox = isolation.describe()  # what this host allows, probed: asserted, not assumed
    if sandbox.argv:
        assert record["net"] != 0  # no network: not even PostgreSQL on loopback answers
    if sandbox.user:
        assert record["uid"] == 65534
    return record


@pytest.fixture()
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's credentials, which the isolated process must not see."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("QUANTGATE_WEBHOOK_SECRET", "do-not-leak-this-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")


def test_a_malicious_sklearn_pickle_is_refused_by_default_and_never_runs(tracking_uri: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    register_malicious_sklearn(tracking_uri, marker)
    local = _download(tracking_uri, "evil-sk", tmp_path / "dl")
    with pytest.raises(UnsafeModel, match=r"sklearn model: it is saved with cloudpickle.*intake\.allow_pickle: true"):
        to_onnx(local, tmp_path / "work")
    assert not marker.exists()


def test_an_allowed_sklearn_pickle_runs_only_in_the_isolated_process(
    tracking_uri: str, tmp_path: Path, secrets_in_env: None
) -> None:
    marker = tmp_path / "pwned"
    clf = register_malicious_sklearn(tracking_uri, marker, fmt="pickle")
    local = _download(tracking_uri, "evil-sk", tmp_path / "dl")
    info, _ = to_onnx(local, tmp_path / "work", allow_pickle=True)
    _child_record(marker)
    x, _ = _iris()
    np.testing.assert_allclose(OrtRunner(info.path, 1).run({"input": x[:5]})[0], clf.predict_proba(x[:5]), atol=1e-4)


def test_a_malicious_pytorch_pickle_is_refused_by_default_and_runs_only_isolated_when_allowed(
    tracking_uri: str, digits_cnn: Any, digits: Any, tmp_path: Path, secrets_in_env: None
) -> None:
    import torch

    marker = tmp_path / "pwned"
    register_malicious_pytorch(tracking_uri, digits_cnn, digits, marker)
    local = _download(tracking_uri, "evil-pt", tmp_path / "dl")
    with pytest.raises(UnsafeModel, match=r"pytorch model: it is pickled \(data/model\.pth\)"):
        to_onnx(local, tmp_path / "work")
    assert not marker.exists()
    info, _ = to_onnx(local, tmp_path / "work2", allow_pickle=True)
    _child_record(marker)
    out = OrtRunner(info.path, 1).run({"input": digits.x_test[:3]})[0]
    np.testing.assert_allclose(out, digits_cnn(torch.from_numpy(digits.x_test[:3])).detach().numpy(), atol=1e-4)


def _tamper_pt2(path: Path, edit: Any) -> None:
    """Rewrite one record of a pt2 archive (a zip) in place."""
    with zipfile.ZipFile(path) as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist()}
    for name in list(records):
        records[name] = edit(name, records[name])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def test_a_pt2_archive_whose_shape_expression_runs_code_is_refused_and_runs_only_isolated_when_allowed(
    tracking_uri: str, digits_cnn: Any, digits: Any, tmp_path: Path, secrets_in_env: None
) -> None:
    """torch evaluates every symbolic-shape expression of an archive with sympy.sympify, which is eval."""
    marker = tmp_path / "pwned"
    register_pytorch(digits_cnn, digits, "evil-pt2")
    pt2 = next((_artifact_dir(tracking_uri, "evil-pt2") / "data").glob("*.pt2"))

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        doc = json.loads(data)
        batch = doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]["as_expr"]
        batch["expr_str"] = f"({_PROBE.format(marker=str(marker))}, {batch['expr_str']})[1]"  # same value after
        return json.dumps(doc).encode()

    _tamper_pt2(pt2, edit)
    local = _download(tracking_uri, "evil-pt2", tmp_path / "dl")
    with pytest.raises(UnsafeModel, match=r"expression .* holds '__import__', refused"):
        to_onnx(local, tmp_path / "work")
    with pytest.raises(UnsafeModel):
        load_exported_program(next((local / "data").glob("*.pt2")))
    assert not marker.exists()
    to_onnx(local, tmp_path / "work2", allow_pickle=True)
    _child_record(marker)


def test_a_pt2_archive_with_pickled_sample_inputs_is_refused(
    tracking_uri: str, digits_cnn: Any, digits: Any, tmp_path: Path
) -> None:
    """torch.export.load retries sample inputs that fail weights_only=True with weights_only=False."""
    import torch

    marker = tmp_path / "pwned"
    register_pytorch(digits_cnn, digits, "evil-inputs")
    pt2 = next((_artifact_dir(tracking_uri, "evil-inputs") / "data").glob("*.pt2"))
    payload = tmp_path / "inputs.pt"
    torch.save(_Payload(marker, ((torch.zeros(2, 1, 32, 32),), {})), payload)
    _tamper_pt2(pt2, lambda name, data: payload.read_bytes() if "sample_inputs/" in name else data)
    local = _download(tracking_uri, "evil-inputs", tmp_path / "dl")
    with pytest.raises(UnsafeModel, match=r"sample_inputs/model\.pt holds objects beyond tensors"):
        to_onnx(local, tmp_path / "work")
    assert not marker.exists()


def test_the_safe_pt2_loader_reads_a_real_program_that_runs(digits_cnn: Any, digits: Any, tmp_path: Path) -> None:
    import torch

    x = torch.from_numpy(digits.x_test[:4])
    program = torch.export.export(digits_cnn, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_exported_program(tmp_path / "m.pt2")
    np.testing.assert_allclose(loaded.module()(x).detach().numpy(), digits_cnn(x).detach().numpy(), atol=1e-5)


def test_the_cli_refuses_malicious_pickles_in_one_line_and_registers_nothing(
    tracking_uri: str, digits_cnn: Any, digits: Any, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    marker = tmp_path / "pwned"
    register_malicious_sklearn(tracking_uri, marker)
    register_malicious_pytorch(tracking_uri, digits_cnn, digits, marker)
    policy = write_policy(tmp_path / "p.yaml", test_policy(calib_npz, eval_npz))
    for name, flavor in (("evil-sk", "sklearn"), ("evil-pt", "pytorch")):
        proc = run_cli(["compress", f"models:/{name}/1", "--policy", str(policy)], tracking_uri, qg_home, tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and f"refused to load the {flavor} model" in lines[0], proc.stderr
        assert "intake.allow_pickle: true" in lines[0]
    assert not marker.exists()
    names = {m.name for m in MlflowClient(tracking_uri=tracking_uri).search_registered_models()}
    assert names == {"evil-sk", "evil-pt"}


def test_the_cli_runs_an_allowed_pickle_in_the_isolated_process_only(
    tracking_uri: str, digits_cnn: Any, digits: Any, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path
) -> None:
    marker = tmp_path / "pwned"
    register_malicious_pytorch(tracking_uri, digits_cnn, digits, marker)
    policy = test_policy(calib_npz, eval_npz, recipes=["int8-static-qdq-minmax-perchannel"])
    path = write_policy(tmp_path / "p.yaml", {**policy, "intake": {"allow_pickle": True}})
    proc = run_cli(["compress", "models:/evil-pt/1", "--policy", str(path), "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["flavor"] == "pytorch"
    record = _child_record(marker)
    assert "MLFLOW_TRACKING_URI" not in record["env"]  # the CLI process itself has it set
