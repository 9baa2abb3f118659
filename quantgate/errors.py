"""quantgate's exception hierarchy: one place, one meaning per type.

The CLI maps these to exit codes (see README, "Exit codes"):
``InputError`` and its subclasses -> 2; any other ``QuantgateError`` -> 3 (``InfrastructureError`` among
them: never a gate verdict). No candidate passing the gate is a result, not an error: exit 1.
"""

from __future__ import annotations

from pathlib import Path


class QuantgateError(Exception):
    """Base of every error quantgate raises on purpose. Its message never holds a credential: it is printed,
    logged, written on the source version and stored by Prefect as the flow run's state message."""

    def __init__(self, *args: object) -> None:
        from quantgate.redact import redact

        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class InputError(QuantgateError):
    """The user gave something we cannot work with: a URI, a file, a policy, data."""


class PolicyError(InputError):
    """The policy file is missing, unreadable or invalid."""


class ModelNotFound(InputError):
    """The registered model, version or alias does not exist."""


class UnsupportedFlavor(InputError):
    """The registered model's MLflow flavor cannot be turned into ONNX."""


class InvalidModel(InputError):
    """The model artifact is corrupt, truncated or not a valid ONNX graph."""


class DataError(InputError):
    """Calibration or evaluation data is missing or does not match the model's inputs."""


class TrackingUnavailable(InputError):
    """The MLflow tracking server cannot be reached."""


class UnsafeModel(InputError):
    """The model's format runs code when it is loaded (pickle), and this run does not allow that."""


class BackendUnavailable(QuantgateError):
    """A backend's library is not installed, or its hardware is missing on this host."""

    def __init__(self, backend: str, reason: str, hint: str = "") -> None:
        self.backend = backend
        self.reason = reason
        self.hint = hint
        super().__init__(f"backend '{backend}' is unavailable: {reason}" + (f" ({hint})" if hint else ""))


class NeedsTargetHardware(BackendUnavailable):
    """The host-independent part of a recipe ran here; the rest needs other hardware (e.g. an NVIDIA GPU worker).

    ``artifact`` is an ONNX file any host can run, so its quality can still be checked here.
    """

    def __init__(self, backend: str, artifact: Path, reason: str, hint: str = "", notes: tuple[str, ...] = ()) -> None:
        self.artifact = artifact
        self.notes = notes
        super().__init__(backend, reason, hint)


class BackendError(QuantgateError):
    """A backend failed to produce a candidate for one recipe."""


class InfrastructureError(QuantgateError):
    """Something the run depends on failed, not the model or the recipe: a backend process crashed, the disk or
    memory ran out, MLflow answered 5xx. The run ends ``failed`` with the reason (exit 3) and the nightly pass
    retries it; only a measured gate failure is ``none_passed``."""


class RegistrationError(QuantgateError):
    """Registering compressed versions in MLflow failed; nothing was left half-registered."""


# errno values that say the machine, not the model or the recipe, failed.
_INFRA_ERRNOS = frozenset({12, 5, 28, 30, 23, 24, 122})  # ENOMEM EIO ENOSPC EROFS ENFILE EMFILE EDQUOT
# What native libraries (ONNX Runtime, OpenVINO, NNCF) say when they run out of memory or disk: they rarely chain.
_INFRA_TEXT = ("No space left on device", "Cannot allocate memory", "bad_alloc", "out of memory", "Disk quota")


def infrastructure_cause(exc: BaseException) -> str | None:
    """Why ``exc`` is the machine's failure (out of memory or disk, an I/O error), or ``None`` when it is not."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return "out of memory"
        if isinstance(current, OSError) and current.errno in _INFRA_ERRNOS:
            return current.strerror or str(current)
        text = str(current)
        hit = next((t for t in _INFRA_TEXT if t.lower() in text.lower()), None)
        if hit is not None:
            return hit
        current = current.__cause__ or current.__context__
    return None


def raise_if_infrastructure(exc: BaseException, what: str) -> None:
    """Re-raise a backend's failure as ``InfrastructureError`` when the machine caused it (it is no verdict)."""
    cause = infrastructure_cause(exc)
    if cause is not None:
        raise InfrastructureError(f"{what}: {cause} ({exc})") from exc
