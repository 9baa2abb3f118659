"""Shared fixtures: the digits CNN trained once per test run, its data, real local MLflow stores."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantgate import testing
from quantgate.testing import model_versions, register_onnx

__all__ = ["model_versions", "register_onnx", "register_pytorch"]  # the tests' shared helpers, from quantgate.testing

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
warnings.filterwarnings("ignore")

FAST_LATENCY = {"threads": 1, "warmup": 5, "rounds": 40, "batch_sizes": [1]}


@pytest.fixture(autouse=True)
def _own_measurement_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test measures for itself: quantgate's candidate cache lives in the test's own directory."""
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "quantgate-cache"))


@pytest.fixture(scope="session")
def digits() -> Any:
    from quantgate.demo import digits_data

    return digits_data()


@pytest.fixture(scope="session")
def digits_cnn(digits: Any, request: pytest.FixtureRequest) -> Any:
    """Trained once, then cached in pytest's cache dir keyed by the demo module's source (train ~30 s)."""
    import hashlib
    import inspect

    import torch

    import quantgate.demo as demo

    key = hashlib.sha256(inspect.getsource(demo).encode()).hexdigest()[:16]
    cached = request.config.cache.mkdir("quantgate") / f"digits-cnn-{key}.pt"
    if cached.exists():
        model = demo.build_cnn()
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval()
    model = demo.train_cnn(digits, epochs=4)
    torch.save(model.state_dict(), cached)
    return model


@pytest.fixture(scope="session")
def data_dir(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantgate.demo import write_data

    d = tmp_path_factory.mktemp("digits-data")
    write_data(digits, d, calibration_samples=256)
    return d


@pytest.fixture(scope="session")
def eval_data(data_dir: Path) -> dict[str, np.ndarray]:
    with np.load(data_dir / "evaluation.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def calib_npz(data_dir: Path) -> Path:
    return data_dir / "calibration.npz"


@pytest.fixture(scope="session")
def eval_npz(data_dir: Path) -> Path:
    return data_dir / "evaluation.npz"


def export_onnx(module: Any, shape: tuple[int, ...], path: Path, input_name: str = "input") -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(shape),),
            str(path),
            input_names=[input_name],
            output_names=["output"],
            dynamic_axes={input_name: {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="session")
def digits_onnx(digits_cnn: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(digits_cnn, (1, 1, 32, 32), tmp_path_factory.mktemp("onnx") / "digits.onnx")


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema migrated once; each test gets a copy (saves ~4 s a test)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def tracking_uri(tmp_path: Path, _empty_store: Path) -> Iterator[str]:
    """A fresh real MLflow SQLite store (with a local artifact root) for one test."""
    import shutil

    import mlflow

    shutil.copy(_empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # default artifact location ./mlruns lands in tmp_path
    mlflow.set_experiment("tests")  # the fluent API remembers the last test's experiment id otherwise
    try:
        yield uri
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def register_pytorch(model: Any, digits: Any, name: str) -> str:
    """Log and register the CNN in MLflow's default pytorch format (pt2), as a user would; in the active store."""
    import mlflow

    return testing.register_pytorch(mlflow.get_tracking_uri(), model, digits.x_test[:2], name)


def test_policy(calib: Path, evaluation: Path, **overrides: Any) -> dict[str, Any]:
    """A policy dict that runs fast: two contrasting recipes, short latency runs."""
    policy: dict[str, Any] = {
        "backends": ["onnxruntime"],
        "recipes": ["int8-static-qdq-minmax-perchannel", "int8-dynamic"],
        "data": {"calibration": str(calib), "evaluation": str(evaluation), "calibration_samples": 128},
        "latency": FAST_LATENCY,
        # The tests want a candidate that builds and is too slow: dynamic INT8 on convolutions (ConvInteger), which
        # the recipe leaves out by default since it runs 4-8x slower than FP32 here.
        "recipe_options": {"onnxruntime/int8-dynamic": {"op_types_to_quantize": "Conv,MatMul"}},
    }
    policy.update(overrides)
    return policy


test_policy.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's own test harness: a temporary server and database for the whole test run."""
    from quantgate.flows.prefect_server import configure_prefect_env

    configure_prefect_env()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def registered_digits_template(digits_onnx: Path, _empty_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the digits CNN registered as digits/1; tests copy it (store + artifacts)."""
    d = tmp_path_factory.mktemp("registered-template")
    import shutil

    shutil.copy(_empty_store, d / "mlflow.db")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        register_onnx(f"sqlite:///{d}/mlflow.db", digits_onnx, "digits")
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture(scope="session")
def qg_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A QUANTGATE_HOME for CLI subprocesses: they share one local Prefect server, stopped at the end."""
    from quantgate.flows.prefect_server import stop_local_server

    home = tmp_path_factory.mktemp("qghome")
    try:
        yield home
    finally:
        stop_local_server(home)
