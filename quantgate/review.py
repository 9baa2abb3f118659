"""Read compression results back from MLflow: the latest result for a version, and every attempt for a model.

The parent run of each compression holds ``result.json`` (the full result document) and tags that make it
searchable; nothing else is needed to rebuild a report later.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quantgate import names, registry
from quantgate.errors import InputError
from quantgate.registry import SourceVersion


@dataclass(frozen=True)
class Attempt:
    """One compression of one source version, as recorded in MLflow."""

    run_id: str
    started: datetime
    version: str
    status: str  # the MLflow run status: FINISHED, FAILED, RUNNING
    outcome: str  # promoted, none_passed, or "" when the run did not finish
    promoted_uri: str
    policy_hash: str
    candidates: int
    passed: int
    experiment: str

    def as_dict(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "started": self.started.isoformat(timespec="seconds"),
            "version": self.version,
            "status": self.status,
            "outcome": self.outcome,
            "promoted_uri": self.promoted_uri,
            "policy_hash": self.policy_hash,
            "candidates": self.candidates,
            "passed": self.passed,
            "experiment": self.experiment,
        }


def result_run_id(client: Any, version: SourceVersion) -> str:
    """The parent run whose result covers ``version``: its own latest run, or, for a version quantgate registered,
    the run that produced it."""
    tags = version.tags
    if tags.get(names.MANAGED) == "true" and tags.get(names.CANDIDATE_RUN_ID):
        child = client.get_run(tags[names.CANDIDATE_RUN_ID])
        parent = child.data.tags.get("mlflow.parentRunId")
        if parent:
            return str(parent)
    if tags.get(names.LAST_RUN_ID):
        return tags[names.LAST_RUN_ID]
    raise InputError(f"{version.uri} has no quantgate result yet: run `quantgate compress {version.uri}` first")


def load_result(client: Any, run_id: str) -> dict[str, Any]:
    """The result document logged to ``run_id``."""
    return load_artifact_json(client, run_id, names.RESULT)


def load_artifact_json(client: Any, run_id: str, name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
            doc = json.loads(Path(path).read_text())
        except Exception as exc:  # a run without the artifact, bad JSON, or storage errors
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise InputError(f"run {run_id} has no readable {name}: {first}") from None
    if not isinstance(doc, dict):
        raise InputError(f"run {run_id}: {name} is not a JSON object")
    return doc


def history(client: Any, name: str) -> list[Attempt]:
    """Every recorded compression of any version of ``name``, newest first, across experiments."""
    registry.resolve_model(client, name)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    escaped = name.replace("'", "\\'")
    runs = registry.all_pages(
        functools.partial(
            client.search_runs,
            list(experiments),
            filter_string=f"tags.`{names.SOURCE_NAME}` = '{escaped}'",
            order_by=["attributes.start_time DESC"],
        )
    )
    out = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        out.append(
            Attempt(
                run_id=run.info.run_id,
                started=datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC),
                version=tags.get(names.SOURCE_VERSION, "?"),
                status=run.info.status,
                outcome=tags.get(names.OUTCOME, ""),
                promoted_uri=tags.get(names.PROMOTED_URI, ""),
                policy_hash=tags.get(names.POLICY_HASH, ""),
                candidates=int(metrics.get("candidates", 0)),
                passed=int(metrics.get("passed", 0)),
                experiment=experiments.get(run.info.experiment_id, run.info.experiment_id),
            )
        )
    return out
