"""The backend interface and the entry-point registry every backend (ours included) is found through."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendUnavailable
from quantgate.model import ModelInfo
from quantgate.plugins.registry import PLUGIN_API_VERSION as PLUGIN_API_VERSION  # a plugin imports it from here
from quantgate.plugins.registry import PluginRegistry

log = logging.getLogger(__name__)

BACKENDS_GROUP = "quantgate.backends"

SettingValue = str | int | float | bool | None


@dataclass(frozen=True)
class Recipe:
    """One way to compress a model. ``name`` is stable; ``digest`` covers every setting."""

    backend: str
    name: str
    precision: str  # "int8", "fp16", ... names the sibling registered model
    settings: tuple[tuple[str, SettingValue], ...] = ()

    @classmethod
    def make(cls, backend: str, name: str, precision: str, **settings: SettingValue) -> Recipe:
        return cls(backend, name, precision, tuple(sorted(settings.items())))

    @property
    def options(self) -> dict[str, SettingValue]:
        return dict(self.settings)

    @property
    def digest(self) -> str:
        payload: dict[str, object] = {"backend": self.backend, "name": self.name, "precision": self.precision}
        payload["settings"] = dict(self.settings)
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """What a backend produced for one recipe: an artifact on disk and how it was made."""

    recipe: Recipe
    artifact: Path
    notes: tuple[str, ...] = ()
    files: tuple[Path, ...] = field(default=())  # every file that makes up the artifact (for size)
    # What the build measured that the result should carry (e.g. a fine-tuning's loss curve: details["qat"]).
    details: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def size_bytes(self) -> int:
        paths = self.files or (self.artifact,)
        return sum(p.stat().st_size for p in paths)


@dataclass(frozen=True)
class Calibration:
    """Calibration data as a backend sees it: a streamed data set, a batch size and a sample cap."""

    dataset: NpzDataset
    batch_size: int = 16
    limit: int | None = None


@runtime_checkable
class Runner(Protocol):
    """Something validators can call: inputs by name in, outputs in graph order out."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


@runtime_checkable
class BareCall(Protocol):
    """Optional on a runner: the runtime's own call with these inputs already bound, and nothing around it.

    The latency validator times it against ``run`` on a trivial model to measure the runner's own overhead.
    """

    def bare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], object]: ...


@runtime_checkable
class SpecializesShapes(Protocol):
    """Optional on a backend: a candidate's artifact compiled for the input shapes it is called with.

    The search measures the variant next to the best candidates (nothing is rebuilt: same artifact, another way of
    compiling it) and registers it like any candidate, so it is served the way it was timed.
    """

    def specialize(self, candidate: Candidate) -> Candidate | None: ...


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    hint: str = ""
    # Not ok, but compress() still does its host-independent step here and then raises NeedsTargetHardware.
    prepares_here: bool = False


@dataclass(frozen=True)
class ModelLogging:
    """What a backend needs to log a candidate as an MLflow model of the candidate's run.

    ``mlflow_args``: keyword arguments for ``mlflow.models.Model.log`` that quantgate owns (name, run and logged
    model ids, the source model's signature); pass them through. ``libraries``: the versions measured on this host,
    for exact ``pip_requirements`` (``quantgate.serving.pins``).
    """

    artifact: Path
    recipe: Recipe
    libraries: Mapping[str, str]
    mlflow_args: Mapping[str, Any]


@runtime_checkable
class Backend(Protocol):
    """Everything quantgate needs from a backend: build candidates, run them for validators, log them for serving."""

    name: str

    def available(self) -> Availability: ...

    def recipes(self, model: ModelInfo) -> list[Recipe]: ...

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate: ...

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate: ...

    def runner(self, candidate: Candidate, *, threads: int) -> Runner: ...

    def log_model(self, request: ModelLogging) -> str:
        """Log the artifact so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run it; its model URI."""
        ...


@runtime_checkable
class TunesAccuracy(Protocol):
    """Optional on a backend: recipes that search against the gate's own metric and allowed drop while building."""

    def configure_accuracy_control(
        self,
        validation: NpzDataset,
        metric: Any,
        max_drop: float,
        time_budget_s: float,
        *,
        limit: int | None = None,
        caveat: str = "",
    ) -> None: ...


@runtime_checkable
class ReferenceRuntime(Protocol):
    """Optional on a backend: its FP32 baseline can be the yardstick every backend's candidates are ranked on.

    The registry picks the declared one with the lowest ``reference_rank`` (ties by name); ``reference_label`` is how
    the gate's text names it.
    """

    reference_label: str
    reference_rank: int


@runtime_checkable
class FineTunes(Protocol):
    """Optional on a backend: quantization-aware fine-tuning recipes (``kind="qat"``) for pytorch models.

    ``qat_recipes`` are offered apart from ``recipes``: they run only when a policy names them or when no
    post-training recipe holds the quality gate (quantgate.qat). ``configure_qat`` gives the backend the job (the
    source's torch program, the training data, the budget) before ``compress`` builds such a recipe.
    """

    def qat_recipes(self, model: ModelInfo) -> list[Recipe]: ...

    def configure_qat(self, job: object) -> None: ...


# Where a long build reports how far it got (set by the build worker, or in-process by the caller).
_progress_sink: Callable[[str], None] | None = None


def set_build_progress(sink: Callable[[str], None] | None) -> None:
    global _progress_sink
    _progress_sink = sink


def build_progress(text: str) -> None:
    """A backend's word on how far a long build got (a fine-tuning's epoch and loss): shown live, never required."""
    if _progress_sink is not None:
        _progress_sink(text)
    else:
        log.info("%s", text)


def _install_hint(name: str) -> str:
    return f"pip install quantgate[{name}]"


BACKENDS: PluginRegistry[Backend] = PluginRegistry(BACKENDS_GROUP, "backend", Backend, _install_hint)


def backend_names() -> list[str]:
    return BACKENDS.names()


def load_backend(name: str) -> Backend:
    """The backend registered under ``name`` in the ``quantgate.backends`` group, built once per process."""
    return BACKENDS.load(name)


def fresh_backend(name: str) -> Backend:
    """A new instance of backend ``name``: what a run configures (accuracy control, fine-tuning) before building."""
    return BACKENDS.fresh(name)


def reference_backend() -> Backend:
    """The backend whose FP32 baseline every candidate is also timed against, so backends rank on one scale."""
    declared: list[Backend] = []
    for name in BACKENDS.names():
        try:
            backend = BACKENDS.load(name)
        except BackendUnavailable:  # a refused plugin is reported where it is named, not by every run
            continue
        if isinstance(backend, ReferenceRuntime):
            declared.append(backend)
    if not declared:
        raise BackendUnavailable("reference", "no installed backend declares the ReferenceRuntime capability")
    return min(declared, key=lambda b: (b.reference_rank, b.name))  # type: ignore[attr-defined]


def reference_name() -> str:
    return reference_backend().name


def reference_label() -> str:
    backend = reference_backend()
    assert isinstance(backend, ReferenceRuntime)
    return backend.reference_label


def select_recipes(backend: Backend, model: ModelInfo, wanted: Sequence[str] | None) -> list[Recipe]:
    """The backend's recipes for this model, restricted to ``wanted`` when given."""
    recipes = backend.recipes(model)
    if wanted is None:
        return recipes
    return [r for r in recipes if r.name in set(wanted)]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages can run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def model_files(path: Path) -> tuple[Path, ...]:
    """The .onnx file plus any external-data files it references (what a candidate's size counts)."""
    import onnx

    files = [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # size is best-effort for the file list; validity is checked elsewhere
        return tuple(files)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                candidate = path.parent / entry.value
                if candidate.exists() and candidate not in files:
                    files.append(candidate)
    return tuple(files)
