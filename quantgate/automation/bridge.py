"""The webhook bridge's handler: an MLflow registry event in, a Prefect flow run (or a reason to ignore it) out."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from quantgate.automation import dispatch
from quantgate.automation.config import AutomationConfig
from quantgate.automation.webhooks import BridgeSettings, HandleResult, WebhookEvent, create_app
from quantgate.errors import PolicyError

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

        client = MlflowClient(self.tracking_uri)
        decision = dispatch.consider(client, self.config, self.tracking_uri, event.name, event.version)
        status: Literal["started", "ignored"] = "started" if decision.status == "started" else "ignored"
        return HandleResult(status, decision.detail, decision.flow_run_id)


def settings_from_env() -> BridgeSettings:
    secret = os.environ.get("QUANTGATE_WEBHOOK_SECRET", "")
    if not secret:
        raise PolicyError("QUANTGATE_WEBHOOK_SECRET is not set: the bridge refuses to run without a signing secret")
    home = Path(os.environ.get("QUANTGATE_HOME", Path.home() / ".quantgate"))
    db = Path(os.environ.get("QUANTGATE_WEBHOOK_DB", home / "webhooks.db"))
    db.parent.mkdir(parents=True, exist_ok=True)
    max_body = int(os.environ.get("QUANTGATE_WEBHOOK_MAX_BODY_BYTES", 1_048_576))
    return BridgeSettings(secret=secret, dedupe_db=db, max_body_bytes=max_body)


def make_app(config: AutomationConfig, tracking_uri: str) -> Any:
    return create_app(settings_from_env(), Dispatcher(config, tracking_uri))
