"""Pickled models, where a run allows them, are loaded and converted to ONNX in a separate process that has none of
the worker's secrets: an environment with no MLflow, Prefect, cloud or quantgate credentials, its own empty home
and temporary directory, and, when the worker runs as root, the ``nobody`` user in a network namespace of its own
(no network; unable to read the worker's 0600 files). Only the ONNX file it writes comes back, and the parent reads
that as data.

``python -m quantgate.isolation REQUEST.json`` is the child's entry point; it is not meant to be run by hand.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantgate.errors import InvalidModel, UnsupportedFlavor

# What the child inherits from the worker's environment: nothing that authenticates anywhere.
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Request:
    """What the child converts: a copy of the model's files, the kind of pickle, and the model's signature."""

    kind: str  # "pytorch-pickle", "pytorch-pt2", "sklearn-pickle", "sklearn-cloudpickle", "sklearn-skops"
    model_file: str  # relative to the model's directory
    out: str
    inputs: list[tuple[str, list[int], str]]  # (name, shape with -1 for dynamic, numpy dtype name)
    outputs: list[str]
    n_features: int | None = None
    pickle_module: str = "pickle"


def convert(request: Request, source: Path, out: Path, timeout_s: float = TIMEOUT_S) -> None:
    """Run the conversion in an isolated child; ``out`` is the ONNX file it wrote. Raises ``InvalidModel``."""
    private = Path(tempfile.mkdtemp(prefix="quantgate-isolated-"))
    try:
        work = private / "work"
        shutil.copytree(source, work / "model")
        inner = Request(
            **{**asdict(request), "model_file": str(work / "model" / request.model_file), "out": str(work / "out.onnx")}
        )
        (work / "request.json").write_text(json.dumps(asdict(inner)))
        argv, demote = _sandbox(private)
        proc = subprocess.Popen(
            [*argv, sys.executable, "-I", "-m", "quantgate.isolation", str(work / "request.json"), demote],
            cwd=work,
            env=_child_env(private),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise InvalidModel(
                f"loading the pickled model took longer than {timeout_s:.0f} s; it was stopped"
            ) from None
        produced = Path(inner.out)
        if proc.returncode != 0 or not produced.is_file():
            lines = [x for x in stderr.decode(errors="replace").splitlines() if x.strip()]
            raise InvalidModel(f"the isolated intake process failed: {lines[-1] if lines else proc.returncode}")
        shutil.copyfile(produced, out)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _child_env(private: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEPT_ENV if k in os.environ}
    env.update(HOME=str(private), TMPDIR=str(private), PYTHONDONTWRITEBYTECODE="1")
    return env


def _sandbox(private: Path) -> tuple[list[str], str]:
    """(argv prefix, user to become) for the child: what this host allows of a network namespace and ``nobody``."""
    sandbox = describe()
    if sandbox.user:
        entry = pwd.getpwnam(sandbox.user)
        for path in [private, *private.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return list(sandbox.argv), sandbox.user


@dataclass(frozen=True)
class Sandbox:
    argv: tuple[str, ...]  # prefix that puts the child in its own network namespace, or ()
    user: str  # the user the child becomes before reading the model, or "" (the worker's own user)

    def describe(self) -> str:
        parts = ["an environment without credentials"]
        parts.append("no network" if self.argv else "the host's network (no network namespace available)")
        parts.append(f"user {self.user}" if self.user else "the worker's own user")
        return ", ".join(parts)


@functools.cache
def describe() -> Sandbox:
    """The sandbox this host allows, probed once: ``unshare --net`` (root) or ``unshare --user --net`` (unprivileged
    user namespaces) for the network; ``nobody`` when we are root and ``nobody`` can run this interpreter (not when
    Python lives under /root, for example)."""
    argv: tuple[str, ...] = ()
    unshare = shutil.which("unshare")
    if unshare:
        for candidate in ((unshare, "--net", "--"), (unshare, "--user", "--map-root-user", "--net", "--")):
            if _runs([*candidate, sys.executable, "-I", "-c", "pass"]):
                argv = candidate
                break
    user = ""
    if os.geteuid() == 0 and _nobody_can_run_python():
        user = "nobody"
    return Sandbox(argv, user)


def _runs(argv: list[str], **kwargs: Any) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30, **kwargs).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _nobody_can_run_python() -> bool:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return False
    return _runs(
        [sys.executable, "-I", "-c", "import quantgate.isolation"],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        cwd="/",
        env=_child_env(Path("/tmp")),
    )


def _demote(user: str) -> None:
    """Become ``user`` before the model is read (the child starts as root only to enter its namespace)."""
    if not user:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _load(request: Request) -> Any:
    """The pickled object. This is where the model's own code runs, in this process only."""
    path = Path(request.model_file)
    if request.kind == "pytorch-pt2":
        import torch

        return torch.export.load(str(path))
    if request.kind == "pytorch-pickle":
        import importlib

        import torch

        if request.pickle_module not in ("pickle", "cloudpickle", "mlflow.pytorch.pickle_module"):
            raise UnsupportedFlavor(f"unknown pickle module {request.pickle_module!r}")
        try:
            return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        except RuntimeError:  # not TorchScript: a pickled nn.Module
            module = importlib.import_module(request.pickle_module)
            return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=module)
    if request.kind == "sklearn-skops":
        from skops.io import get_untrusted_types, load

        return load(path, trusted=get_untrusted_types(file=path))  # type: ignore[no-untyped-call]
    import pickle

    if request.kind == "sklearn-cloudpickle":
        import cloudpickle

        with open(path, "rb") as f:
            return cloudpickle.load(f)
    with open(path, "rb") as f:
        return pickle.load(f)


def _main(argv: list[str]) -> int:
    request_path, user = argv[0], argv[1] if len(argv) > 1 else ""
    _demote(user)
    request = Request(**json.loads(Path(request_path).read_text()))
    from quantgate import intake

    loaded = _load(request)
    inputs = [(n, tuple(shape), dtype) for n, shape, dtype in request.inputs]
    out = Path(request.out)
    if request.kind == "pytorch-pt2":
        intake.export_program(loaded, inputs, request.outputs, out)
    elif request.kind == "pytorch-pickle":
        intake.export_module(loaded, inputs, request.outputs, out)
    else:
        intake.convert_estimator(loaded, request.n_features, out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_main(sys.argv[1:]))
    except Exception as exc:  # the parent reports the last stderr line, one line
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        sys.exit(1)
