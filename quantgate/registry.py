"""Everything that talks to MLflow: resolve a model URI, download, log runs, register, tag.

The fluent ``mlflow`` API keeps its tracking URI in a process global; ``connect`` is the one place that
sets it, from the URI the caller passed in.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.errors import InputError, InvalidModel, ModelNotFound, TrackingUnavailable

log = logging.getLogger(__name__)

TAG = "quantgate."
MANAGED_TAG = TAG + "managed"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


@dataclass(frozen=True)
class SourceVersion:
    """A registered model version, pinned: later steps never re-resolve an alias."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: Mapping[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    m = _URI.match(uri.strip())
    if not m:
        raise InputError(f"not a registered model URI: '{uri}' (expected models:/NAME/VERSION or models:/NAME@ALIAS)")
    version = m.group("version")
    if version is not None and (not version.isdigit() or version == "0"):
        raise InputError(f"model version must be a positive integer, got '{version}' in {uri}")
    return ModelRef(m.group("name"), version, m.group("alias"))


def default_tracking_uri() -> str:
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def check_reachable(tracking_uri: str) -> None:
    """Fail fast on a tracking server that does not answer (a local store needs no check)."""
    if tracking_uri.startswith(("http://", "https://")):
        _probe_server(tracking_uri)


def connect(tracking_uri: str) -> Any:
    """Check the tracking store answers, point mlflow at it, return an ``MlflowClient``."""
    import mlflow
    from mlflow import MlflowClient

    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _probe_server(uri: str) -> None:
    # MLflow's REST client retries for minutes on a dead server; a user deserves an answer in seconds.
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status >= 500:
                raise TrackingUnavailable(f"MLflow tracking server at {uri} answered {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingUnavailable(f"MLflow tracking server at {uri} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"cannot reach the MLflow tracking server at {uri}: {reason}") from None


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in (
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "INVALID_PARAMETER_VALUE",
    )


def resolve_model(client: Any, name: str) -> Any:
    """The registered model ``name``; ``ModelNotFound`` if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFound(f"registered model '{name}' does not exist") from None
        raise


def resolve(client: Any, ref: ModelRef) -> SourceVersion:
    """Pin ``ref`` to one version; ``ModelNotFound`` names what is missing."""
    from mlflow.exceptions import MlflowException

    resolve_model(client, ref.name)
    try:
        if ref.version is not None:
            mv = client.get_model_version(ref.name, ref.version)
        else:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        if _not_found(exc):
            what = f"version {ref.version}" if ref.version else f"alias '@{ref.alias}'"
            raise ModelNotFound(f"registered model '{ref.name}' has no {what}") from None
        raise
    return SourceVersion(mv.name, str(mv.version), mv.run_id, mv.source or "", dict(mv.tags or {}))


def download(source: SourceVersion, dst: Path) -> Path:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source.uri, dst_path=str(dst)))
    except Exception as exc:  # any storage error: missing artifacts, permissions
        raise InvalidModel(f"cannot download {source.uri}: {str(exc).splitlines()[0]}") from exc


def sibling_name(source_name: str, backend: str, precision: str) -> str:
    """Name of the registered model that holds compressed versions: ``<source>-<backend>-<precision>``."""
    return f"{source_name}-{backend}-{precision}"


def find_existing(client: Any, name: str, source: SourceVersion, recipe_hash: str) -> str | None:
    """Version of ``name`` already registered from this source version and recipe, if any."""
    from mlflow.exceptions import MlflowException

    escaped = name.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    for mv in versions:
        tags = mv.tags or {}
        if (
            tags.get(TAG + "source_name") == source.name
            and tags.get(TAG + "source_version") == source.version
            and tags.get(TAG + "recipe_hash") == recipe_hash
        ):
            return str(mv.version)
    return None


def tags_to_strings(values: Mapping[str, object]) -> dict[str, str]:
    out = {}
    for k, v in values.items():
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def all_pages(search: Any) -> list[Any]:
    """Every item of a paged MLflow listing (``search_*``, ``list_webhooks``), following its page tokens."""
    items: list[Any] = []
    token = None
    while True:
        page = search(page_token=token) if token else search()
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items
