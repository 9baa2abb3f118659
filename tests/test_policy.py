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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gate: {min_speedup: 1e400}", "gate.min_speedup: Input should be a finite number"),
        ("gate: {min_speedup: .inf}", "gate.min_speedup"),
        ("gate: {max_size_ratio: .nan}", "gate.max_size_ratio"),
        ("latency: {rounds: 1e23}", "latency.rounds"),
        ("latency: {rounds: 100000000000000000000000}", "latency.rounds"),
        ("latency: {batch_sizes: [1, 1000000]}", "latency.batch_sizes"),
        ("search: {time_budget_s: 1e300}", "search.time_budget_s"),
        ("data: {calibration_samples: 1e12}", "data.calibration_samples"),
        ("gate: {min_speedup: 5000}", "gate.min_speedup"),
    ],
)
def test_numeric_settings_are_bounded_and_finite(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policy(f)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_a_binary_policy_file_is_refused_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd" * 20)
    with pytest.raises(PolicyError, match="not UTF-8 text"):
        load_policy(f)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "a:\n" for i in range(1, 60))])
def test_a_deeply_nested_policy_is_refused_in_one_line(tmp_path: Path, text: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError, match="nested more than 32 levels deep") as exc:
        load_policy(f)
    assert "\n" not in str(exc.value)


def test_settings_added_later_keep_the_hash_of_policies_that_leave_them_at_their_default() -> None:
    # The hash recorded on every source version before `intake` and `data.allow_non_finite` existed.
    assert Policy().digest() == "1d8f079acd54c9fc"
    assert parse_policy({"intake": {"allow_pickle": True}}).digest() != Policy().digest()
    assert parse_policy({"data": {"allow_non_finite": True}}).digest() != Policy().digest()
