"""Fixtures shared by the integration tests: a real `mlflow server` process on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantgate.testing import free_port as _free_port
from quantgate.testing import running_server as running_process

__all__ = ["_free_port", "mlflow_server", "running_process"]  # shared with the other server tests


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    argv = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
        "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with running_process(argv, env, d, port, "/health", "mlflow server", timeout_s=120) as url:
        yield url
