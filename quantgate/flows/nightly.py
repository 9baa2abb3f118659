"""The ``nightly`` Prefect flow: reconcile the registry so a missed webhook is caught by the next night."""

from __future__ import annotations

from typing import Any

from prefect import flow

from quantgate import registry
from quantgate.automation import dispatch
from quantgate.automation.config import AutomationConfig


@flow(name="nightly", persist_result=False, log_prints=False)
def nightly(config: dict[str, Any] | None = None, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Start a compress-model run for every selected version without a result for the current policy.

    ``config`` is the automation config with its policies inlined (``quantgate deploy`` writes it into the
    deployment's parameters), so the worker needs no files.
    """
    parsed = AutomationConfig.model_validate(config or {})
    uri = registry.resolve_tracking_uri(tracking_uri or parsed.tracking_uri)
    client = registry.connect(uri)
    return [vars(d) for d in dispatch.reconcile(client, parsed, uri)]
