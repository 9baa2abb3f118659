"""Fault injection for the fault suite (tests/faults/): ``QUANTGATE_FAULT_KILL_AT=<point>`` makes the process
SIGKILL itself when it reaches that point, a real process death (no ``finally``, no ``atexit``), at an exact step;
``QUANTGATE_FAULT_FAIL_AT=<point>`` raises ``InjectedFault`` there instead (a failure the process survives);
``QUANTGATE_FAULT_SEGV_AT=<point>`` sends it SIGSEGV, the death of a crash in a runtime's native code.

Points: ``parent_created`` (the parent run exists), ``candidates_logged``, ``registration_started`` (the lock is
held and the journal open), ``model_created``, ``version_created``, ``alias_set``, ``run_recorded`` (result.json
and the parent's tags), ``source_tagged``, ``committed`` (before the run is closed); and the bridge's
``delivery_claimed`` (between claiming a delivery id and handing it off); ``candidate_trial`` (a candidate's
first calls, in the build worker). Unset, it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "QUANTGATE_FAULT_KILL_AT"
FAIL_ENV = "QUANTGATE_FAULT_FAIL_AT"
SEGV_ENV = "QUANTGATE_FAULT_SEGV_AT"
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
