"""End to end, as a user runs it: a model registered in a throwaway MLflow store, the real ``quantgate`` command run
against it in a subprocess, and the registered version served by ``mlflow models serve``.

::

    from quantgate.testing import Sandbox, predict_rest

    def test_my_backend_end_to_end(tmp_path):
        with Sandbox(tmp_path) as box:
            source = box.register_onnx(my_model_path, "mymodel")
            run = box.compress(source, {"backends": ["mybackend"], "data": {...}})
            assert run.exit_code == 0, run.stderr
            uri = run.document["promoted_uri"]
            with box.serve(uri) as url:
                answer = predict_rest(url, {"inputs": {"input": x.tolist()}})["predictions"]
            assert np.allclose(answer, box.load_model(uri).predict(x), atol=1e-5)

Nothing is mocked: the store is SQLite, the CLI is the installed ``quantgate`` of this interpreter's environment, and
``mlflow models serve`` runs in it (``--env-manager local``), so a plugin installed there is what gets tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "CompressRun",
    "Sandbox",
    "free_port",
    "model_versions",
    "predict_rest",
    "register_onnx",
    "register_pytorch",
    "run_quantgate",
    "running_server",
    "serve_model",
    "write_policy",
]

# The variables a test process may carry that must not reach the CLI: it is given its store and home explicitly.
_CALLER_SETTINGS = ("PREFECT_", "MLFLOW_")


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (``quantgate``, ``mlflow``)."""
    return str(Path(sys.executable).with_name(name))


def run_quantgate(
    args: Sequence[str], tracking_uri: str, home: Path, cwd: Path, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """The real ``quantgate`` command with ``args``, against ``tracking_uri``, with its own ``QUANTGATE_HOME`` (where
    its local Prefect server lives: share one ``home`` between runs to start that server once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CALLER_SETTINGS)}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "QUANTGATE_HOME": str(home)})
    return subprocess.run(
        [_bin("quantgate"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )


def write_policy(path: Path, policy: Mapping[str, Any]) -> Path:
    """``policy`` as the YAML file ``--policy`` reads."""
    path.write_text(yaml.safe_dump(_plain(policy)))
    return path


def _plain(value: Any) -> Any:
    """Paths and tuples as YAML writes them safely (strings and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@contextlib.contextmanager
def _mlflow_at(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI set to ``tracking_uri``, and put back after exactly as they were
    (unset included: a registry URI set to the default the getter resolves would pin every later client to it)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # MLflow has public setters but no public "is it set" for the registry URI: read the values the setters write.
    tracking, registry = tracking_state._tracking_uri, registry_state._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        # None unsets: the setters handle it, their annotations do not say so.
        mlflow.set_tracking_uri(tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(registry)  # type: ignore[arg-type]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment(name: str, artifact_location: Path | None) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    where = artifact_location.resolve().as_uri() if artifact_location is not None else None
    return str(mlflow.create_experiment(name, artifact_location=where))


def register_onnx(
    tracking_uri: str, path: Path, name: str, *, experiment: str = "training", artifact_location: Path | None = None
) -> str:
    """Log the ONNX file at ``path`` with MLflow's ``onnx`` flavor and register it as ``name``; its ``models:/`` URI.

    ``artifact_location``: where a new ``experiment`` keeps its artifacts (default: MLflow's, ``./mlruns``)."""
    import mlflow
    import onnx

    with _mlflow_at(tracking_uri), mlflow.start_run(experiment_id=_experiment(experiment, artifact_location)):
        info = mlflow.onnx.log_model(
            onnx.load(str(path)), name="model", registered_model_name=name, pip_requirements=["onnxruntime"]
        )
    return f"models:/{name}/{info.registered_model_version}"


def register_pytorch(
    tracking_uri: str,
    module: Any,
    example: np.ndarray,
    name: str,
    *,
    experiment: str = "training",
    artifact_location: Path | None = None,
) -> str:
    """Log a torch module in MLflow's default pytorch format (a torch.export archive), with the signature of
    ``example`` (a batch of inputs), and register it as ``name``; its ``models:/`` URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        outputs = module(torch.from_numpy(example)).numpy()
    with _mlflow_at(tracking_uri), mlflow.start_run(experiment_id=_experiment(experiment, artifact_location)):
        info = mlflow.pytorch.log_model(
            module, name="m", signature=infer_signature(example, outputs), input_example=example,
            pip_requirements=["torch"], registered_model_name=name,
        )  # fmt: skip
    return f"models:/{name}/{info.registered_model_version}"


def model_versions(tracking_uri: str) -> list[tuple[str, str, dict[str, str]]]:
    """(name, version, tags) of every registered version in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return sorted((mv.name, str(mv.version), dict(mv.tags)) for mv in client.search_model_versions(max_results=1000))


@dataclass(frozen=True)
class CompressRun:
    """One ``quantgate compress --json``: its exit code, the JSON document it printed (``None`` when it printed
    none: exit 2 and 3 print one line on stderr instead), and its stderr."""

    exit_code: int
    document: dict[str, Any] | None
    stderr: str
    stdout: str

    def candidate(self, backend: str, recipe: str | None = None) -> dict[str, Any]:
        """The document's candidate of ``backend`` (and ``recipe``); a ``KeyError`` naming what there is if none."""
        for cand in (self.document or {}).get("candidates", []):
            if cand["backend"] == backend and recipe in (None, cand["recipe"]):
                return dict(cand)
        have = [f"{c['backend']}/{c['recipe']}" for c in (self.document or {}).get("candidates", [])]
        raise KeyError(f"no candidate {backend}/{recipe or '*'} (candidates: {', '.join(have) or 'none'})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, port: int, health: str, what: str, timeout_s: float = 180
) -> Iterator[str]:
    """Start a server process on 127.0.0.1:``port``, yield its URL once ``health`` answers 200, then stop its whole
    process group (a server's workers included). One that exits or never answers is a ``RuntimeError`` with the end
    of its log."""
    log_path = cwd / f"{Path(argv[0]).name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url + health, timeout=2) as resp:
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, workdir: Path) -> Iterator[str]:
    """``mlflow models serve -m model_uri --env-manager local`` on a free port of 127.0.0.1 (this environment, so the
    plugin that logged the model is installed), until the ``with`` block ends; yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true")
    # `mlflow models serve` execs `uvicorn` from PATH, as in an activated environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [
        _bin("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with running_server(argv, env, workdir, port, "/ping", f"mlflow models serve {model_uri}") as url:
        yield url


def predict_rest(url: str, payload: Mapping[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    """POST ``payload`` (``{"inputs": ...}``, MLflow's scoring format) to a served model's ``/invocations``; its JSON
    answer (``{"predictions": ...}``)."""
    request = urllib.request.Request(
        url + "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


class Sandbox:
    """A throwaway MLflow store (SQLite and artifacts under ``root``) and a quantgate home, to run the real CLI in.

    ``home``: a ``QUANTGATE_HOME`` to share between sandboxes (its local Prefect server is started once and left
    running); by default the sandbox has its own, and stops its server when the ``with`` block ends.
    """

    def __init__(self, root: Path, home: Path | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self._own_home = home is None
        self.home = home if home is not None else root / "quantgate-home"
        self._policies = 0

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the local Prefect server of this sandbox's own home (a shared home is left to its owner)."""
        if self._own_home and self.home.exists():
            self.run("local-prefect", "stop")

    def register_onnx(self, path: Path, name: str) -> str:
        """``path`` registered as ``name`` (see ``register_onnx``); its ``models:/`` URI."""
        return register_onnx(self.tracking_uri, path, name, artifact_location=self.root / "artifacts")

    def register_pytorch(self, module: Any, example: np.ndarray, name: str) -> str:
        """``module`` registered as ``name`` (see ``register_pytorch``); its ``models:/`` URI."""
        return register_pytorch(self.tracking_uri, module, example, name, artifact_location=self.root / "artifacts")

    def run(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        """Any ``quantgate`` command against this store, run in ``root``."""
        return run_quantgate(args, self.tracking_uri, self.home, self.root, timeout_s)

    def compress(
        self, model_uri: str, policy: Mapping[str, Any] | Path | None = None, timeout_s: float = 600
    ) -> CompressRun:
        """``quantgate compress MODEL_URI --policy ... --json``; ``policy`` as a mapping is written to a file first."""
        args = ["compress", model_uri, "--json"]
        if isinstance(policy, Mapping):
            self._policies += 1
            policy = write_policy(self.root / f"policy-{self._policies}.yaml", policy)
        if policy is not None:
            args += ["--policy", str(policy)]
        proc = self.run(*args, timeout_s=timeout_s)
        document = json.loads(proc.stdout) if proc.stdout.startswith("{") else None
        return CompressRun(proc.returncode, document, proc.stderr, proc.stdout)

    def versions(self) -> list[tuple[str, str, dict[str, str]]]:
        """(name, version, tags) of every registered version in the store."""
        return model_versions(self.tracking_uri)

    def load_model(self, model_uri: str) -> Any:
        """``mlflow.pyfunc.load_model(model_uri)`` from this store, in this process."""
        import mlflow.pyfunc

        with _mlflow_at(self.tracking_uri):
            return mlflow.pyfunc.load_model(model_uri)

    def serve(self, model_uri: str) -> contextlib.AbstractContextManager[str]:
        """The registered ``model_uri`` served by ``mlflow models serve`` (see ``serve_model``)."""
        return serve_model(model_uri, self.tracking_uri, self.root / "serve")
