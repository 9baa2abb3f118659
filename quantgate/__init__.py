"""quantgate: compress models from the MLflow Model Registry, gate them on this hardware, register back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantgate.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    InputError,
    InvalidModel,
    ModelNotFound,
    PolicyError,
    QuantgateError,
    RegistrationError,
    TrackingUnavailable,
    UnsupportedFlavor,
)
from quantgate.policy import Policy, load_policy

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "DataError",
    "InputError",
    "InvalidModel",
    "ModelNotFound",
    "Policy",
    "PolicyError",
    "QuantgateError",
    "RegistrationError",
    "TrackingUnavailable",
    "UnsupportedFlavor",
    "compress",
    "load_policy",
]


def compress(model_uri: str, policy: Policy | Path | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run the ``compress-model`` flow and return its JSON document (see README)."""
    import os

    from quantgate.flows.compress import compress_model
    from quantgate.registry import flow_tracking_uri

    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    if tracking_uri is None:
        result: dict[str, Any] = compress_model(model_uri, pol.model_dump(mode="json"), None)
        return result
    # The flow run's parameters are stored by Prefect: the URI's credentials reach it through the environment.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        result = compress_model(model_uri, pol.model_dump(mode="json"), flow_tracking_uri(tracking_uri))
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return result
