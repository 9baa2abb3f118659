"""Who owns something a process left behind (an MLflow run, a temporary directory, a webhook claim, a stack
process), and whether that owner is still alive.

An owner is (host, pid, process start time): a pid alone is reused by the kernel, so a live process with the same
pid but another start time is not the owner. Liveness can only be checked on the same host; elsewhere the caller
falls back to a lease (a heartbeat older than some limit).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass

import psutil


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float  # psutil create_time, rounded to 0.01 s

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        try:
            raw = json.loads(text)
            return cls(str(raw["host"]), int(raw["pid"]), float(raw["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True or False on this host; ``None`` when it cannot be told (another host)."""
        if not self.here:
            return None
        return _started(self.pid) == self.started


def me() -> Owner:
    pid = os.getpid()
    started = _started(pid)
    assert started is not None
    return Owner(socket.gethostname(), pid, started)


def of(pid: int) -> Owner | None:
    """The owner record of a live process on this host, or ``None`` when there is no such process."""
    started = _started(pid)
    return None if started is None else Owner(socket.gethostname(), pid, started)


def _started(pid: int) -> float | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: dead
            return None
        return float(round(process.create_time(), 2))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's process: it exists, its start time is still readable on Linux
        return None
