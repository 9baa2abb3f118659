"""quantgate's exception hierarchy: one place, one meaning per type.

The CLI maps these to exit codes (see README, "Exit codes"):
``InputError`` and its subclasses -> 2; ``GateFailed`` -> 1; any other
``QuantgateError`` -> 3 (``InfrastructureError`` among them: never a gate verdict).
"""

from __future__ import annotations

from pathlib import Path


class QuantgateError(Exception):
    """Base of every error quantgate raises on purpose."""


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


class GateFailed(QuantgateError):
    """The pipeline ran, but no candidate passed the gate."""
