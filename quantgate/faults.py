"""Fault injection for the fault suite (tests/faults/): ``QUANTGATE_FAULT_KILL_AT=<point>`` makes the process
SIGKILL itself when it reaches that point, a real process death (no ``finally``, no ``atexit``), at an exact step;
``QUANTGATE_FAULT_FAIL_AT=<point>`` raises ``InjectedFault`` there instead (a failure the process survives);
``QUANTGATE_FAULT_SEGV_AT=<point>`` sends it SIGSEGV, the death of a crash in a runtime's native code.

Points: ``parent_created`` (the parent run exists), ``candidates_logged``, ``registration_started`` (the lock is
held and the journal open), ``model_created``, ``version_created``, ``alias_set``, ``run_recorded`` (result.json
and the parent's tags), ``source_tagged``, ``committed`` (before the run is closed); and the bridge's
``delivery_claimed`` (between claiming a delivery id and handing it off); ``candidate_trial`` (a candidate's
first calls, in the build worker). ``QUANTGATE_FAULT_BARRIER_AT=<point>:<folder>:<n>`` holds the process at that
point until ``n`` processes have reached it (each leaves a file named after its pid in ``folder``; at most 120 s):
two runs that must overlap, whatever the host's speed and the workers' polling. Unset, these cost one environment
lookup each.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "QUANTGATE_FAULT_KILL_AT"
FAIL_ENV = "QUANTGATE_FAULT_FAIL_AT"
SEGV_ENV = "QUANTGATE_FAULT_SEGV_AT"
BARRIER_ENV = "QUANTGATE_FAULT_BARRIER_AT"
BARRIER_WAIT_S = 120.0
REGISTRATION_POINTS = (
    "parent_created",
    "candidates_logged",
    "registration_started",
    "model_created",
    "version_created",
    "alias_set",
    "run_recorded",
    "source_tagged",
    "committed",
)


class InjectedFault(RuntimeError):
    """The failure ``QUANTGATE_FAULT_FAIL_AT`` asked for."""


def point(name: str) -> None:
    """Die, or fail, here if the fault suite asked for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FAIL_ENV) == name:
        raise InjectedFault(f"injected failure at {name}")
    if os.environ.get(SEGV_ENV) == name:
        os.kill(os.getpid(), signal.SIGSEGV)
    barrier = os.environ.get(BARRIER_ENV)
    if barrier and barrier.split(":", 1)[0] == name:
        _wait_for_others(barrier)


def _wait_for_others(spec: str) -> None:
    folder, count = spec.split(":", 1)[1].rsplit(":", 1)
    here = Path(folder)
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + BARRIER_WAIT_S
    while len(list(here.iterdir())) < int(count) and time.monotonic() < deadline:
        time.sleep(0.2)
