"""Point MLflow at the automation: the registry webhook that calls the bridge (the Prefect deployments are
``quantgate.flows.deployments``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from quantgate.automation.webhooks import HANDLED_KINDS
from quantgate.errors import InputError
from quantgate.registry import all_pages

log = logging.getLogger("quantgate.automation")

WEBHOOK_NAME = "quantgate"


def register_webhook(client: Any, url: str, secret: str) -> str:
    """Point MLflow's registry webhooks at the bridge: create the new webhook, have MLflow send it a test delivery,
    and only then delete earlier quantgate webhooks. A URL MLflow refuses or a bridge that does not answer leaves the
    working webhook in place. MLflow's errors become one ``InputError`` line."""
    from mlflow.exceptions import MlflowException

    from quantgate.automation.bridge import check_secret

    check_secret(secret)
    try:
        earlier = [h for h in all_pages(client.list_webhooks) if h.name == WEBHOOK_NAME]
        hook = client.create_webhook(
            name=WEBHOOK_NAME,
            url=url,
            events=sorted(HANDLED_KINDS),  # exactly what the bridge acts on
            secret=secret,
            description="quantgate: compress new model versions",
        )
    except MlflowException as exc:
        raise InputError(f"MLflow refused the webhook for {url}: {_first_line(exc)}") from None
    try:
        test = client.test_webhook(hook.webhook_id)
    except MlflowException as exc:
        test = None
        why = _first_line(exc)
    else:
        why = test.error_message or f"it answered {test.response_status}"
    if test is None or not test.success:
        with contextlib.suppress(MlflowException):
            client.delete_webhook(hook.webhook_id)
        kept = f"; the existing webhook {earlier[0].webhook_id} was kept" if earlier else ""
        raise InputError(f"the bridge at {url} did not accept MLflow's test delivery ({_first_line(why)}){kept}")
    for old in earlier:
        client.delete_webhook(old.webhook_id)
    return str(hook.webhook_id)


def _first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
