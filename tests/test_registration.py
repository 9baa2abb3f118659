"""Registration is one unit against a real MLflow store: a failure at any step leaves the registry, the alias and
the source version exactly as they were; a retry reuses the parent run; a run killed mid-way is undone and closed
by the next one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from quantgate import faults, registration, registry, tracking
from quantgate.errors import RegistrationError
from quantgate.gate import Check, Verdict
from quantgate.hardware import detect
from quantgate.model import read_model_info
from quantgate.plugins.base import Recipe
from quantgate.policy import Policy
from quantgate.result import CandidateResult, CompressionResult
from tests.conftest import register_onnx


def _result(client: Any, digits_onnx: Path, recipe: str, precision: str = "int8") -> CompressionResult:
    source = registry.resolve(client, registry.parse_model_uri("models:/digits/1"))
    cand = CandidateResult(
        Recipe.make("onnxruntime", recipe, precision, n=recipe),
        {"speedup": 2.0, "size_ratio": 0.3},
        Verdict(True, (Check("speedup", True, "ok"),)),
        detect(),
        artifact=digits_onnx,
        promoted=True,
    )
    return CompressionResult(source, "onnx", Policy().digest(), detect(), [cand], "quantgate")


def _state(client: MlflowClient) -> dict[str, Any]:
    """Everything a registration may touch: versions with their tags, aliases, the source's tags and description."""
    versions = sorted((mv.name, mv.version) for mv in client.search_model_versions(max_results=1000))
    models = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    source = client.get_model_version("digits", "1")
    return {"versions": versions, "aliases": models, "tags": dict(source.tags), "description": source.description}


def _runs(client: MlflowClient) -> list[Any]:
    exp = client.get_experiment_by_name("quantgate")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture()
def registered(tracking_uri: str, digits_onnx: Path) -> MlflowClient:
    """digits v1, compressed once already: a version, its alias and the source's tags exist before each test."""
    register_onnx(tracking_uri, digits_onnx, "digits")
    client = registry.connect(tracking_uri)
    client.update_model_version("digits", "1", "the owner's own description")
    tracking.record(client, _result(client, digits_onnx, "first"), Policy(), read_model_info(digits_onnx), {})
    assert client.get_model_version("digits", "1").tags["quantgate.outcome"] == "promoted"
    return client


@pytest.mark.parametrize(
    ("point", "precision"),
    [
        ("registration_started", "int8"),
        ("version_created", "int8"),
        ("alias_set", "int8"),  # the alias moved from the first run's version: it must move back
        ("run_recorded", "int8"),
        ("source_tagged", "int8"),  # every source tag written, the outcome too: the commit itself failed
        ("model_created", "fp16"),  # a sibling model this run created: deleted again
        ("version_created", "fp16"),
    ],
)
def test_a_failure_at_any_registration_step_leaves_everything_as_it_was(
    registered: MlflowClient, digits_onnx: Path, monkeypatch: pytest.MonkeyPatch, point: str, precision: str
) -> None:
    client = registered
    before = _state(client)
    result = _result(client, digits_onnx, "second", precision)
    monkeypatch.setenv(faults.FAIL_ENV, point)
    with pytest.raises(RegistrationError) as exc:
        tracking.record(client, result, Policy(), read_model_info(digits_onnx), {})
    message = str(exc.value)
    assert f"injected failure at {point}" in message and "NOT rolled back" not in message, message
    if point != "registration_started":
        assert "rolled back:" in message
    assert _state(client) == before
    parent = client.get_run(result.parent_run_id or "")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["quantgate.registration_state"] == "rolled_back"
    assert result.candidates[0].registered_uri is None


def test_the_rollback_message_names_what_it_undid(
    registered: MlflowClient, digits_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.FAIL_ENV, "run_recorded")
    with pytest.raises(RegistrationError) as exc:
        tracking.record(
            registered, _result(registered, digits_onnx, "second"), Policy(), read_model_info(digits_onnx), {}
        )
    message = str(exc.value)
    assert message.startswith("registration failed while setting alias (injected failure at run_recorded)")
    assert "alias @compressed on digits-onnxruntime-int8 back to v1" in message
    assert "digits-onnxruntime-int8 v2 deleted" in message


def test_a_sibling_model_another_run_uses_is_never_deleted_by_a_rollback(
    registered: MlflowClient, digits_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = registered
    source_of_other = client.get_model_version("digits-onnxruntime-int8", "1").source

    def meanwhile(name: str) -> None:  # another run registers into the model this run just created
        if name == "version_created":
            client.create_model_version("digits-onnxruntime-fp16", source_of_other, tags={"other": "run"})
            raise faults.InjectedFault("injected failure at version_created")

    monkeypatch.setattr(faults, "point", meanwhile)
    with pytest.raises(RegistrationError, match="registered model digits-onnxruntime-fp16 kept"):
        tracking.record(client, _result(client, digits_onnx, "b", "fp16"), Policy(), read_model_info(digits_onnx), {})
    left = client.search_model_versions("name = 'digits-onnxruntime-fp16'")
    assert [mv.tags.get("other") for mv in left] == ["run"]


def test_a_retry_after_a_failure_reuses_the_parent_run_and_its_candidate_runs(
    registered: MlflowClient, digits_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = registered
    result = _result(client, digits_onnx, "second")
    monkeypatch.setenv(faults.FAIL_ENV, "alias_set")
    with pytest.raises(RegistrationError):
        tracking.record(client, result, Policy(), read_model_info(digits_onnx), {})
    parent, runs_before = result.parent_run_id, len(_runs(client))
    monkeypatch.delenv(faults.FAIL_ENV)
    tracking.record(client, result, Policy(), read_model_info(digits_onnx), {})  # what Prefect's retry calls
    assert result.parent_run_id == parent and len(_runs(client)) == runs_before
    assert client.get_run(parent or "").info.status == "FINISHED"
    aliased = client.get_model_version_by_alias("digits-onnxruntime-int8", "compressed")
    assert result.candidates[0].registered_uri == f"models:/digits-onnxruntime-int8/{aliased.version}"
    assert len(client.search_model_versions("name = 'digits-onnxruntime-int8'")) == 2  # the first run's + this one


def test_concurrent_registrations_of_one_source_and_recipe_register_it_once(
    registered: MlflowClient, digits_onnx: Path
) -> None:
    client = registered
    results = [_result(client, digits_onnx, "same") for _ in range(3)]
    errors: list[BaseException] = []

    def run(result: CompressionResult) -> None:
        try:
            tracking.record(client, result, Policy(), read_model_info(digits_onnx), {})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r.candidates[0].registered_uri for r in results} == {"models:/digits-onnxruntime-int8/2"}
    assert len(client.search_model_versions("name = 'digits-onnxruntime-int8'")) == 2  # the first run's + this one


_KILLED_RUN = """
import sys
from pathlib import Path
from quantgate import registry, tracking
from quantgate.model import read_model_info
from quantgate.policy import Policy
from tests.test_registration import _result

client = registry.connect(sys.argv[1])
model = Path(sys.argv[2])
tracking.record(client, _result(client, model, "second"), Policy(), read_model_info(model), {})
"""


@pytest.mark.parametrize("point", ["version_created", "source_tagged"])
def test_a_run_killed_mid_registration_is_undone_and_closed_by_the_next_run(
    registered: MlflowClient, tracking_uri: str, digits_onnx: Path, point: str
) -> None:
    client = registered
    env = {**os.environ, faults.ENV: point, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, tracking_uri, str(digits_onnx)], env=env, timeout=300)
    assert proc.returncode == -9  # SIGKILL: no finally, no atexit ran
    (dead,) = [r for r in _runs(client) if r.info.status == "RUNNING"]
    assert json.loads(dead.data.tags["quantgate.registration"])["state"] == "open"

    result = _result(client, digits_onnx, "second")
    tracking.record(client, result, Policy(), read_model_info(digits_onnx), {})
    assert [r.info.run_id for r in _runs(client) if r.info.status == "RUNNING"] == []
    closed = client.get_run(dead.info.run_id)
    assert closed.info.status == "FAILED" and "died" in closed.data.tags["quantgate.orphaned"]
    assert closed.data.tags["quantgate.registration_state"] == "rolled_back"
    versions = client.search_model_versions("name = 'digits-onnxruntime-int8'")
    second = [mv for mv in versions if mv.tags["quantgate.recipe"] == "second"]
    assert len(second) == 1 and result.candidates[0].registered_uri == f"models:/{second[0].name}/{second[0].version}"
    assert str(client.get_model_version_by_alias("digits-onnxruntime-int8", "compressed").version) == str(
        second[0].version
    )
    assert client.get_model_version("digits", "1").tags["quantgate.last_run_id"] == result.parent_run_id


def test_describe_rollback_says_what_was_and_was_not_undone() -> None:
    text = registration.describe_rollback("setting alias", RuntimeError("503"), ["m v2 deleted"], ["alias (503)"])
    assert text == (
        "registration failed while setting alias (503); rolled back: m v2 deleted; NOT rolled back: alias (503) "
        "(the next run of this version retries that)"
    )
    assert registration.describe_rollback("", RuntimeError("x"), [], []).endswith("nothing had been changed yet")
