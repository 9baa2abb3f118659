"""The Prefect side of the automation: the work pools and the deployments of quantgate's flows.

Here, not in ``automation/``, because it imports the flows it deploys, and the nightly flow imports the automation's
reconciliation: automation never imports flows (an import contract keeps it so).
"""

from __future__ import annotations

import logging
from typing import Any

from quantgate.automation.config import AutomationConfig
from quantgate.registry import flow_tracking_uri
from quantgate.targets import deployment_name

log = logging.getLogger("quantgate.automation")


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
