"""The parent flow's side of target pools: start a backend group's step in its pool, wait for it, say how it ended.

Prefect calls only; what the step produced comes back through MLflow (the parent run's ``steps/<pool>.json``),
which every worker can reach, not through Prefect result storage, which would need storage shared by all pools.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from quantgate.targets import deployment_name

log = logging.getLogger("quantgate")

_FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED", "CANCELLING")


@dataclass(frozen=True)
class StepRun:
    pool: str
    flow_run_id: str | None
    error: str | None = None  # why the step could not even be started


def current_pool() -> str | None:
    """The work pool this flow run was picked up from; ``None`` outside a worker (CLI, tests, ephemeral runs)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        return None
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).work_pool_name
    return str(name) if name else None


def start(pool: str, parameters: dict[str, Any], key: str) -> StepRun:
    """Create the step's flow run in its pool (as a subflow of this run) and return without waiting."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run: Any = run_deployment(
            deployment_name(pool),
            parameters=parameters,
            timeout=0,
            idempotency_key=key,  # a retried parent re-attaches to the step it started
            tags=["quantgate", "step"],
        )
    except ObjectNotFound:
        why = f"no deployment {deployment_name(pool)} on the Prefect server: run `quantgate deploy` for pool {pool}"
        return StepRun(pool, None, why)
    log.info("step for pool %s: flow run %s", pool, run.id)
    return StepRun(pool, str(run.id))


def wait(step: StepRun, deadline: float, poll_s: float = 2.0) -> str | None:
    """Wait for the step's flow run until ``deadline`` (monotonic); ``None`` when it completed, else why not.

    A step that is still queued or running at the deadline is cancelled, so it cannot finish unseen later.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    if step.flow_run_id is None:
        return step.error or "the step was not started"
    run_id = UUID(step.flow_run_id)
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            kind = state.type.value if state is not None else "PENDING"
            if kind in _FINAL:
                if kind == "COMPLETED":
                    return None
                message = (state.message or "").strip() if state is not None else ""
                return f"the step in pool {step.pool} ended {state.name if state else kind}" + (
                    f": {message}" if message else ""
                )
            if time.monotonic() >= deadline:
                client.set_flow_run_state(run_id, Cancelling(), force=True)
                waiting = "no worker picked it up" if kind in ("SCHEDULED", "PENDING") else f"it was still {kind}"
                return f"no result from pool {step.pool} in time ({waiting}; is a worker polling {step.pool}?)"
            time.sleep(poll_s)
