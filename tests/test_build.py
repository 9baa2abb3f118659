"""Builds run in a worker process that the search budget can stop."""

import time

import pytest

from quantgate.build import BuildTimeout, BuildWorker
from quantgate.errors import BackendError, InfrastructureError


def test_the_budget_stops_a_step_that_runs_long_and_the_worker_comes_back() -> None:
    with BuildWorker() as worker:
        assert worker.call(abs, -3, 60, what="warm-up") == 3  # the worker's start is not what is timed below
        started = time.monotonic()
        with pytest.raises(BuildTimeout, match=r"slow-recipe was stopped after 1\.\d s: it ran past the 1\.0 s left"):
            worker.call(time.sleep, 30, 1.0, what="slow-recipe")
        assert time.monotonic() - started < 5  # stopped, not waited for
        assert worker.call(abs, -4, 60, what="next") == 4  # a fresh worker serves the next build


def test_a_failing_build_is_the_recipes_failure_and_a_crash_is_not() -> None:
    with BuildWorker() as worker:
        with pytest.raises(BackendError, match="not an int"):
            worker.call(_backend_error, "not an int", 60, what="bad")
        with pytest.raises(InfrastructureError, match="crashed: ZeroDivisionError"):
            worker.call(_divide, 0, 60, what="crash")


def test_a_build_process_that_dies_or_runs_out_of_disk_is_an_infrastructure_failure_not_a_verdict() -> None:
    with BuildWorker() as worker:
        with pytest.raises(InfrastructureError, match=r"the build process died \(exit status -9\)"):
            worker.call(_die, 0, 60, what="killed")
        with pytest.raises(InfrastructureError, match="No space left on device"):
            worker.call(_disk_full, 0, 60, what="full")
        assert worker.call(abs, -5, 60, what="after") == 5


def _die(_: int) -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _disk_full(_: int) -> None:
    import errno

    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/calibration.onnx")
    except OSError as exc:
        raise BackendError("int8-static failed: cannot write the model") from exc


def _backend_error(message: str) -> None:
    raise BackendError(message)


def _divide(x: int) -> float:
    return 1 / x


def test_a_build_without_a_budget_waits_for_its_result() -> None:
    with BuildWorker() as worker:
        assert worker.call(abs, -3, float("inf"), what="unbounded") == 3
