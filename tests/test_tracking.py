"""Registration is all or nothing, against a real MLflow store."""

from pathlib import Path

import pytest

from quantgate import registry, tracking
from quantgate.errors import RegistrationError
from quantgate.gate import Check, Verdict
from quantgate.hardware import detect
from quantgate.model import read_model_info
from quantgate.plugins.base import Recipe
from quantgate.policy import Policy, RegistryPolicy
from quantgate.result import CandidateResult, CompressionResult
from tests.conftest import model_versions, register_onnx


def _passed(recipe: str, artifact: Path) -> CandidateResult:
    return CandidateResult(
        Recipe.make("onnxruntime", recipe, "int8", n=recipe),
        {"speedup": 2.0, "size_ratio": 0.3},
        Verdict(True, (Check("speedup", True, "ok"),)),
        detect(),
        artifact=artifact,
    )


def test_a_failure_midway_rolls_back_every_version_registered_by_the_call(tracking_uri: str, digits_onnx: Path) -> None:
    register_onnx(tracking_uri, digits_onnx, "digits")
    client = registry.connect(tracking_uri)
    source = registry.resolve(client, registry.parse_model_uri("models:/digits/1"))
    good = _passed("a", digits_onnx)
    good.promoted = True
    broken = _passed("b", digits_onnx)
    result = CompressionResult(source, "onnx", "hash", detect(), [good, broken], "quantgate")
    # A real failure from MLflow: an alias name the registry refuses, set after both versions exist.
    # (Policy validation refuses that alias; model_construct skips it to reach MLflow's own refusal.)
    policy = Policy.model_construct(registry=RegistryPolicy.model_construct(alias="latest"))
    with pytest.raises(RegistrationError, match="rolled back"):
        tracking.record(client, result, policy, read_model_info(digits_onnx), {})
    assert [v[0] for v in model_versions(tracking_uri)] == ["digits"]
    assert good.registered_uri is None and broken.registered_uri is None
    assert not any(k.startswith("quantgate.") for k in client.get_model_version("digits", "1").tags)
