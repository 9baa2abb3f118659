"""A run's temporary directory, removed on every exit path: normal return, exception, SIGTERM (the CLI and the
worker turn it into an exception), and SIGKILL, where nothing in the process can run: the next run on the host
removes the directories whose owner (``.owner``) is dead."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantgate import processes

log = logging.getLogger("quantgate")

PREFIX = "quantgate-run-"
OWNER = ".owner"


def sweep(base: Path | None = None) -> list[Path]:
    """Remove the run directories under ``base`` (the temporary directory) whose process is dead."""
    removed = []
    for path in (base or Path(tempfile.gettempdir())).glob(PREFIX + "*"):
        try:
            owner = processes.Owner.from_json((path / OWNER).read_text())
        except OSError:
            continue  # being created right now, or not ours
        if owner is not None and owner.alive() is False:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary director%s left by dead runs", len(removed), "y" if len(removed) == 1 else "ies")
    return removed


@contextlib.contextmanager
def run_workdir() -> Iterator[Path]:
    """A fresh directory for one run; while it is open, every temporary file of the process (MLflow's uploads and
    downloads included) is created inside it, so nothing is left in the system's temporary directory."""
    sweep()
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    previous = tempfile.tempdir
    try:
        (path / OWNER).write_text(processes.me().to_json())
        (path / "tmp").mkdir()
        tempfile.tempdir = str(path / "tmp")
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)
