"""Stand the automation up on existing servers: the Prefect work pool and deployments, the MLflow webhook."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from quantgate.automation.config import AutomationConfig
from quantgate.automation.webhooks import HANDLED_KINDS
from quantgate.errors import InputError
from quantgate.registry import all_pages, flow_tracking_uri
from quantgate.targets import deployment_name

log = logging.getLogger("quantgate.automation")

WEBHOOK_NAME = "quantgate"


def ensure_pool(name: str, concurrency_limit: int | None) -> None:
    """A process work pool with this concurrency limit (created, or updated in place)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    concurrency_limit=concurrency_limit,
                )
            )
            return
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def deploy(config: AutomationConfig, tracking_uri: str) -> list[str]:
    """Create or update the ``compress-model`` and ``nightly`` deployments in the configured pool, and a
    ``compress-step/<pool>`` deployment in each target pool the rules' policies name."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from quantgate.flows.compress import compress_model
    from quantgate.flows.nightly import nightly
    from quantgate.flows.step import compress_step

    pool = config.pool.name
    ensure_pool(pool, config.pool.concurrency_limit)
    # Module-path entrypoints: workers import the installed quantgate package, no source checkout to pull.
    compress: Any = compress_model.to_deployment(
        name="compress-model",
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"tracking_uri": flow_tracking_uri(tracking_uri), "tag_failures": True},
        description="Compress one registered model version (started by the webhook bridge and by nightly)",
        tags=["quantgate"],
    )
    reconcile: Any = nightly.to_deployment(
        name="nightly",
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        schedules=[Cron(config.nightly.cron, timezone=config.nightly.timezone)],
        parameters={"config": config.inlined(), "tracking_uri": flow_tracking_uri(tracking_uri)},
        description="Reconcile the registry: a compress-model run for every selected version without a result",
        tags=["quantgate"],
    )
    ids: list[str] = []
    for deployment in (compress, reconcile):
        applied: Any = deployment.apply(work_pool_name=pool)  # sync outside an event loop
        ids.append(str(applied))
    log.info("deployments compress-model/compress-model and nightly/nightly in work pool %s", pool)
    for target_pool in config.target_pools():
        ensure_pool(target_pool, config.step_limit(target_pool))
        step: Any = compress_step.to_deployment(
            name=target_pool,
            work_pool_name=target_pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"Compress and validate one run's backends on the hardware of pool {target_pool}",
            tags=["quantgate", "step"],
        )
        ids.append(str(step.apply(work_pool_name=target_pool)))
        log.info("deployment %s in work pool %s", deployment_name(target_pool), target_pool)
    return ids


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
