"""Faults against real processes: the `quantgate compress` process SIGKILLed at each registration step, MLflow
answering 503 and dropping connections through a real TCP proxy, the bridge killed between claiming a delivery and
handing it off, two workers compressing the same version at once. After recovery (the next run of each version):
exactly one registered version per (source version, recipe) with the alias, no RUNNING MLflow run, no temporary
directory left, no lost delivery.

The kill is real process death: ``QUANTGATE_FAULT_KILL_AT=<step>`` makes the process SIGKILL itself there
(quantgate.faults). Each test prints one line of figures; README "Fault suite" quotes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from quantgate import faults
from quantgate.automation import stack
from tests.conftest import register_onnx
from tests.faults.conftest import FAST, cli_env, compress, new_versions, registered_from, running_runs
from tests.faults.proxy import FaultProxy, Rule

pytestmark = pytest.mark.slow


def _policy(work: Path, calib: Path, evaluation: Path) -> Path:
    path = work / "policy.yaml"
    data = {**FAST["data"], "calibration": str(calib), "evaluation": str(evaluation)}  # type: ignore[dict-item]
    path.write_text(yaml.safe_dump({**FAST, "data": data}))
    return path


def _source(client: MlflowClient, settings: stack.StackSettings, digits_onnx: Path, name: str) -> None:
    register_onnx(settings.mlflow_url, digits_onnx, name)


def _recover(env: dict[str, str], cwd: Path, policy: Path, uris: list[str]) -> list[dict[str, Any]]:
    """The next run of each version, in one process (imports paid once): what a retry or the nightly pass does."""
    script = (
        "import json, sys\nfrom pathlib import Path\nimport quantgate\n"
        "docs = [quantgate.compress(u, Path(sys.argv[1])) for u in sys.argv[2:]]\n"
        "print(json.dumps([{'uri': d['source']['uri'], 'promoted': d['promoted_uri']} for d in docs]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(policy), *uris], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    done: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return done


def _assert_one_each(client: MlflowClient, source: str, versions: list[str]) -> None:
    sibling = f"{source}-onnxruntime-int8"
    for version in versions:
        (mv,) = registered_from(client, sibling, version)  # exactly one version per (source version, recipe)
        tags = client.get_model_version(source, version).tags
        assert tags["quantgate.outcome"] == "promoted"
        assert tags["quantgate.compressed_uri"] == f"models:/{sibling}/{mv.version}"
    alias = client.get_model_version_by_alias(sibling, "compressed")
    assert alias.tags["quantgate.source_name"] == source
    assert running_runs(client) == []
    exp = client.get_experiment_by_name("quantgate")
    assert exp is not None
    assert client.search_runs([exp.experiment_id], "tags.`quantgate.registration_state` = 'open'") == []


def test_a_compress_process_killed_at_each_registration_step_leaves_one_version_or_none_after_recovery(
    faulty_stack: stack.StackSettings, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    client = MlflowClient(faulty_stack.mlflow_url)
    _source(client, faulty_stack, digits_onnx, "fault-warm")
    _source(client, faulty_stack, digits_onnx, "fault-kill")
    policy = _policy(tmp_path, calib_npz, eval_npz)
    env = cli_env(faulty_stack, tmp_path)
    # Measures once (same model bytes, same data, same host): the kill runs reuse the measurement, and the sibling
    # model of fault-kill is still to be created, so `model_created` is reached.
    warm = compress("models:/fault-warm/1", policy, env, tmp_path)
    assert warm.returncode == 0, warm.stderr
    versions = ["1", *new_versions(client, "fault-kill", len(faults.REGISTRATION_POINTS) - 1)]
    started = time.monotonic()

    def killed(item: tuple[str, str]) -> tuple[str, int, list[str]]:
        point, version = item
        proc = compress(f"models:/fault-kill/{version}", policy, {**env, faults.ENV: point}, tmp_path)
        left = sorted(mv.version for mv in registered_from(client, "fault-kill-onnxruntime-int8", version))
        return point, proc.returncode, [str(v) for v in left]

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(killed, zip(faults.REGISTRATION_POINTS, versions, strict=True)))
    assert [rc for _, rc, _ in outcomes] == [-9] * len(versions), outcomes  # every one died where it was told
    assert len(running_runs(client)) == len(versions)  # every dead run left its parent RUNNING
    kill_s = time.monotonic() - started

    started = time.monotonic()
    done = _recover(env, tmp_path, policy, [f"models:/fault-kill/{v}" for v in versions])
    assert all(d["promoted"] for d in done)
    _assert_one_each(client, "fault-kill", versions)
    assert list((tmp_path / "tmp").glob("quantgate-run-*")) == []  # the dead runs' directories were swept
    print(
        f"\nFAULTS kill-9: {len(versions)} steps {', '.join(faults.REGISTRATION_POINTS)}; "
        f"versions left by the dead runs: {[len(v) for _, _, v in outcomes]}; after recovery 1 version each, "
        f"alias set, 0 RUNNING runs, 0 open journals, 0 temp dirs; kills {kill_s:.0f} s, recovery "
        f"{time.monotonic() - started:.0f} s"
    )


def test_mlflow_answering_503_and_dropping_connections_through_a_proxy_never_leaves_a_half_registration(
    faulty_stack: stack.StackSettings, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    client = MlflowClient(faulty_stack.mlflow_url)
    _source(client, faulty_stack, digits_onnx, "fault-proxy")
    policy = _policy(tmp_path, calib_npz, eval_npz)
    proxy = FaultProxy(faulty_stack.mlflow_port)
    env = cli_env(faulty_stack, tmp_path, tracking_uri=proxy.url)
    scenarios: list[tuple[str, Rule, Callable[[subprocess.CompletedProcess[str]], None]]] = [
        ("503 twice on create-version", Rule("/model-versions/create", "fail", times=2), _exit(0)),
        ("create-version done, answer dropped", Rule("/model-versions/create", "drop_after", times=1), _exit(0)),
        ("connections reset at start", Rule("/api/2.0/mlflow/", "drop", times=3), _exit(0)),
        (
            "setting aliases fails for good",
            Rule("/registered-models/alias", "fail", method="POST"),
            _exit(3, "NOT rolled back"),
        ),
    ]
    versions = ["1", *new_versions(client, "fault-proxy", len(scenarios) - 1)]
    figures = []
    try:
        for (what, rule, check), version in zip(scenarios, versions, strict=True):
            proxy.set(rule)
            proc = compress(f"models:/fault-proxy/{version}", policy, env, tmp_path)
            proxy.set()
            check(proc)
            figures.append(f"{what}: exit {proc.returncode}, {rule.hits} requests faulted")
        down = registered_from(client, "fault-proxy-onnxruntime-int8", versions[-1])
        assert all(mv.tags.get("quantgate.source_version") == versions[-1] for mv in down)
        done = _recover(env, tmp_path, policy, [f"models:/fault-proxy/{versions[-1]}"])
        assert done[0]["promoted"]
    finally:
        proxy.close()
    _assert_one_each(client, "fault-proxy", versions)
    print("\nFAULTS proxy: " + "; ".join(figures) + "; after recovery 1 version each, 0 RUNNING runs")


def _exit(code: int, text: str = "") -> Callable[[subprocess.CompletedProcess[str]], None]:
    def check(proc: subprocess.CompletedProcess[str]) -> None:
        assert proc.returncode == code, proc.stderr[-3000:]
        assert text in proc.stderr
        assert "Traceback" not in proc.stderr

    return check


def _flow_runs(settings: stack.StackSettings, model_uri: str) -> list[dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(settings.prefect_api + "/flow_runs/filter", b"{}", headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        runs: list[dict[str, Any]] = json.loads(resp.read())
    return [r for r in runs if r.get("parameters", {}).get("model_uri") == model_uri]


def _until(what: str, check: Callable[[], Any], timeout_s: float, settings: stack.StackSettings) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tail = (settings.home / "worker.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; worker log ends:\n{tail}")


def test_a_bridge_killed_between_claiming_a_delivery_and_handing_it_off_loses_nothing(
    faulty_stack: stack.StackSettings, digits_onnx: Path, calib_npz: Path, eval_npz: Path
) -> None:
    client = MlflowClient(faulty_stack.mlflow_url)
    stack.stop_process(faulty_stack, "bridge")
    os.environ[faults.ENV] = "delivery_claimed"  # the restarted bridge inherits it, and dies at its first claim
    try:
        stack.restart_bridge(faulty_stack)
    finally:
        del os.environ[faults.ENV]
    uri = register_onnx(faulty_stack.mlflow_url, digits_onnx, "auto-fault")
    version = uri.rsplit("/", 1)[1]
    client.set_model_version_tag("auto-fault", version, "quantgate.calibration", str(calib_npz))
    client.set_model_version_tag("auto-fault", version, "quantgate.evaluation", str(eval_npz))  # selects it now
    state = stack.load_state(faulty_stack)
    assert state is not None
    bridge = state.processes["bridge"]

    def dead() -> bool:
        stack._reap(bridge)  # our child: collected, or it stays a zombie that looks alive
        return not stack._alive(bridge)

    _until("the bridge to die at its claim", dead, 60, faulty_stack)
    db = faulty_stack.home / "webhooks.db"
    import sqlite3

    with sqlite3.connect(db) as conn:
        claimed = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'claimed'").fetchone()[0]
    assert claimed >= 1  # claimed, never handed off: the delivery MLflow will not send again
    time.sleep(15)  # past MLflow's retries to a dead bridge (3 retries, 1-4 s apart)
    stack.restart_bridge(faulty_stack)  # a fresh bridge: its sweep finds the dead claim and hands it off
    _until("the compressed version", lambda: client.get_model_version("auto-fault", version).tags.get(
        "quantgate.outcome") == "promoted", 300, faulty_stack)  # fmt: skip
    assert len(_flow_runs(faulty_stack, uri)) == 1
    assert len(registered_from(client, "auto-fault-onnxruntime-int8", version)) == 1
    print(f"\nFAULTS bridge: killed after claiming {claimed} delivery(ies); handed off by the restarted bridge's "
          "sweep; 1 flow run, 1 registered version")  # fmt: skip


def test_two_workers_compressing_the_same_version_at_once_register_it_once(
    faulty_stack: stack.StackSettings, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    client = MlflowClient(faulty_stack.mlflow_url)
    uri = register_onnx(faulty_stack.mlflow_url, digits_onnx, "twin-fault")  # no rule selects it: only our runs
    state = stack.load_state(faulty_stack)
    assert state is not None and faulty_stack.config is not None
    pool = yaml.safe_load(faulty_stack.config.read_text())["pool"]["name"]
    argv = [stack._bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    stack._start(faulty_stack, state, "worker-2", argv, stack._base_env(faulty_stack))
    try:
        stack._wait_worker(faulty_stack, state, "worker-2", pool)
        data = {**FAST["data"], "calibration": str(calib_npz), "evaluation": str(eval_npz)}  # type: ignore[dict-item]
        parameters = {"model_uri": uri, "policy": {**FAST, "data": data}, "tracking_uri": faulty_stack.mlflow_url}
        # Each run waits, once its parent run exists, until the other has got as far: on a fast host one run had
        # finished before the second worker polled for the other (the test then proved nothing about a race).
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        env = {faults.BARRIER_ENV: f"parent_created:{barrier}:2"}
        script = (
            "import json, sys, uuid\nfrom prefect.deployments import run_deployment\n"
            "p, env = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
            "for _ in range(2):  # two runs of one version: no shared idempotency key\n"
            "    run_deployment('compress-model/compress-model', parameters=p, timeout=0,"
            " idempotency_key=f'twin-{uuid.uuid4().hex}', job_variables={'env': env})\n"
        )
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(parameters), json.dumps(env)],
                              capture_output=True, text=True, env=cli_env(faulty_stack, tmp_path),
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]

        def finished() -> list[dict[str, Any]] | None:
            runs = _flow_runs(faulty_stack, uri)
            final = len(runs) == 2 and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs)
            return runs if final else None

        runs = _until("both runs to finish", finished, 300, faulty_stack)
    finally:
        stack.stop(stack._only(state, "worker-2"))
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert len(list(barrier.iterdir())) == 2  # both flow processes reached the barrier
    assert first["end_time"] > second["start_time"]  # they really ran at once (ISO timestamps, same zone)
    (mv,) = registered_from(client, "twin-fault-onnxruntime-int8", "1")
    assert client.get_model_version_by_alias("twin-fault-onnxruntime-int8", "compressed").version == mv.version
    assert running_runs(client) == []
    print("\nFAULTS two workers: 2 flow runs of one version at once, 1 registered version, alias on it")


def test_webhooks_register_keeps_the_working_webhook_when_the_new_url_does_not_answer(
    faulty_stack: stack.StackSettings,
) -> None:
    from quantgate.automation.setup import WEBHOOK_NAME, register_webhook
    from quantgate.errors import InputError

    client = MlflowClient(faulty_stack.mlflow_url)
    secret = stack.webhook_secret(faulty_stack)
    (working,) = [h for h in client.list_webhooks() if h.name == WEBHOOK_NAME]
    with pytest.raises(InputError, match=r"did not accept MLflow's test delivery .*the existing webhook .* was kept"):
        register_webhook(client, "http://127.0.0.1:1/webhooks/mlflow", secret)
    assert [h.webhook_id for h in client.list_webhooks() if h.name == WEBHOOK_NAME] == [working.webhook_id]
    new = register_webhook(client, faulty_stack.bridge_url + "/webhooks/mlflow", secret)  # tested, then swapped
    assert [h.webhook_id for h in client.list_webhooks() if h.name == WEBHOOK_NAME] == [new]
    assert new != working.webhook_id
