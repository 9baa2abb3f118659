"""The whole automation topology as plain processes on 127.0.0.1 (what `make stack` runs, and the integration test).

MLflow server on its own PostgreSQL database (artifacts proxied), Prefect server on another PostgreSQL database,
the webhook bridge, one process worker for the compression pool and one per CPU target pool, the deployments, and
the MLflow webhook pointing at the bridge. ``down`` stops exactly the processes ``up`` started (their ids are in
the state file).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantgate import processes
from quantgate.errors import QuantgateError
from quantgate.files import private_dir, private_file, write_secret

STATE = "state.json"


@dataclass(frozen=True)
class StackSettings:
    home: Path
    postgres: str = "postgresql://postgres@127.0.0.1:5432"
    db_prefix: str = "quantgate"
    mlflow_port: int = 5000
    prefect_port: int = 4200
    bridge_port: int = 8088
    config: Path | None = None

    @classmethod
    def from_env(cls, home: Path | None = None, config: Path | None = None) -> StackSettings:
        env = os.environ
        base = home or Path(env.get("QUANTGATE_HOME", Path.home() / ".quantgate")) / "stack"
        return cls(
            home=base,
            postgres=env.get("QUANTGATE_STACK_POSTGRES", cls.postgres),
            db_prefix=env.get("QUANTGATE_STACK_DB_PREFIX", cls.db_prefix),
            mlflow_port=int(env.get("QUANTGATE_STACK_MLFLOW_PORT", cls.mlflow_port)),
            prefect_port=int(env.get("QUANTGATE_STACK_PREFECT_PORT", cls.prefect_port)),
            bridge_port=int(env.get("QUANTGATE_STACK_BRIDGE_PORT", cls.bridge_port)),
            config=config
            or (Path(env["QUANTGATE_AUTOMATION_CONFIG"]) if env.get("QUANTGATE_AUTOMATION_CONFIG") else None),
        )

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}"

    @property
    def mlflow_store(self) -> str:
        # Explicit driver: SQLAlchemy would otherwise look for psycopg 3, which is not installed.
        return f"{self.postgres.replace('postgresql://', 'postgresql+psycopg2://', 1)}/{self.database('mlflow')}"

    def database(self, role: str) -> str:
        return f"{self.db_prefix}_{role}"


@dataclass
class StackState:
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid (= process group id)
    urls: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # name -> the process's start time: its identity


class StackError(QuantgateError):
    """A stack process did not come up; its log is named."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _secret(path: Path, make: str) -> str:
    return write_secret(path, make)  # 0600 from the first byte, never written and then chmod-ed


@contextlib.contextmanager
def _admin(settings: StackSettings) -> Iterator[Any]:
    """A cursor on the server's ``postgres`` database, in autocommit (CREATE/DROP DATABASE refuse transactions)."""
    import psycopg2

    conn = psycopg2.connect(f"{settings.postgres}/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def ensure_databases(settings: StackSettings) -> None:
    """One database per server: MLflow and Prefect both keep Alembic state in ``alembic_version``."""
    with _admin(settings) as cur:
        for role in ("mlflow", "prefect"):
            name = settings.database(role)
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')


def drop_databases(settings: StackSettings) -> None:
    with _admin(settings) as cur:
        for role in ("mlflow", "prefect"):
            cur.execute(f'DROP DATABASE IF EXISTS "{settings.database(role)}" WITH (FORCE)')


def _base_env(settings: StackSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=settings.mlflow_url,
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_API_URL=settings.prefect_api,
        PREFECT_HOME=str(settings.home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        QUANTGATE_HOME=str(settings.home / "quantgate-home"),
    )
    return env


def _start(settings: StackSettings, state: StackState, name: str, argv: list[str], env: dict[str, str]) -> None:
    log = settings.home / f"{name}.log"
    with open(private_file(log), "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state.processes[name] = proc.pid
    owner = processes.of(proc.pid)
    if owner is not None:
        state.started[name] = owner.started
    _save(settings, state)


def _wait(settings: StackSettings, state: StackState, name: str, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    pid = state.processes[name]
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if not _alive(pid):
            break
        time.sleep(0.5)
    tail = (settings.home / f"{name}.log").read_text(errors="replace")[-1500:]
    raise StackError(f"{name} did not answer at {url}; its log ({settings.home / (name + '.log')}) ends:\n{tail}")


def _wait_worker(settings: StackSettings, state: StackState, name: str, pool: str, timeout_s: float = 120) -> None:
    """Until the Prefect server lists an online worker in ``pool`` (a worker has no health URL of its own)."""
    url = f"{settings.prefect_api}/work_pools/{pool}/workers/filter"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(state.processes[name]):
        request = urllib.request.Request(url, b"{}", {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if any(w.get("status") == "ONLINE" for w in json.loads(resp.read())):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    log = settings.home / f"{name}.log"
    tail = log.read_text(errors="replace")[-1500:]
    raise StackError(f"{name} did not come online in pool {pool}; its log ({log}) ends:\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _save(settings: StackSettings, state: StackState) -> None:
    private_file(settings.home / STATE).write_text(json.dumps(asdict(state), indent=2))


def load_state(settings: StackSettings) -> StackState | None:
    path = settings.home / STATE
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return StackState(
        processes=dict(raw.get("processes", {})), urls=dict(raw.get("urls", {})), started=dict(raw.get("started", {}))
    )


def start_mlflow(settings: StackSettings, state: StackState) -> None:
    env = _base_env(settings)
    env.update(
        MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=_secret(settings.home / "fernet.key", _fernet_key()),
        # The bridge listens on loopback over http: MLflow refuses both unless told otherwise.
        MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
    )
    argv = [
        _bin("mlflow"), "server",
        "--backend-store-uri", settings.mlflow_store,
        "--artifacts-destination", str(settings.home / "mlartifacts"),
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(settings.mlflow_port), "--workers", "1",
    ]  # fmt: skip
    _start(settings, state, "mlflow", argv, env)


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def up(settings: StackSettings) -> StackState:
    """Start everything (or find it running) and return where it answers."""
    private_dir(settings.home)
    running = load_state(settings)
    if running is not None and running.processes and all(_ours(running, n) for n in running.processes):
        return running
    if running is not None:
        down(settings)
    ensure_databases(settings)
    state = StackState()
    env = _base_env(settings)
    try:
        start_mlflow(settings, state)
        prefect_env = dict(env)
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            settings.postgres.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + settings.database("prefect")
        )
        prefect_argv = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect_port)]
        _start(settings, state, "prefect", prefect_argv, prefect_env)
        _wait(settings, state, "mlflow", settings.mlflow_url + "/health")
        _wait(settings, state, "prefect", settings.prefect_api + "/health")

        config_args = ["--config", str(settings.config)] if settings.config else []
        deployed = subprocess.run(
            [_bin("quantgate"), "deploy", *config_args], env=env, capture_output=True, text=True, timeout=300
        )
        if deployed.returncode != 0:
            raise StackError(f"quantgate deploy failed: {deployed.stderr.strip() or deployed.stdout.strip()}")
        # One run at a time per worker: two runs on the same cores would disturb each other's latency figures.
        workers = _worker_pools(settings)
        for name, pool in workers.items():
            argv = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
            _start(settings, state, name, argv, env)

        start_bridge(settings, state)

        from mlflow import MlflowClient

        from quantgate.automation.setup import register_webhook

        hook_url = settings.bridge_url + "/webhooks/mlflow"
        register_webhook(MlflowClient(settings.mlflow_url), hook_url, webhook_secret(settings))
        for name, pool in workers.items():
            _wait_worker(settings, state, name, pool)
    except BaseException:
        stop(state)
        (settings.home / STATE).unlink(missing_ok=True)
        raise
    state.urls = {
        "mlflow": settings.mlflow_url,
        "prefect": f"http://127.0.0.1:{settings.prefect_port}",
        "bridge": settings.bridge_url + "/webhooks/mlflow",
    }
    _save(settings, state)
    return state


def webhook_secret(settings: StackSettings) -> str:
    return _secret(settings.home / "webhook.secret", secrets.token_urlsafe(32))


def start_bridge(settings: StackSettings, state: StackState) -> None:
    env = _base_env(settings)
    env["QUANTGATE_WEBHOOK_SECRET"] = webhook_secret(settings)
    env["QUANTGATE_WEBHOOK_DB"] = str(settings.home / "webhooks.db")
    argv = [_bin("quantgate"), "serve-webhooks", "--host", "127.0.0.1", "--port", str(settings.bridge_port)]
    config_args = ["--config", str(settings.config)] if settings.config else []
    _start(settings, state, "bridge", [*argv, *config_args], env)
    _wait(settings, state, "bridge", settings.bridge_url + "/healthz")


def stop_process(settings: StackSettings, name: str) -> None:
    """Stop one process of the running stack (it stays in the state file until started again)."""
    state = load_state(settings)
    if state is None or name not in state.processes:
        raise StackError(f"no {name} is running under {settings.home}")
    stop(_only(state, name))


def _only(state: StackState, name: str) -> StackState:
    return StackState(processes={name: state.processes[name]}, started={name: state.started.get(name, -1.0)})


def restart_bridge(settings: StackSettings) -> None:
    state = load_state(settings)
    if state is None:
        raise StackError(f"no stack is running under {settings.home}")
    start_bridge(settings, state)


def restart_mlflow(settings: StackSettings) -> None:
    """Stop and start the MLflow server (same database, artifacts and key); runs in flight must ride it out."""
    state = load_state(settings)
    if state is None or "mlflow" not in state.processes:
        raise StackError(f"no stack is running under {settings.home}")
    stop(_only(state, "mlflow"))
    start_mlflow(settings, state)
    _wait(settings, state, "mlflow", settings.mlflow_url + "/health")


def _worker_pools(settings: StackSettings) -> dict[str, str]:
    """Process name -> pool: the compression pool, then every CPU target pool (a GPU pool needs a GPU worker)."""
    from quantgate.automation.config import load_config

    config = load_config(settings.config)
    out = {"worker": config.pool.name}
    for pool, wanted in config.target_pools().items():
        if pool != config.pool.name and all(t.requires.gpu is None for t in wanted):
            out[f"worker-{pool}"] = pool
    return out


def _ours(state: StackState, name: str) -> bool:
    """Whether the process recorded as ``name`` is still the one ``up`` started: same pid, same start time, and
    still leading its own process group (a reused pid is another program, never to be signalled)."""
    pid = state.processes[name]
    owner = processes.of(pid)
    if owner is None or state.started.get(name) != owner.started:
        return False
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def stop(state: StackState) -> list[str]:
    """SIGTERM each process group ``up`` started, newest first; SIGKILL what is still there after 20 s. A pid that
    now belongs to another process (ours exited, the kernel reused it) is left alone; returns those names."""
    skipped = []
    for name in reversed(list(state.processes)):
        pid = state.processes[name]
        if not _ours(state, name):
            skipped.append(name)
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
    return skipped


def _reap(pid: int) -> None:
    """Collect a child's exit status when we started it in this process (so it does not linger as a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(settings: StackSettings) -> list[str]:
    """Stop the stack's processes; returns the names of those stopped (not those already gone or not ours)."""
    state = load_state(settings)
    if state is None:
        return []
    skipped = stop(state)
    (settings.home / STATE).unlink(missing_ok=True)
    return [name for name in state.processes if name not in skipped]
