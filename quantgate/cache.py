"""Measurements reused across runs: same model, recipe, data, host and libraries give the same candidate.

A nightly pass over unchanged versions, or a rerun with a stricter gate, should re-gate what was measured, not measure
it again. The key covers everything a measurement depends on; the gate's thresholds are not in it (they are applied
to the cached metrics again), except where a recipe tunes itself to the gate (accuracy control): then they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.hardware import Hardware
from quantgate.plugins.base import Recipe, model_files
from quantgate.policy import Policy
from quantgate.result import CandidateResult

log = logging.getLogger(__name__)

CACHE_ENV = "QUANTGATE_CACHE_DIR"
_VERSION = 1


def default_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quantgate") / "candidates"


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class RunKey:
    """What every candidate of one run shares: model, data, host, libraries, how it is measured."""

    digest: str

    @classmethod
    def make(cls, model: Path, calibration: Path, evaluation: Path, hardware: Hardware, policy: Policy) -> RunKey:
        parts: dict[str, Any] = {
            "v": _VERSION,
            "model": file_digest(list(model_files(model))),
            "calibration": file_digest([calibration]),
            "evaluation": file_digest([evaluation]),
            "host": hardware.fingerprint(),
            "libraries": hardware.libraries,
            "latency": policy.latency.model_dump(mode="json"),
            "data": policy.data.model_dump(mode="json", exclude={"calibration", "evaluation"}),
            "quick_samples": policy.search.quick_samples,
        }
        return cls(_hash(parts))

    def for_recipe(self, recipe: Recipe, tuning: dict[str, Any] | None) -> str:
        return _hash({"run": self.digest, "recipe": recipe.digest, "tuning": tuning})


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CandidateCache:
    """A directory of measured candidates: ``<key>/record.json`` plus the artifact's files."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_dir()

    def get(self, key: str) -> CandidateResult | None:
        entry = self.root / key
        try:
            record = json.loads((entry / "record.json").read_text())
            result = CandidateResult.from_record(record)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        artifact = record.get("cached_artifact")
        if artifact:
            path = entry / "files" / str(artifact)
            if not path.exists():
                return None
            result.artifact = path
        return result

    def put(self, key: str, result: CandidateResult, files: tuple[Path, ...]) -> None:
        """Store a measured result; a failure to write the cache never fails the run."""
        entry = self.root / key
        tmp = self.root / f".{key}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "files").mkdir(parents=True)
            for f in files:
                shutil.copy2(f, tmp / "files" / f.name)
            record = result.to_record() | {"cached_artifact": result.artifact.name if result.artifact else None}
            (tmp / "record.json").write_text(json.dumps(record, default=str))
            shutil.rmtree(entry, ignore_errors=True)
            tmp.rename(entry)
        except OSError as exc:
            log.warning("could not cache %s/%s: %s", result.backend, result.recipe.name, exc)
            shutil.rmtree(tmp, ignore_errors=True)
