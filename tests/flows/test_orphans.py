"""Flow runs left RUNNING by a killed process are marked CRASHED by the next run (real Prefect test harness)."""

from __future__ import annotations

import subprocess
import sys
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Completed, Running

from quantgate import processes
from quantgate.flows import orphans

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow(name="quantgate-orphan-test")
def _claims() -> str:
    from prefect.runtime import flow_run

    orphans.claim_current_run()
    return str(flow_run.get_id())


@flow(name="quantgate-orphan-test")
def _placeholder() -> None:  # only its name is used: runs are created with a state, never executed
    return None


def _dead_owner() -> processes.Owner:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = processes.of(proc.pid)
    proc.kill()
    proc.wait()
    assert owner is not None and owner.alive() is False
    return owner


def _running(owner: processes.Owner | None) -> UUID:
    tags = ["quantgate"] + ([orphans.OWNER_TAG + owner.to_json()] if owner else [])
    with get_client(sync_client=True) as client:
        return client.create_flow_run(_placeholder, state=Running(), tags=tags).id


def _state(run_id: UUID) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        assert state is not None
        return str(state.type.value)


def test_a_run_tags_itself_with_its_owner() -> None:
    run_id = _claims()
    with get_client(sync_client=True) as client:
        tags = list(client.read_flow_run(UUID(run_id)).tags)
    assert orphans.owner_of(tags) == processes.me()


def test_only_runs_whose_owner_died_are_marked_crashed() -> None:
    dead, alive, unowned = _running(_dead_owner()), _running(processes.me()), _running(None)
    elsewhere = processes.Owner("another-host.invalid", 1, 1.0)
    remote = _running(elsewhere)

    crashed = orphans.crash_dead_runs()

    assert dead in crashed and {alive, unowned, remote}.isdisjoint(crashed)
    assert _state(dead) == "CRASHED"
    assert {_state(r) for r in (alive, unowned, remote)} == {"RUNNING"}
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(dead).state
    assert state is not None and "died without reporting" in str(state.message)
    assert orphans.crash_dead_runs() == []  # nothing left to mark
    with get_client(sync_client=True) as client:  # the session's harness is shared: leave nothing RUNNING
        for run_id in (alive, unowned, remote):
            client.set_flow_run_state(run_id, Completed(), force=True)
