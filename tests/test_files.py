"""Secrets and databases are owner-only from the first byte; the stack signals only processes it started; run
directories of dead processes are removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from quantgate import processes, workdir
from quantgate.automation import stack
from quantgate.files import private_dir, private_file, write_secret


def test_secrets_are_created_owner_only_and_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "d" / "webhook.secret"
    old = os.umask(0o000)  # the most permissive umask: the mode must not come from it
    try:
        assert write_secret(path, "first") == "first"
        assert write_secret(path, "second") == "first"  # an existing secret is kept
        private_file(tmp_path / "prefect.db")
        private_dir(tmp_path / "home")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "prefect.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose.db"
    loose.write_text("")
    loose.chmod(0o644)
    assert private_file(loose).stat().st_mode & 0o777 == 0o600  # an existing world-readable file is tightened


def test_the_local_prefect_database_is_owner_only_before_the_server_opens_it(tmp_path: Path) -> None:
    from quantgate.flows.prefect_server import _paths, _server_env

    paths = _paths(tmp_path / "home")
    env = _server_env(paths, 4999)
    assert paths.database.stat().st_mode & 0o777 == 0o600
    assert not any(k.startswith("MLFLOW_") for k in env)  # the server has no business with MLflow's credentials


def test_stack_down_never_signals_a_pid_that_is_no_longer_its_process(tmp_path: Path) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        owner = processes.of(ours.pid)
        assert owner is not None
        state = stack.StackState(
            processes={"reused": stranger.pid, "ours": ours.pid},
            # what `up` recorded: "reused" was started at another time (its pid now belongs to another program)
            started={"reused": owner.started - 1000.0, "ours": owner.started},
        )
        assert stack.stop(state) == ["reused"]
        ours.wait(10)
        assert stranger.poll() is None  # left alone
    finally:
        stranger.kill()
        ours.kill()
        stranger.wait()
        ours.wait()


def test_run_directories_of_dead_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{workdir.PREFIX}dead"
    gone.mkdir()
    (gone / workdir.OWNER).write_text(
        json.dumps({"host": processes.me().host, "pid": dead.pid, "started": time.time()})
    )
    mine = tmp_path / f"{workdir.PREFIX}mine"
    mine.mkdir()
    (mine / workdir.OWNER).write_text(processes.me().to_json())
    assert workdir.sweep(tmp_path) == [gone]
    assert mine.exists() and not gone.exists()


def test_a_run_directory_is_removed_on_error_and_holds_the_processs_temporary_files() -> None:
    import tempfile

    try:
        with workdir.run_workdir() as path:
            made = Path(tempfile.mkdtemp())
            assert made.parent == path / "tmp"  # MLflow's temporary files land inside the run's directory
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not path.exists()
