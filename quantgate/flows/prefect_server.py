"""Where quantgate's Prefect flows get their API from, and how Prefect is kept quiet.

Why a quantgate-managed local server: with no ``PREFECT_API_URL``, Prefect 3 starts a temporary
server subprocess (``SubprocessASGIServer``) in every command and stops it at the end. Measured on
the 2-core development machine (load ~2 from other work; medians of 3), a fresh ``python`` process
that imports prefect and runs a trivial flow calling one task:

===================================================  ===================  =====
setup                                                first task starts    total
===================================================  ===================  =====
Prefect's temporary server (nothing set)             8.8 s (7.3-9.1)      9.8 s
quantgate's local server, already running            2.3 s (2.1-2.3)      3.3 s
quantgate's local server, this command starts it     7.4 s (7.2-7.7)      8.4 s
same, very first start (empty database, migrations)  15.3 s (13.9-16.1)   16.3 s
===================================================  ===================  =====

(From process start; "total" includes ~1 s Prefect spends joining its flow heartbeat thread.)
So a server start is paid once, by the first command after ``idle_timeout_s`` of inactivity;
every other command starts in about the time it takes to import prefect. The server keeps its own
SQLite database under ``$QUANTGATE_HOME/prefect`` (default ``~/.quantgate/prefect``), so flow and
task runs, with their logs, stay visible in its UI at ``http://127.0.0.1:<port>``.

Prefect reads its settings when it is imported, so :func:`configure_prefect_env` and
:func:`prefect_api_for_cli` must run before the first ``import prefect``; this module never
imports prefect.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from quantgate.errors import InputError, QuantgateError
from quantgate.files import private_dir, private_file
from quantgate.flows._local_server import EXIT_PORT_IN_USE, HOST

SERVER_MODULE = "quantgate.flows._local_server"
STARTUP_TIMEOUT_S = 60.0
_PORT_ATTEMPTS = 3

# Set before prefect is imported; users override any of them by setting it themselves.
PREFECT_ENV_DEFAULTS: dict[str, str] = {
    # The server's telemetry heartbeat writes a row to the SQLite database at start-up, racing the
    # server's own start-up writes, and logs a `sqlite3.OperationalError: database is locked`
    # traceback. This turns that service off (in Prefect's temporary server and in ours).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Client-side SDK analytics: no first-run notice on stderr, no background thread asking the
    # server for its analytics setting, no calls to prefect.io.
    "DO_NOT_TRACK": "1",
    # logging.yml's console handler (on the root logger) gets warnings and errors only. Flow and
    # task run INFO records ("Created flow run", "Finished in state Completed()") still reach the
    # API handler of `prefect.flow_runs` / `prefect.task_runs`, hence the UI.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    # Prefect's temporary server ("ephemeral" mode) is given 20 s by default; it took up to 16 s
    # on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


class LocalServerError(QuantgateError):
    """The quantgate-managed local Prefect server could not be started or reached."""


def configure_prefect_env() -> None:
    """Set quantgate's defaults for Prefect's settings in ``os.environ``, keeping any already set."""
    for name, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class _Paths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "server.json"

    @property
    def lock(self) -> Path:
        return self.root / "server.lock"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def database(self) -> Path:
        return self.root / "prefect.db"


def _paths(home: Path | None) -> _Paths:
    if home is None:
        home = Path(os.environ.get("QUANTGATE_HOME") or Path.home() / ".quantgate")
    root = home.expanduser().resolve() / "prefect"
    private_dir(root.parent)
    private_dir(root)
    return _Paths(root)


def _api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def _prefect_version() -> str:
    try:
        return metadata.version("prefect")
    except metadata.PackageNotFoundError:
        return "unknown"


def _read_state(paths: _Paths) -> dict[str, object] | None:
    try:
        state = json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    if not isinstance(state.get("port"), int):
        return None
    return state


def _write_state(paths: _Paths, state: dict[str, object]) -> None:
    tmp = paths.state.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(paths.state)


def _state_int(state: dict[str, object], key: str) -> int:
    value = state[key]
    assert isinstance(value, int)
    return value


def _is_healthy(port: int, timeout_s: float = 2.0) -> bool:
    # No proxies: an HTTP(S)_PROXY in the environment must not intercept a loopback health check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{_api_url(port)}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False


def _is_our_server(pid: int, paths: _Paths) -> bool:
    """True if ``pid`` is a live (not zombie) process running our server module for this home.

    Checking the command line keeps us from signalling an unrelated process that reused the pid.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = process.cmdline()
        return SERVER_MODULE in cmdline and str(paths.state) in cmdline
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _terminate(pid: int, timeout_s: float = 10.0) -> None:
    import psutil

    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        pass


@contextlib.contextmanager
def _locked(paths: _Paths, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file: one process at a time starts or stops the server."""
    with open(paths.lock, "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"timed out after {timeout_s:g} s waiting for the lock {paths.lock} held by another "
                        "quantgate process starting the local Prefect server"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _running_url(paths: _Paths) -> str | None:
    """The API URL of the healthy server of this prefect version the state file names, if any."""
    state = _read_state(paths)
    if state is None or state.get("prefect_version") != _prefect_version():
        return None
    port = _state_int(state, "port")
    # Our process, not just anything answering /api/health on a port that was ours once.
    if not _is_our_server(_state_int(state, "pid"), paths) or not _is_healthy(port):
        return None
    return _api_url(port)


def _wait_healthy(port: int, alive: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _is_healthy(port, timeout_s=1.0):
            return True
        if not alive():
            return False
        time.sleep(0.1)
    return False


def _discard_stale(paths: _Paths) -> None:
    """Stop the server the state file names, unless it turns healthy, and remove the file.

    A server still alive here was left starting by a command that was interrupted, or belongs to
    another prefect version, or hangs; we give the first kind time to finish starting.
    """
    state = _read_state(paths)
    if state is not None:
        pid = _state_int(state, "pid")
        same_version = state.get("prefect_version") == _prefect_version()
        if _is_our_server(pid, paths):
            port = _state_int(state, "port")
            if same_version and _wait_healthy(port, lambda: _is_our_server(pid, paths), STARTUP_TIMEOUT_S):
                return
            _terminate(pid)
    paths.state.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _server_env(paths: _Paths, port: int) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        # The managed server always uses its own database, whatever the user's shell points at; and it has no
        # business with MLflow's credentials.
        if not name.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_", "MLFLOW_"))
    }
    private_file(paths.database)  # flow-run parameters and logs live there: owner-only from the start
    for name, value in PREFECT_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    env.update(
        {
            "PREFECT_HOME": str(paths.root),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{paths.database}",
            # Its own address, so the UI it serves talks to it (the UI's default is port 4200).
            "PREFECT_API_URL": _api_url(port),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
        }
    )
    return env


def _spawn(paths: _Paths, port: int, idle_timeout_s: float, log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--port",
        str(port),
        "--idle-timeout",
        repr(float(idle_timeout_s)),
        "--state-file",
        str(paths.state),
    ]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=paths.root,
        env=_server_env(paths, port),
        # Its own session: Ctrl-C in the terminal of the command that started it must not stop it.
        start_new_session=True,
        close_fds=True,
    )


def _start_on(paths: _Paths, port: int, idle_timeout_s: float, log: IO[bytes]) -> int | None:
    """Start a server on ``port``: None once it answers, else its exit status (-1: timed out)."""
    process = _spawn(paths, port, idle_timeout_s, log)
    _write_state(
        paths,
        {
            "pid": process.pid,
            "port": port,
            "url": _api_url(port),
            "ui_url": f"http://{HOST}:{port}",
            "log": str(paths.log),
            "database": str(paths.database),
            "idle_timeout_s": idle_timeout_s,
            "prefect_version": _prefect_version(),
            "started_at": time.time(),
        },
    )
    if _wait_healthy(port, lambda: process.poll() is None, STARTUP_TIMEOUT_S):
        return None
    timed_out = process.poll() is None
    if timed_out:
        _terminate(process.pid)
    process.wait()
    paths.state.unlink(missing_ok=True)
    return -1 if timed_out else process.returncode


def _start(paths: _Paths, idle_timeout_s: float) -> str:
    status: int | None = None
    with open(paths.log, "wb") as log:
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            status = _start_on(paths, port, idle_timeout_s, log)
            if status is None:
                return _api_url(port)
            if status != EXIT_PORT_IN_USE:
                break
    why = (
        f"did not answer its health check within {STARTUP_TIMEOUT_S:g} s"
        if status == -1
        else f"exited with status {status} while starting"
    )
    raise LocalServerError(
        f"the local Prefect server {why}; see its log: {paths.log}. Alternatives: set PREFECT_API_URL "
        "to a running Prefect server, or use Prefect's temporary server (mode 'ephemeral')"
    )


def ensure_local_server(home: Path | None = None, *, idle_timeout_s: float = 1800.0) -> str:
    """Return the API URL of the quantgate-managed local Prefect server, starting it if none is running.

    ``home`` defaults to ``$QUANTGATE_HOME`` or ``~/.quantgate``; state lives in its ``prefect/``
    folder. A server started here exits by itself after ``idle_timeout_s`` seconds without requests.
    Concurrent callers (threads or processes) end up with one server.
    """
    paths = _paths(home)
    url = _running_url(paths)
    if url is not None:
        return url
    with _locked(paths, timeout_s=2 * STARTUP_TIMEOUT_S + 30):
        url = _running_url(paths)
        if url is not None:
            return url
        _discard_stale(paths)
        url = _running_url(paths)
        if url is not None:
            return url
        return _start(paths, idle_timeout_s)


def stop_local_server(home: Path | None = None) -> bool:
    """Stop the quantgate-managed local Prefect server; True if one was running and is now stopped."""
    paths = _paths(home)
    with _locked(paths, timeout_s=2 * STARTUP_TIMEOUT_S + 30):
        state = _read_state(paths)
        if state is None:
            paths.state.unlink(missing_ok=True)
            return False
        pid = _state_int(state, "pid")
        stopped = _is_our_server(pid, paths)
        if stopped:
            _terminate(pid)
        paths.state.unlink(missing_ok=True)
        return stopped


def local_server_status(home: Path | None = None) -> dict[str, object] | None:
    """The state of the quantgate-managed local Prefect server (pid, port, url, ui_url, log...), or None.

    None when no server is running; ``"healthy"`` says whether it answers its health check now.
    """
    paths = _paths(home)
    state = _read_state(paths)
    if state is None or not _is_our_server(_state_int(state, "pid"), paths):
        return None
    return {**state, "healthy": _is_healthy(_state_int(state, "port"))}


def _toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _nested_str(table: dict[str, Any], *keys: str) -> str | None:
    value: Any = table
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def _profile_api_url() -> str | None:
    prefect_home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles_path = os.environ.get("PREFECT_PROFILES_PATH", "$PREFECT_HOME/profiles.toml")
    profiles = _toml(Path(profiles_path.replace("$PREFECT_HOME", str(prefect_home))).expanduser())
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    if not isinstance(active, str):
        return None
    return _nested_str(profiles, "profiles", active, "PREFECT_API_URL")


def configured_prefect_api_url() -> str | None:
    """The Prefect API URL the user configured, without importing prefect; None if there is none.

    Looks where Prefect would, short of ``.env`` files: the ``PREFECT_API_URL`` environment
    variable, ``prefect.toml`` and ``[tool.prefect]`` in ``pyproject.toml`` in the working
    directory, and the active profile.
    """
    return (
        os.environ.get("PREFECT_API_URL")
        or _nested_str(_toml(Path("prefect.toml")), "api", "url")
        or _nested_str(_toml(Path("pyproject.toml")), "tool", "prefect", "api", "url")
        or _profile_api_url()
    )


def prefect_api_for_cli(mode: str = "local") -> str | None:
    """Decide which Prefect API this command uses; call once at start-up, before importing prefect.

    An API URL the user configured (see :func:`configured_prefect_api_url`) wins and is returned
    untouched. ``"local"`` starts or reuses
    quantgate's local server and exports its URL as ``PREFECT_API_URL``. ``"ephemeral"`` leaves the
    variable unset, so Prefect starts its own temporary server (slow, see the module docstring);
    returns None then.
    """
    configured = configured_prefect_api_url()
    if configured:
        return configured
    if mode == "ephemeral":
        return None
    if mode != "local":
        raise InputError(f"unknown Prefect API mode {mode!r}; use 'local' or 'ephemeral'")
    url = ensure_local_server()
    os.environ["PREFECT_API_URL"] = url
    return url


class PrefectStart:
    """:func:`prefect_api_for_cli` in a background thread, so a cold local server (about 7 s here) starts while the
    command imports MLflow and ONNX Runtime instead of after. ``wait()`` before the first ``import prefect``."""

    def __init__(self, mode: str) -> None:
        import threading

        # The CLI reports every failure itself in one line (README: exit codes); Prefect's console copy of
        # a failed task, with its traceback, would only repeat it. The API handler still records it all.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        configure_prefect_env()
        self._error: BaseException | None = None
        # A daemon thread: a command that fails on bad input exits at once; a server it started keeps
        # starting in its own session and is reused by the next command.
        self._thread = threading.Thread(target=self._run, args=(mode,), daemon=True)
        self._thread.start()

    def _run(self, mode: str) -> None:
        try:
            prefect_api_for_cli(mode)
        except BaseException as exc:  # re-raised in wait(), on the main thread
            self._error = exc

    def wait(self) -> None:
        """Block until PREFECT_API_URL is settled; must happen before prefect is imported."""
        self._thread.join()
        if self._error is not None:
            raise self._error
