"""The webhook bridge's handler: an MLflow registry event in, a Prefect flow run (or a reason to ignore it) out."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from quantgate.automation import dispatch
from quantgate.automation.config import AutomationConfig
from quantgate.automation.webhooks import BridgeSettings, HandleResult, WebhookEvent, create_app
from quantgate.errors import PolicyError
from quantgate.files import private_dir

log = logging.getLogger("quantgate.webhooks")


class Dispatcher:
    """Called by the bridge for every verified, first-seen delivery."""

    def __init__(self, config: AutomationConfig, tracking_uri: str) -> None:
        self.config = config
        self.tracking_uri = tracking_uri

    def __call__(self, event: WebhookEvent) -> HandleResult:
        if event.version is None:
            return HandleResult("ignored", f"{event.kind} without a model version")
        if event.kind == "model_version_tag.set" and not dispatch.relevant_tag(self.config, event.key or ""):
            return HandleResult("ignored", f"tag {event.key} does not change what is compressed")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(self.tracking_uri)
        try:
            decision = dispatch.consider(client, self.config, self.tracking_uri, event.name, event.version)
        except MlflowException as exc:
            # Deleted since, or never there (MLflow's test delivery names "example_model"): nothing to retry.
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return HandleResult("ignored", f"models:/{event.name}/{event.version} does not exist")
            raise
        status: Literal["started", "ignored"] = "started" if decision.status == "started" else "ignored"
        return HandleResult(status, decision.detail, decision.flow_run_id)


# Values the deployment templates ship with (deploy/k8s/secret.example.yaml, deploy/.env.example): never a secret.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change_me", "replace-me", "replaceme", "secret", "password",
                                 "xxx", "todo", "example", "<secret>", "your-secret"})  # fmt: skip
MIN_SECRET_CHARS = 16


def check_secret(secret: str) -> str:
    """The webhook secret, unless it is missing, a template's placeholder or too short to resist guessing."""
    if not secret:
        raise PolicyError("QUANTGATE_WEBHOOK_SECRET is not set: the bridge refuses to run without a signing secret")
    if secret.strip().lower() in PLACEHOLDER_SECRETS or secret.startswith("<"):
        raise PolicyError(
            "QUANTGATE_WEBHOOK_SECRET is a placeholder from a template; generate one: "
            'python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise PolicyError(f"QUANTGATE_WEBHOOK_SECRET is shorter than {MIN_SECRET_CHARS} characters")
    return secret


def _env_number(name: str, default: float, *, integer: bool = False) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise PolicyError(f"{name} must be {kind}, got {text[:40]!r}") from None
    if not 0 < value < 1e12:
        raise PolicyError(f"{name} must be positive, got {text[:40]!r}")
    return value


def settings_from_env() -> BridgeSettings:
    secret = check_secret(os.environ.get("QUANTGATE_WEBHOOK_SECRET", ""))
    home = Path(os.environ.get("QUANTGATE_HOME", Path.home() / ".quantgate"))
    db = Path(os.environ.get("QUANTGATE_WEBHOOK_DB", home / "webhooks.db"))
    private_dir(db.parent)
    try:
        return BridgeSettings(
            secret=secret,
            dedupe_db=db,
            max_body_bytes=int(_env_number("QUANTGATE_WEBHOOK_MAX_BODY_BYTES", 1_048_576, integer=True)),
            claim_lease_s=_env_number("QUANTGATE_WEBHOOK_CLAIM_LEASE_S", 300.0),
            retention_s=_env_number("QUANTGATE_WEBHOOK_RETENTION_S", 7 * 86_400.0),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise PolicyError(f"invalid bridge setting {where}: {first['msg']}") from None


def make_app(config: AutomationConfig, tracking_uri: str) -> Any:
    return create_app(settings_from_env(), Dispatcher(config, tracking_uri))
