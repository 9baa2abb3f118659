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
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from quantgate.errors import InfrastructureError, InputError, InvalidModel, ModelNotFound, TrackingUnavailable
from quantgate.redact import has_credentials, is_redacted, redact

log = logging.getLogger(__name__)

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


def flow_tracking_uri(uri: str) -> str:
    """What a flow-run parameter may carry: the URI with its credentials masked (they stay in the environment)."""
    return redact(uri)


def resolve_tracking_uri(given: str | None) -> str:
    """The tracking URI a flow run uses: its parameter, with masked credentials taken from ``MLFLOW_TRACKING_URI``.

    Prefect stores flow-run parameters in its database and shows them in its UI, so credentials never travel in
    them: callers pass :func:`flow_tracking_uri` and keep the full URI in this process's environment.
    """
    import os

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if not given:
        return env or "sqlite:///mlflow.db"
    if is_redacted(given):
        if env and redact(env) == given:
            return env
        raise InputError(
            f"the tracking URI {given} has its credentials masked and this process's MLFLOW_TRACKING_URI does not "
            "hold them: set MLFLOW_TRACKING_URI to the full URI in the worker's environment"
        )
    if has_credentials(given):
        raise InputError(
            f"the tracking URI {redact(given)} carries credentials in a flow-run parameter (Prefect would store "
            "them): pass them through MLFLOW_TRACKING_URI or MLFLOW_TRACKING_USERNAME/PASSWORD instead"
        )
    return given


def check_tracking_uri(uri: str, *, create: bool = False) -> None:
    """Refuse a tracking URI MLflow cannot use, before anything is created: an unknown scheme, a SQLite file that
    is not there (``create``: only its directory must exist), a directory store that does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    shown = redact(uri)
    try:
        _tracking_store_registry.get_store_builder(uri)  # type: ignore[no-untyped-call]
    except MlflowException:
        schemes = sorted(s for s in _tracking_store_registry._registry if s)
        raise InputError(
            f"tracking URI {shown}: MLflow has no store for this scheme (it knows {', '.join(schemes)})"
        ) from None
    if uri in ("databricks", "databricks-uc", "uc"):
        return
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri, shown, create=create)
    elif scheme in ("", "file") and not create:
        path = Path(url2pathname(urlparse(uri).path)) if scheme == "file" else Path(uri)
        if not path.is_dir():
            raise InputError(f"tracking URI {shown}: no MLflow file store at {path}")


def _check_sqlite(uri: str, shown: str, *, create: bool) -> None:
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # sqlalchemy raises ArgumentError and ValueError for malformed URLs
        raise InputError(f"tracking URI {shown} is not a valid SQLite URL") from None
    if not database or database == ":memory:":
        return
    path = Path(database)
    if not path.parent.is_dir():
        raise InputError(f"tracking URI {shown}: the directory {path.parent} does not exist")
    if not create and not path.is_file():
        raise InputError(f"tracking URI {shown}: no MLflow database at {path}")


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
    """The server answers, and is an MLflow tracking server (``/health`` says OK and ``/version`` a version).

    MLflow's REST client retries for minutes on a dead server; a user deserves an answer in seconds.
    """
    shown = redact(uri)
    base, headers = _without_userinfo(uri.rstrip("/"))
    status, body = _get(base + "/health", headers, shown)
    if status >= 500:
        raise InfrastructureError(f"MLflow tracking server at {shown} answered {status}")
    if status != 200 or body.strip() != b"OK":
        raise InputError(f"{shown} is not an MLflow tracking server (GET /health answered {status})")
    status, body = _get(base + "/version", headers, shown)
    # The version route sits behind MLflow's authentication when it is on; /health never does.
    if status in (401, 403):
        return
    if status >= 500:
        raise InfrastructureError(f"MLflow tracking server at {shown} answered {status}")
    if status != 200 or not re.fullmatch(rb"\d+\.\d+[^\s]*", body.strip()):
        raise InputError(f"{shown} is not an MLflow tracking server (GET /version answered {status})")


def _get(url: str, headers: dict[str, str], shown: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status), resp.read(256)
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"cannot reach the MLflow tracking server at {shown}: {reason}") from None


def _without_userinfo(uri: str) -> tuple[str, dict[str, str]]:
    """The URL urllib can open, and the credentials MLflow's client would send (URI userinfo, then env)."""
    import base64
    import os

    parts = urlparse(uri)
    user, password = parts.username, parts.password
    if user is None and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    headers: dict[str, str] = {}
    if user is not None:
        token = base64.b64encode(f"{unquote(user)}:{unquote(password or '')}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl(), headers


def is_outage(exc: BaseException) -> bool:
    """Whether an MLflow client failure is the server's (5xx, refused or dropped connections), not the request's."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, TrackingUnavailable | InfrastructureError):
        return True
    if isinstance(exc, MlflowException):
        status = getattr(exc, "get_http_status_code", lambda: 500)()
        if getattr(exc, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") and status >= 500:
            return True
    text = str(exc)
    return any(
        s in text
        for s in ("Max retries exceeded", "Connection refused", "Connection aborted", "Connection reset",
                  "RemoteDisconnected", "too many 5", " 502", " 503", " 504", "500 error responses")
    )  # fmt: skip


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
