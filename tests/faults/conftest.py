"""The fault suite's stack: MLflow server on PostgreSQL, Prefect server on PostgreSQL, the webhook bridge and a process
worker (`make stack`'s code), started once for every fault test and torn down with both databases at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from quantgate.automation import stack
from tests.conftest import FAST_LATENCY
from tests.integration.conftest import _free_port
from tests.integration.test_stack import _postgres_up

RECIPE = "int8-static-qdq-minmax-perchannel"
# A gate every INT8 candidate of the digits CNN passes even on a loaded machine: the suite is about faults.
FAST = {"recipes": [RECIPE], "data": {"calibration_samples": 128}, "latency": FAST_LATENCY,
        "gate": {"min_speedup": 0.5}}  # fmt: skip
# Quick retries, so an outage of a few seconds is ridden out in seconds (production: MLflow's and quantgate's own).
QUICK_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "QUANTGATE_MLFLOW_RETRY_DELAY_S": "1",
}


@pytest.fixture(scope="package")
def faulty_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackSettings]:
    if not _postgres_up():
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432 (the stack needs it; see README)")
    home = tmp_path_factory.mktemp("fault-stack")
    config = home / "automation.yaml"
    pool = f"qgfault-{uuid.uuid4().hex[:6]}"
    config.write_text(yaml.safe_dump({"pool": {"name": pool, "concurrency_limit": 2},
                                      "rules": [{"name": "auto-*", "policy": FAST}]}))  # fmt: skip
    settings = stack.StackSettings(
        home=home / "stack",
        db_prefix=f"qgfault_{uuid.uuid4().hex[:8]}",
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        bridge_port=_free_port(),
        config=config,
    )
    saved = {k: os.environ.get(k) for k in QUICK_RETRIES}
    os.environ.update(QUICK_RETRIES)  # the workers inherit them
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)
        stack.drop_databases(settings)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli_env(settings: stack.StackSettings, work: Path, tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `quantgate` process run against the stack (its Prefect server holds the locks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QUANTGATE_"))}
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri or settings.mlflow_url,
        PREFECT_API_URL=settings.prefect_api,
        QUANTGATE_HOME=str(work / "home"),
        QUANTGATE_CACHE_DIR=str(settings.home.parent / "cache"),  # shared: later runs reuse the measurements
        TMPDIR=str(work / "tmp"),
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        PYTHONPATH=str(Path(__file__).parents[2]),
        **QUICK_RETRIES,
    )
    env.update(extra)
    return env


def compress(model_uri: str, policy: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("quantgate"))
    return subprocess.run(
        [exe, "compress", model_uri, "--policy", str(policy), "--json"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def new_versions(client: MlflowClient, name: str, n: int) -> list[str]:
    """``n`` more versions of ``name`` from its first version's logged model (registering is the only cost)."""
    first = client.get_model_version(name, "1")
    model_id = first.source.removeprefix("models:/")
    return [
        str(client.create_model_version(name, first.source, run_id=first.run_id, model_id=model_id).version)
        for _ in range(n)
    ]


def running_runs(client: MlflowClient) -> list[Any]:
    exp = client.get_experiment_by_name("quantgate")
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000))


def registered_from(client: MlflowClient, sibling: str, version: str) -> list[Any]:
    return [
        mv
        for mv in client.search_model_versions(f"name = '{sibling}'", max_results=1000)
        if mv.tags.get("quantgate.source_version") == version
    ]
