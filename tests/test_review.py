"""What a reviewer sees after a compression: MLflow run report, registry pages, Prefect artifacts, `report`/`history`.

One real compression (real MLflow store, Prefect test harness, real ONNX Runtime quantization) feeds every check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from quantgate import report, review
from quantgate.errors import InputError, ModelNotFound
from quantgate.flows.compress import compress_model
from quantgate.names import REPORT_FILES
from quantgate.registry import SourceVersion
from tests.conftest import register_onnx, test_policy
from tests.test_cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture()
def compressed(tracking_uri: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path) -> dict[str, Any]:
    uri = register_onnx(tracking_uri, digits_onnx, "digits")
    client = MlflowClient(tracking_uri=tracking_uri)
    client.update_model_version("digits", "1", "Trained by the vision team.")
    return compress_model(uri, test_policy(calib_npz, eval_npz), tracking_uri)


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path or None):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_the_run_and_the_registry_pages_tell_the_story(tracking_uri: str, compressed: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = compressed["parent_run_id"]
    assert set(REPORT_FILES) <= _artifacts(client, parent)
    exp_id = client.get_experiment_by_name("quantgate").experiment_id
    table = client.load_table(exp_id, "comparison_table.json", run_ids=[parent])
    assert set(table["recipe"]) >= {"int8-static-qdq-minmax-perchannel", "int8-dynamic"}
    assert set(table.loc[table["recipe"] == "int8-dynamic", "speedup_check"]) == {"FAIL"}
    run = client.get_run(parent)
    assert run.data.tags["quantgate.outcome"] == "promoted"
    assert run.data.tags["quantgate.promoted_uri"] == compressed["promoted_uri"] == "models:/digits-onnxruntime-int8/1"

    version = client.get_model_version("digits-onnxruntime-int8", "1")
    assert "[digits v1](#/models/digits/versions/1)" in version.description
    assert "int8-static-qdq-minmax-perchannel" in version.description and "| speedup | pass |" in version.description

    source = client.get_model_version("digits", "1").description
    assert source.startswith("Trained by the vision team.")  # the owner's text is kept
    assert "(#/models/digits-onnxruntime-int8/versions/1)" in source


def test_rerunning_replaces_the_source_line_instead_of_stacking_it(
    tracking_uri: str, compressed: dict[str, Any], calib_npz: Path, eval_npz: Path
) -> None:
    compress_model("models:/digits/1", test_policy(calib_npz, eval_npz), tracking_uri)
    source = MlflowClient(tracking_uri=tracking_uri).get_model_version("digits", "1").description
    assert source.count("quantgate:") == 1 and source.startswith("Trained by the vision team.")


def test_the_flow_run_publishes_the_table_and_the_report_as_prefect_artifacts(compressed: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = report.artifact_key(compressed)
    assert key == "quantgate-digits-v1"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-table", f"{key}-report"]))
        )
    # The key names the model version, so other runs of digits v1 in this session share it: pick this run's.
    by_type = {a.type: a for a in found if compressed["parent_run_id"] in (a.description or "")}
    assert set(by_type) == {"table", "markdown"}
    rows = json.loads(by_type["table"].data) if isinstance(by_type["table"].data, str) else by_type["table"].data
    assert {r["recipe"] for r in rows} >= {"int8-static-qdq-minmax-perchannel", "int8-dynamic"}
    assert "digits-onnxruntime-int8" in str(by_type["markdown"].data)


def test_report_and_history_read_results_back(tracking_uri: str, compressed: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    for uri in ("models:/digits/1", "models:/digits-onnxruntime-int8/1"):  # source and compressed version
        name, version = uri.removeprefix("models:/").split("/")
        mv = client.get_model_version(name, version)
        sv = SourceVersion(name, version, mv.run_id, mv.source, dict(mv.tags))
        assert review.result_run_id(client, sv) == compressed["parent_run_id"]
    attempts = review.history(client, "digits")
    assert [(a.version, a.outcome, a.policy_hash) for a in attempts] == [("1", "promoted", compressed["policy_hash"])]
    with pytest.raises(ModelNotFound):
        review.history(client, "nope")


def test_report_of_a_version_never_compressed_is_a_clear_input_error(tracking_uri: str, digits_onnx: Path) -> None:
    register_onnx(tracking_uri, digits_onnx, "fresh")
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version("fresh", "1")
    with pytest.raises(InputError, match="has no quantgate result yet"):
        review.result_run_id(client, SourceVersion("fresh", "1", mv.run_id, mv.source, dict(mv.tags)))


def test_cli_report_and_history(tracking_uri: str, compressed: dict[str, Any], tmp_path: Path, qg_home: Path) -> None:
    html = tmp_path / "report.html"
    proc = run_cli(
        ["report", "models:/digits-onnxruntime-int8/1", "--html", str(html)], tracking_uri, qg_home, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "PROMOTED" in proc.stdout and "int8-dynamic" in proc.stdout and proc.stderr == ""
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page

    proc = run_cli(["history", "digits", "--json"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    attempts = json.loads(proc.stdout)
    assert [a["outcome"] for a in attempts] == ["promoted"]
    assert attempts[0]["policy_hash"] == compressed["policy_hash"]

    proc = run_cli(["history", "nope"], tracking_uri, qg_home, tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "quantgate: error: registered model 'nope' does not exist"
