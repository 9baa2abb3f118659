"""The quantgate-managed local Prefect server and the Prefect environment policy, with real processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from quantgate.errors import InputError
from quantgate.flows.prefect_server import (
    PREFECT_ENV_DEFAULTS,
    LocalServerError,
    configure_prefect_env,
    configured_prefect_api_url,
    ensure_local_server,
    local_server_status,
    prefect_api_for_cli,
    stop_local_server,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

TRIVIAL_FLOW = """
from quantgate.flows.prefect_server import configure_prefect_env, prefect_api_for_cli

configure_prefect_env()
print(prefect_api_for_cli("local"))

from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow
def trivial() -> int:
    return double(21)

assert trivial() == 42
"""

ENSURE = """
import sys
from pathlib import Path
from quantgate.flows.prefect_server import ensure_local_server

print(ensure_local_server(Path(sys.argv[1]), idle_timeout_s=120))
"""


def _server_processes(home: Path) -> list[psutil.Process]:
    """Processes of our server module whose command line names this home (its state file)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "quantgate.flows._local_server" in cmdline and any(str(home) in arg for arg in cmdline):
            found.append(process)
    return found


def _kill_all(home: Path) -> None:
    for process in _server_processes(home):
        try:
            process.kill()
            process.wait(timeout=10)
        except psutil.NoSuchProcess:
            pass


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _api_post(url: str, path: str, body: dict[str, object]) -> object:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PREFECT_HOME=str(tmp_path / "client-prefect-home"), **extra)
    return env


def _stop_everything(home: Path) -> None:
    try:
        stop_local_server(home)
    finally:
        _kill_all(home)


@pytest.fixture(scope="session")
def migrated_server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server folder whose database is migrated and whose block types are registered, made once.

    A first start spends ~10 s on database migrations; copying this saves it in every later test.
    """
    home = tmp_path_factory.mktemp("template-home")
    try:
        ensure_local_server(home, idle_timeout_s=120)
    finally:
        _stop_everything(home)
    return home / "prefect"


@pytest.fixture()
def home(tmp_path: Path, migrated_server_root: Path) -> Iterator[Path]:
    """A quantgate home of its own (with a ready database); every server started under it is stopped."""
    home = tmp_path / "qg-home"
    (home / "prefect").mkdir(parents=True)
    for source in migrated_server_root.iterdir():
        if source.name.startswith("prefect.db") or source.name == "memo_store.toml":
            shutil.copy2(source, home / "prefect" / source.name)
    try:
        yield home
    finally:
        _stop_everything(home)


# --- policy and environment: no server needed ---------------------------------------------------


def test_configure_prefect_env_sets_defaults_and_keeps_user_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PREFECT_ENV_DEFAULTS:
        monkeypatch.setenv(name, "placeholder")  # so that monkeypatch restores the real state afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DEBUG")

    configure_prefect_env()

    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "DEBUG"


def test_cli_policy_uses_api_url_from_environment_without_starting_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUANTGATE_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")

    assert prefect_api_for_cli("local") == "http://prefect.example:4200/api"
    assert not (tmp_path / "prefect" / "server.json").exists()


def test_cli_policy_uses_api_url_from_active_prefect_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://team:4200/api"\n'
    )

    assert configured_prefect_api_url() == "http://team:4200/api"
    assert prefect_api_for_cli("local") == "http://team:4200/api"
    assert "PREFECT_API_URL" not in os.environ


def test_cli_policy_ephemeral_leaves_api_url_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("QUANTGATE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    assert prefect_api_for_cli("ephemeral") is None
    assert "PREFECT_API_URL" not in os.environ
    assert not (tmp_path / "prefect" / "server.json").exists()


def test_cli_policy_rejects_unknown_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InputError, match="'remote'"):
        prefect_api_for_cli("remote")


def test_status_is_none_for_missing_garbled_or_dead_state(tmp_path: Path) -> None:
    state = tmp_path / "prefect" / "server.json"
    assert local_server_status(tmp_path) is None

    state.write_text("{not json")
    assert local_server_status(tmp_path) is None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.write_text(json.dumps({"pid": dead.pid, "port": 1}))
    assert local_server_status(tmp_path) is None
    assert stop_local_server(tmp_path) is False
    assert not state.exists()


# --- real servers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_server_is_started_reused_runs_a_flow_and_stops(home: Path, tmp_path: Path) -> None:
    url = ensure_local_server(home, idle_timeout_s=120)
    status = local_server_status(home)
    assert status is not None and status["healthy"] is True
    assert url == status["url"] == f"http://127.0.0.1:{status['port']}/api"

    assert ensure_local_server(home, idle_timeout_s=120) == url
    again = local_server_status(home)
    assert again is not None and (again["pid"], again["port"]) == (status["pid"], status["port"])

    # A CLI-like process: no PREFECT_API_URL, finds the running server through QUANTGATE_HOME.
    run = subprocess.run(
        [sys.executable, "-c", TRIVIAL_FLOW],
        env=_child_env(tmp_path, QUANTGATE_HOME=str(home)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == url
    assert "Traceback" not in run.stderr
    assert "Finished in state" not in run.stderr + run.stdout
    assert run.stderr.strip() == ""

    flow_runs = _api_post(url, "/flow_runs/filter", {})
    assert isinstance(flow_runs, list) and [r["state_type"] for r in flow_runs] == ["COMPLETED"]
    logs = _api_post(url, "/logs/filter", {})
    assert isinstance(logs, list)
    assert any("Finished in state Completed" in entry["message"] for entry in logs)
    assert "Traceback" not in Path(str(status["log"])).read_text()

    assert stop_local_server(home) is True
    assert not _server_processes(home)
    assert not _port_open(int(str(status["port"])))
    assert local_server_status(home) is None
    assert stop_local_server(home) is False


@pytest.mark.slow
def test_stale_state_file_is_replaced_by_a_new_server(home: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        state = home / "prefect" / "server.json"
        # A live pid that is not our server (pid reuse), on a port nobody answers.
        state.write_text(json.dumps({"pid": bystander.pid, "port": closed_port, "prefect_version": "x"}))

        url = ensure_local_server(home, idle_timeout_s=120)

        status = local_server_status(home)
        assert status is not None and status["url"] == url
        assert status["pid"] != bystander.pid and status["port"] != closed_port
        assert bystander.poll() is None, "an unrelated process named by a stale state file was signalled"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_server_exits_by_itself_when_idle(home: Path) -> None:
    ensure_local_server(home, idle_timeout_s=5)
    status = local_server_status(home)
    assert status is not None
    process = psutil.Process(int(str(status["pid"])))

    process.wait(timeout=60)

    assert not (home / "prefect" / "server.json").exists()
    assert "idle for 5 s, exiting" in Path(str(status["log"])).read_text()
    assert not _port_open(int(str(status["port"])))


@pytest.mark.slow
def test_server_exits_when_its_state_file_is_gone(home: Path) -> None:
    ensure_local_server(home, idle_timeout_s=120)
    status = local_server_status(home)
    assert status is not None
    process = psutil.Process(int(str(status["pid"])))

    # What deleting the quantgate home does: nothing could find this server any more.
    (home / "prefect" / "server.json").unlink()

    process.wait(timeout=30)
    assert "no longer names this process" in Path(str(status["log"])).read_text()


@pytest.mark.slow
def test_concurrent_ensure_calls_start_one_server(home: Path, tmp_path: Path) -> None:
    commands = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE, str(home)],
            env=_child_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [command.communicate(timeout=180) for command in commands]

    assert [command.returncode for command in commands] == [0, 0], outputs
    urls = {stdout.strip() for stdout, _ in outputs}
    assert len(urls) == 1
    assert len(_server_processes(home)) == 1
    status = local_server_status(home)
    assert status is not None and status["url"] in urls


@pytest.mark.slow
def test_server_that_cannot_start_raises_with_its_log_path(home: Path) -> None:
    # A directory where the SQLite file should be: the server's migrations fail at start-up.
    for database_file in (home / "prefect").glob("prefect.db*"):
        database_file.unlink()
    (home / "prefect" / "prefect.db").mkdir()

    with pytest.raises(LocalServerError, match=r"server\.log") as raised:
        ensure_local_server(home, idle_timeout_s=120)

    assert str(home / "prefect" / "server.log") in str(raised.value)
    assert not _server_processes(home)
    assert not (home / "prefect" / "server.json").exists()
