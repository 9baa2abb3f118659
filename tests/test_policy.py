from pathlib import Path

import pytest

from quantgate.errors import PolicyError
from quantgate.policy import Policy, load_policy, parse_policy


def test_defaults_without_a_file() -> None:
    policy = load_policy(None)
    assert policy.backends == ("onnxruntime",)
    assert policy.gate.max_accuracy_drop == 0.01
    assert policy.registry.alias == "compressed"


def test_full_policy_parses_and_relative_data_is_relative_to_the_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(
        "backends: [onnxruntime]\n"
        "recipes: [int8-static-qdq-minmax-perchannel]\n"
        "data: {calibration: data/calib.npz, evaluation: runs:/abc/eval.npz}\n"
        "gate: {max_accuracy_drop: 0.02, min_fidelity: 0.99, min_speedup: 2.0, max_size_ratio: 0.5}\n"
    )
    policy = load_policy(f)
    assert policy.data.calibration == str(tmp_path / "data" / "calib.npz")
    assert policy.data.evaluation == "runs:/abc/eval.npz"
    assert policy.gate.min_speedup == 2.0
    assert policy.recipes == ("int8-static-qdq-minmax-perchannel",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gate: {min_speedup: fast}", "gate.min_speedup"),
        ("gate: {max_accuracy_drop: -1}", "gate.max_accuracy_drop"),
        ("gaet: {}", "gaet: unknown setting"),
        ("backends: []", "backends"),
        ("- just\n- a list", "expected a mapping"),
        ("gate: {min_speedup: [1", "not valid YAML at line"),
        ("registry: {alias: latest}", "registry.alias"),
        ("registry: {alias: 'has space'}", "registry.alias"),
    ],
)
def test_invalid_policy_gives_one_line_naming_the_setting(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policy(f)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_digest_is_stable_and_changes_with_any_setting() -> None:
    a, b = Policy(), parse_policy({})
    assert a.digest() == b.digest()
    assert parse_policy({"gate": {"min_speedup": 2}}).digest() != a.digest()

    assert parse_policy({"intake": {"allow_pickle": True}}).digest() != Policy().digest()
    assert parse_policy({"data": {"allow_non_finite": True}}).digest() != Policy().digest()


def test_qat_settings_change_the_policy_hash_only_when_set() -> None:
    assert Policy().digest() == Policy.model_validate({"qat": {}, "data": {"training": None}}).digest()
    assert Policy.model_validate({"qat": {"epochs": 9}}).digest() != Policy().digest()
    assert Policy.model_validate({"data": {"training": "t.npz"}}).digest() != Policy().digest()


def test_gate_checks_change_the_policy_hash_only_when_set() -> None:
    assert Policy().digest() == Policy.model_validate({"gate": {"checks": {}}}).digest()
    assert Policy.model_validate({"gate": {"checks": {"energy": {"max_ratio": 0.9}}}}).digest() != Policy().digest()
