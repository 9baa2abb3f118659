"""The backend interface and the entry-point registry every backend (ours included) is found through."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendUnavailable, PolicyError
from quantgate.model import ModelInfo

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


class Backend(Protocol):
    name: str

    def available(self) -> Availability: ...

    def recipes(self, model: ModelInfo) -> list[Recipe]: ...

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate: ...

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate: ...

    def runner(self, candidate: Candidate, *, threads: int) -> Runner: ...


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


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def backend_names() -> list[str]:
    return sorted(_entry_points(BACKENDS_GROUP))


def load_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name`` in the ``quantgate.backends`` group."""
    eps = _entry_points(BACKENDS_GROUP)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise PolicyError(f"unknown backend '{name}' (installed backends: {known})")
    try:
        factory = eps[name].load()
    except ImportError as exc:
        hint = f"pip install quantgate[{name}]"
        raise BackendUnavailable(name, f"cannot import {eps[name].value}: {exc}", hint) from None
    backend: Backend = factory()
    return backend


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
