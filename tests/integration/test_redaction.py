"""A whole run with a password in the tracking URI, then a search for that password in everything the run could
have written it to: the CLI's stdout and stderr (`compress --json`, `report`, `history`), every row of the MLflow
database (tags, params, descriptions), every artifact file, and the local Prefect server's database (flow-run
parameters, task runs, logs, artifacts) and log. PostgreSQL here trusts local connections, so any password works
and none is needed to prove it never leaks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import register_onnx, test_policy
from tests.integration.test_stack import _postgres_up
from tests.test_cli import write_policy

pytestmark = pytest.mark.slow

PASSWORD = "Hunter2-" + uuid.uuid4().hex[:12]


@pytest.fixture()
def postgres_store() -> Iterator[str]:
    if not _postgres_up():
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432")
    import psycopg2

    name = f"qgredact_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres:{PASSWORD}@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _database_text(uri: str) -> str:
    import psycopg2

    conn = psycopg2.connect(uri.replace("postgresql+psycopg2://", "postgresql://"))
    chunks = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for (table,) in cur.fetchall():
            cur.execute(f'SELECT * FROM "{table}"')
            chunks.extend(repr(row) for row in cur.fetchall())
    conn.close()
    return "\n".join(chunks)


def test_no_password_in_any_output_tag_artifact_prefect_parameter_or_log(
    postgres_store: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    from quantgate.flows.prefect_server import stop_local_server

    work = tmp_path / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)  # the store's artifacts land in ./mlruns here
    try:
        register_onnx(postgres_store, digits_onnx, "digits")
    finally:
        os.chdir(cwd)
    policy = write_policy(work / "p.yaml", test_policy(calib_npz, eval_npz))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["QUANTGATE_HOME"] = str(home)
    exe = str(Path(sys.executable).with_name("quantgate"))
    outputs = []
    try:
        for args in (
            ["compress", "models:/digits/1", "--policy", str(policy), "--json"],
            ["report", "models:/digits/1", "--html", str(work / "report.html")],
            ["history", "digits", "--json"],
            ["compress", "models:/nope/1"],  # an error message names the store too
        ):
            proc = subprocess.run([exe, *args, "--tracking-uri", postgres_store], env=env, cwd=work,
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            outputs.append(proc)
    finally:
        stop_local_server(home)
    assert outputs[0].returncode in (0, 1), outputs[0].stderr
    assert outputs[3].returncode == 2
    assert "postgres:***@127.0.0.1" in outputs[0].stdout  # the URI is there, masked

    for proc in outputs:
        assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
    rows = _database_text(postgres_store)
    assert "quantgate.outcome" in rows  # the run did write tags there
    assert PASSWORD not in rows
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "result.json" for p in files) and any(p.name.startswith("prefect.db") for p in files)
    leaked = [str(p.relative_to(tmp_path)) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert leaked == []
