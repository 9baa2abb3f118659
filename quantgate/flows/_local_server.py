"""Entry point of the quantgate-managed local Prefect server (``python -m quantgate.flows._local_server``).

Serves Prefect's own server app (``prefect.server.api.server:create_app``, as Prefect's
``SubprocessASGIServer`` does) with uvicorn on 127.0.0.1, and exits by itself once no HTTP or
websocket connection has been seen for ``--idle-timeout`` seconds, or once ``--state-file`` no
longer names it (an orphan nobody can find). Started and found by
:mod:`quantgate.flows.prefect_server`; not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp, Receive, Scope, Send

# Exit status when the port is taken, so the starter retries on another port. Not 3: uvicorn exits
# with 3 on any start-up failure (a broken database too), which must not be retried.
EXIT_PORT_IN_USE = 75
HOST = "127.0.0.1"


class ActivityTracker:
    """ASGI middleware that records when the server last saw a connection and how many are open.

    Open connections count as activity: a flow run keeps Prefect's events websocket open for as
    long as it runs, and the server must not go away under it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last_activity = time.monotonic()
        self.open_connections = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.open_connections += 1
        self.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.open_connections -= 1
            self.last_activity = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last connection closed; 0 while any is open."""
        if self.open_connections:
            return 0.0
        return time.monotonic() - self.last_activity


def _owns(state_file: Path | None) -> bool:
    """True while the state file names this process (always, when run without one)."""
    if state_file is None:
        return True
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("pid") == os.getpid()


async def _watch(server: uvicorn.Server, tracker: ActivityTracker, idle_s: float, state_file: Path | None) -> None:
    """Stop the server once idle for ``idle_s`` seconds, or once nothing can find it any more.

    The second case is an orphan: its home was deleted or its state file replaced, so no command will
    ever use it again. Checked only once serving: the starter writes the file right after spawning us.
    """
    while not server.started:
        await asyncio.sleep(0.1)
    # Start-up (database migrations) can take seconds; idle time counts from when we serve.
    tracker.last_activity = time.monotonic()
    poll_s = min(1.0, max(idle_s / 4, 0.05))
    while True:
        if tracker.idle_for() >= idle_s:
            reason = f"idle for {idle_s:g} s"
            break
        if not _owns(state_file):
            reason = f"{state_file} no longer names this process"
            break
        await asyncio.sleep(poll_s)
    print(f"quantgate local Prefect server: {reason}, exiting", file=sys.stderr)
    server.should_exit = True


async def _serve(
    server: uvicorn.Server,
    sock: socket.socket,
    tracker: ActivityTracker,
    idle_s: float,
    state_file: Path | None,
) -> None:
    watchdog = asyncio.create_task(_watch(server, tracker, idle_s, state_file))
    try:
        await server.serve(sockets=[sock])
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def _remove_own_state_file(state_file: Path | None) -> None:
    """Remove the state file if it still names this process (a successor may own it by now)."""
    if state_file is not None and _owns(state_file):
        state_file.unlink(missing_ok=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantgate.flows._local_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=1800.0, help="seconds without requests")
    parser.add_argument("--state-file", type=Path, default=None, help="removed on exit if it names us")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until idle, orphaned or terminated; return the exit status."""
    args = _parse_args(argv)
    try:
        # Bind before the slow Prefect import, so a taken port fails in milliseconds.
        sock = _bind(args.port)
    except OSError as exc:
        print(f"cannot bind {HOST}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE

    import uvicorn
    from prefect.server.api.server import create_app

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler it found: make that
    # an exception rather than the default kill, so the state file is still removed below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        tracker = ActivityTracker(create_app(final=True))
        config = uvicorn.Config(
            tracker, log_level="error", lifespan="on", timeout_graceful_shutdown=5, access_log=False
        )
        server = uvicorn.Server(config)
        asyncio.run(_serve(server, sock, tracker, args.idle_timeout, args.state_file))
    finally:
        sock.close()
        _remove_own_state_file(args.state_file)
    # uvicorn exits with status 3 itself when the app's start-up (database migrations) fails.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
