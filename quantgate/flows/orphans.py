"""Flow runs whose process died: a ``quantgate compress`` killed with SIGKILL has no worker to report it, so its
flow run would stay RUNNING in the Prefect server's database for ever.

Each compress and step flow run carries its owner (host, pid, process start time: ``quantgate.processes``) as a
tag; the next run on the same host marks the RUNNING runs whose owner is dead CRASHED. Runs owned by another host
are left alone (their liveness cannot be told here; a worker's runs are Prefect's to mark).
"""

from __future__ import annotations

import logging
from uuid import UUID

from quantgate import processes

log = logging.getLogger("quantgate")

OWNER_TAG = "quantgate-owner:"
# Enough for any realistic backlog of killed runs; the sweep is best effort and runs again with the next run.
SWEEP_LIMIT = 200


def owner_of(tags: list[str]) -> processes.Owner | None:
    raw = next((t[len(OWNER_TAG) :] for t in tags if t.startswith(OWNER_TAG)), None)
    return processes.Owner.from_json(raw) if raw is not None else None


def claim_current_run() -> None:
    """Tag the flow run this code runs in with this process as its owner. Never raises: no tag, no sweep."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(str(run_id)))
            tags = [t for t in run.tags if not t.startswith(OWNER_TAG)]
            client.update_flow_run(run.id, tags=[*tags, OWNER_TAG + processes.me().to_json()])
    except Exception as exc:  # bookkeeping only: the run itself goes on
        log.warning("could not tag flow run %s with its owner: %s", run_id, exc)


def crash_dead_runs() -> list[UUID]:
    """Mark CRASHED every RUNNING flow run whose owner process on this host is dead; returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    crashed: list[UUID] = []
    try:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=running, limit=SWEEP_LIMIT):
                owner = owner_of(list(run.tags))
                if owner is None or owner.alive() is not False:
                    continue
                message = f"its process (pid {owner.pid} on {owner.host}) died without reporting; found by quantgate"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(run.id)
                log.info("flow run %s was left RUNNING by a dead process: marked CRASHED", run.id)
    except Exception as exc:
        log.warning("could not check for flow runs left RUNNING by dead processes: %s", exc)
    return crashed
