"""Files that hold secrets or data others must not read (the stack's keys, the delivery store, Prefect's database):
created owner-only from the first byte, never written and then chmod-ed (another user could open it in between)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (created 0700; an existing one is tightened)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # not ours to change: leave it as its owner set it
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """An owner-only (0600) file at ``path``, created empty if missing (SQLite treats an empty file as a new
    database, and gives its -wal and -shm files the database file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # not a file at all: whoever opens it next reports that, with its own words
        return path
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def write_secret(path: Path, value: str) -> str:
    """Write ``value`` to a new 0600 file, or return what an earlier call wrote there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        private_file(path)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value
