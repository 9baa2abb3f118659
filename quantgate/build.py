"""Building a candidate where it can be stopped: a spawned worker process, killed when a build overruns its deadline.

NNCF's quantization and accuracy control and ONNX Runtime's calibration run in C++ and in library loops that never
look at a clock: a cooperative deadline only stops them between the steps that check it (accuracy control once ran
over 20 minutes against a 10-minute budget). A process can always be stopped. One worker serves every build of a run
(its imports are paid once) and is replaced after it was killed.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from quantgate.errors import (
    BackendError,
    BackendUnavailable,
    InfrastructureError,
    QuantgateError,
    infrastructure_cause,
)
from quantgate.model import ModelInfo
from quantgate.plugins.base import (
    Backend,
    Calibration,
    Candidate,
    FineTunes,
    Recipe,
    TunesAccuracy,
    fresh_backend,
    set_build_progress,
)
from quantgate.sensitivity import AccuracyControl

log = logging.getLogger(__name__)


class BuildTimeout(QuantgateError):
    """A build ran past its deadline and its worker was stopped."""


CRASH_SIGNALS = frozenset(int(s) for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT))


class WorkerDied(InfrastructureError):
    """The worker process died during a call: killed, out of memory, or a crash in native code."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def crashed(self) -> bool:
        """Died of a fault in its own code (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT), not killed from outside
        (SIGKILL: the kernel's out-of-memory killer, an operator) nor exited."""
        return self.exit_code is not None and -self.exit_code in CRASH_SIGNALS

    def describe(self) -> str:
        """How it died, in words: ``signal 11 (SIGSEGV)`` or ``exit status 1``."""
        code = self.exit_code
        if code is None:
            return "an unknown exit status"
        if code < 0:
            try:
                return f"signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"signal {-code}"
        return f"exit status {code}"


@dataclass(frozen=True)
class BuildJob:
    backend: str
    model: ModelInfo
    recipe: Recipe
    calibration: Calibration
    workdir: Path
    tuning: AccuracyControl | None = None
    qat: object | None = None  # a quantgate.qat.QatJob for quantization-aware recipes


def build(job: BuildJob, backend: Backend | None = None) -> Candidate:
    """Run one recipe's compress step in this process: the worker's call, or the run's own ``backend`` in-process."""
    backend = backend or fresh_backend(job.backend)
    if job.tuning is not None and isinstance(backend, TunesAccuracy):
        t = job.tuning
        backend.configure_accuracy_control(
            t.validation, t.metric, t.max_drop, t.time_budget_s, limit=t.limit, caveat=t.caveat
        )
    if job.qat is not None and isinstance(backend, FineTunes):
        backend.configure_qat(job.qat)
    return backend.compress(job.model, job.recipe, job.calibration, job.workdir)


def _serve(conn: Connection) -> None:
    """The worker's loop: (function, argument) in, ("ok", value) or ("error", kind, message) out, until None;
    ("progress", text) on the way, when a long build reports how far it got."""
    set_build_progress(lambda text: conn.send(("progress", text)))
    while True:
        item = conn.recv()
        if item is None:
            return
        fn, arg = item
        try:
            conn.send(("ok", fn(arg)))
        except (BackendError, BackendUnavailable) as exc:
            # The cause chain does not survive the pipe: classify here, where it is still there.
            cause = infrastructure_cause(exc)
            conn.send(("error", "infra", f"{cause}: {exc}") if cause else ("error", "backend", str(exc)))
        except BaseException as exc:  # anything else is not the recipe's verdict: the parent re-raises it
            conn.send(("error", "crash", f"{type(exc).__name__}: {exc}"))


class BuildWorker:
    """A spawned process that builds candidates one at a time; ``close()`` when the run is done."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._conn is None or self._proc is None or not self._proc.is_alive():
            ctx = mp.get_context("spawn")  # never fork a process that runs Prefect's and ONNX Runtime's threads
            parent, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="quantgate-build")
            self._proc.start()
            child.close()
            self._conn = parent
        return self._conn

    def run(self, job: BuildJob, timeout_s: float, on_progress: Callable[[str], None] | None = None) -> Candidate:
        """The candidate, or ``BackendError`` for the recipe's own failure, or ``BuildTimeout`` past ``timeout_s``."""
        candidate: Candidate = self.call(build, job, timeout_s, what=job.recipe.name, on_progress=on_progress)
        return candidate

    def call(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        timeout_s: float,
        *,
        what: str,
        on_progress: Callable[[str], None] | None = None,
    ) -> Any:
        """``fn(arg)`` in the worker (both picklable), stopped past ``timeout_s``."""
        conn = self._start()
        started = time.monotonic()
        conn.send((fn, arg))
        while True:
            left = timeout_s - (time.monotonic() - started)
            # No budget (an exhaustive search) is an infinite timeout, which poll() cannot take: it waits unbounded.
            if not conn.poll(None if math.isinf(left) else max(left, 0.0)):
                self.kill()
                raise BuildTimeout(
                    f"{what} was stopped after {time.monotonic() - started:.1f} s: it ran past the "
                    f"{timeout_s:.1f} s left in the search budget"
                )
            try:
                reply = conn.recv()
            except EOFError:  # the worker died: killed, out of memory, a crash in native code. No verdict on it.
                code = None
                if self._proc is not None:  # the pipe closes before the process is reaped: wait for its status
                    self._proc.join(timeout=5.0)
                    code = self._proc.exitcode
                self.kill()
                raise WorkerDied(f"building {what}: the build process died (exit status {code})", code) from None
            if reply[0] != "progress":
                break
            if on_progress is not None:
                on_progress(str(reply[1]))
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        if kind == "backend":
            raise BackendError(message)
        raise InfrastructureError(f"building {what} crashed: {message}")

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except OSError:
                pass
        self.kill()

    def __enter__(self) -> BuildWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
