from typing import Any

import pytest
from pydantic import Field

from quantgate.errors import PolicyError
from quantgate.gate import choose_winner, configure, judge, policy_key
from quantgate.policy import GatePolicy, parse_policy
from quantgate.validators.base import (
    CheckSpec,
    Measurement,
    Threshold,
    check_declarations,
    load_validators,
    metric_key,
    own_metrics,
    publish,
)

GOOD = {
    "accuracy_baseline": 0.98,
    "accuracy": 0.975,
    "accuracy_drop": 0.005,
    "fidelity": 0.999,
    "speedup": 3.0,
    "speedup_ci_low": 2.8,
    "speedup_ci_high": 3.1,
    "size_ratio": 0.26,
    "gate_batch_size": 1,
}


def test_speedup_is_gated_against_the_reference_runtime_by_default() -> None:
    # An OpenVINO candidate 1.05x its own FP32 IR, which is itself 2x ONNX Runtime FP32: the original as MLflow
    # serves it is 2.1x slower.
    m = GOOD | {"speedup": 1.05, "speedup_ci_low": 1.02, "speedup_ci_high": 1.08}
    m |= {"speedup_vs_ort_fp32": 2.1, "speedup_vs_ort_fp32_ci_low": 2.05, "speedup_vs_ort_fp32_ci_high": 2.2}
    verdict = judge(m, GatePolicy(min_fidelity=0.99), has_labels=True)
    assert verdict.passed
    speed = next(c for c in verdict.checks if c.name == "speedup")
    assert speed.detail == (
        "speedup lower bound over ONNX Runtime FP32 2.05x at batch 1 (95% CI 2.05-2.20), at least 1.10x required"
    )
    assert not judge(m, GatePolicy(min_fidelity=0.99, speedup_against="own_fp32"), has_labels=True).passed


def test_a_speedup_against_the_reference_that_was_not_measured_fails_and_says_so() -> None:
    verdict = judge(GOOD, GatePolicy(), has_labels=True)
    assert verdict.reasons == ["speedup_vs_ort_fp32_ci_low was not measured, so the speedup check cannot pass"]


def test_candidate_within_every_threshold_passes() -> None:
    verdict = judge(GOOD, GatePolicy(speedup_against="own_fp32", min_fidelity=0.99), has_labels=True)
    assert verdict.passed
    assert {c.name for c in verdict.checks} == {"accuracy", "fidelity", "speedup", "size"}
    assert verdict.reasons == []


def test_gate_rejects_candidate_slower_than_baseline_with_a_reason() -> None:
    slow = GOOD | {"speedup": 0.3, "speedup_ci_low": 0.28, "speedup_ci_high": 0.31}
    verdict = judge(slow, GatePolicy(speedup_against="own_fp32"), has_labels=True)
    assert not verdict.passed
    assert verdict.reasons == ["speedup lower bound 0.28x at batch 1 (95% CI 0.28-0.31), at least 1.10x required"]


def test_gate_rejects_accuracy_drop_over_the_limit() -> None:
    bad = GOOD | {"accuracy": 0.95, "accuracy_drop": 0.03}
    verdict = judge(bad, GatePolicy(speedup_against="own_fp32", max_accuracy_drop=0.01), has_labels=True)
    assert not verdict.passed
    assert "drop 3.00 points, at most 1.00 allowed" in verdict.reasons[0]


def test_speedup_statistic_p50_gates_on_the_point_estimate() -> None:
    m = GOOD | {"speedup": 1.2, "speedup_ci_low": 1.05}
    assert judge(
        m, GatePolicy(speedup_against="own_fp32", min_speedup=1.1, speedup_statistic="p50"), has_labels=True
    ).passed
    assert not judge(
        m, GatePolicy(speedup_against="own_fp32", min_speedup=1.1, speedup_statistic="ci_low"), has_labels=True
    ).passed


def test_accuracy_is_not_checked_without_labels_and_missing_metrics_fail() -> None:
    verdict = judge(
        {"speedup": 2.0, "speedup_ci_low": 2.0},
        GatePolicy(speedup_against="own_fp32", min_fidelity=0.9),
        has_labels=False,
    )
    assert "accuracy" not in {c.name for c in verdict.checks}
    assert "fidelity was not measured" in verdict.reasons[0]


def test_build_error_is_the_only_reason() -> None:
    verdict = judge({}, GatePolicy(speedup_against="own_fp32"), has_labels=True, error="int8-dynamic failed: boom")
    assert not verdict.passed and verdict.reasons == ["int8-dynamic failed: boom"]


def test_winner_is_fastest_passing_candidate() -> None:
    policy = GatePolicy(speedup_against="own_fp32")
    fast_fail = GOOD | {"accuracy_drop": 0.5, "speedup": 9.0}
    slower = GOOD | {"speedup": 2.0}
    faster = GOOD | {"speedup": 3.5}
    cands = [(judge(m, policy, has_labels=True), m) for m in (fast_fail, slower, faster)]
    assert choose_winner(cands) == 2
    assert choose_winner(cands[:1]) is None


# -- checks declared by a validator (a third party's, here in-process), set under gate.checks ----------------------


class Energy:
    """A third-party validator that gates: it reports ``ratio`` (declared) and ``speedup`` (not declared)."""

    name = "energy"
    metric_names = ("energy_ratio",)

    def applies(self, ctx: Any) -> bool:
        return True

    def checks(self) -> tuple[CheckSpec[Any], ...]:
        return (
            CheckSpec("max_ratio", "energy_ratio", "max", Threshold, "candidate energy / FP32 energy"),
            CheckSpec("max_joules", "joules", "max", Joules, "energy per call", needs_labels=True),
        )

    def measure(self, ctx: Any) -> Measurement:
        return Measurement(self.name, {"energy_ratio": 0.5, "joules": 2.0, "speedup": 99.0})


class Joules(Threshold):
    limit: float = Field(gt=0.0)
    batch: int = 1


def _installed() -> list[Any]:
    return [*load_validators(), Energy()]


def _gate(checks: dict[str, Any], **top: Any) -> GatePolicy:
    return parse_policy({"gate": {"checks": checks, **top}}).gate


def test_a_validators_declared_check_gates_under_gate_checks_with_its_metrics_under_its_own_name() -> None:
    energy = Energy()
    metrics = GOOD | publish(energy, energy.measure(None).metrics)
    assert metrics["speedup"] == 3.0 and metrics["energy.speedup"] == 99.0  # never over the latency validator's
    assert metrics["energy_ratio"] == 0.5 and metrics["energy.joules"] == 2.0
    gate = _gate({"energy": {"max_ratio": 0.6, "max_joules": {"limit": 1.5, "batch": 8}}}, speedup_against="own_fp32")
    verdict = judge(metrics, gate, has_labels=True, validators=_installed())
    assert [c.name for c in verdict.checks] == ["accuracy", "speedup", "size", "max_ratio", "max_joules"]
    assert not verdict.passed
    assert verdict.reasons == ["energy.joules 2, at most 1.5 allowed"]
    assert next(c for c in verdict.checks if c.name == "max_ratio").detail == "energy_ratio 0.5, at most 0.6 allowed"
    # Without labels, a check that needs them is left out; the others stand.
    assert judge(metrics, gate, has_labels=False, validators=_installed()).passed


def test_a_declared_check_whose_metric_was_not_measured_fails_naming_it() -> None:
    gate = _gate({"energy": {"max_joules": 3}}, speedup_against="own_fp32")
    verdict = judge(GOOD, gate, has_labels=True, validators=_installed())
    assert verdict.reasons == ["energy.joules was not measured, so the max_joules check cannot pass"]


def test_only_the_named_validators_checks_apply_before_the_others_are_measured() -> None:
    gate = _gate({"energy": {"max_ratio": 0.6}}, speedup_against="own_fp32")
    quality = judge({}, gate, has_labels=True, validators=_installed(), only=["energy"])
    assert [c.name for c in quality.checks] == ["max_ratio"]


@pytest.mark.parametrize(
    ("checks", "top", "message"),
    [
        ({"enrgy": {"max_ratio": 1}}, {}, "gate.checks.enrgy: unknown validator 'enrgy'; did you mean 'energy'?"),
        ({"energy": {"max_rato": 1}}, {}, "unknown check 'max_rato' of validator 'energy'; did you mean 'max_ratio'?"),
        (
            {"fidelity": {"fidelity": 0.9}},
            {},
            "gate.checks.fidelity.fidelity: this check is set with gate.min_fidelity",
        ),
        ({"size": {"x": 1}}, {}, "gate.checks.size.x: unknown check 'x' of validator 'size'"),
        ({"energy": {"max_joules": -1}}, {}, "gate.checks.energy.max_joules.limit: Input should be greater than 0"),
        ({"energy": {"max_joules": "1e400"}}, {}, "gate.checks.energy.max_joules.limit: Input should be a finite"),
        ({"energy": {"max_joules": {"limit": 1, "batsh": 2}}}, {}, "max_joules.batsh: unknown setting"),
        ({"energy": {"max_joules": {"batch": 2}}}, {}, "gate.checks.energy.max_joules.limit: Field required"),
    ],
)
def test_gate_checks_are_strictly_validated_against_what_validators_declare(
    checks: dict[str, Any], top: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError) as err:
        configure(_gate(checks, **top), _installed())
    text = str(err.value)
    assert text.startswith("invalid policy: ") and message in text and "\n" not in text, text


def test_a_top_level_gate_key_whose_validator_is_not_installed_is_a_policy_error() -> None:
    without_latency = [v for v in load_validators() if v.name != "latency"]
    with pytest.raises(PolicyError, match=r"gate.min_speedup needs the speedup check of the 'latency' validator"):
        configure(GatePolicy(), without_latency)
    assert [c.spec.name for c in configure(GatePolicy(min_speedup=None), without_latency)] == ["accuracy", "size"]


def test_the_built_in_checks_are_declared_by_the_built_in_validators_and_set_by_the_documented_keys() -> None:
    configured = configure(GatePolicy(min_fidelity=0.99, speedup_statistic="p50"), load_validators())
    assert [(c.validator.name, c.spec.name, c.settings.limit) for c in configured] == [
        ("accuracy", "accuracy", 0.01),
        ("fidelity", "fidelity", 0.99),
        ("latency", "speedup", 1.1),
        ("size", "size", 1.0),
    ]
    assert configured[2].settings.model_dump() == {
        "limit": 1.1, "statistic": "p50", "against": "reference", "on": "warm"
    }  # fmt: skip
    assert policy_key("latency", "speedup") == "gate.min_speedup"
    assert policy_key("energy", "max_ratio") == "gate.checks.energy.max_ratio"


class Clash:
    name = "clash"
    metric_names: tuple[str, ...] = ("clash_x",)
    check_names: tuple[str, ...] = ()

    def applies(self, ctx: Any) -> bool:
        return True

    def checks(self) -> tuple[CheckSpec[Any], ...]:
        return tuple(CheckSpec(n, "clash_x", "min", Threshold) for n in self.check_names)

    def measure(self, ctx: Any) -> Measurement:
        return Measurement(self.name, {})


@pytest.mark.parametrize(
    ("metrics", "checks", "message"),
    [
        (("speedup",), (), "validator 'clash' declares metric 'speedup', which validator 'latency' declares too"),
        (("latency_p50_ms_b*",), (), "declares metric 'latency_p50_ms_b*', which validator 'latency' declares too"),
        (("speed*",), (), "declares metric 'speed*', which validator 'latency' declares too"),
        (("qat_loss",), (), "declares metric 'qat_loss', which quantgate itself declares too"),
        (("clash.x",), (), "declares metric 'clash.x': letters, digits and '_'"),
        ((), ("size",), "declares gate check 'size', which validator 'size' declares too"),
        ((), ("hardware",), "declares gate check 'hardware', which quantgate itself declares too"),
    ],
)
def test_two_validators_can_never_own_the_same_metric_or_check_name(
    metrics: tuple[str, ...], checks: tuple[str, ...], message: str
) -> None:
    clash = Clash()
    clash.metric_names, clash.check_names = metrics, checks
    with pytest.raises(PolicyError) as err:
        check_declarations([*load_validators(), clash])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    check_declarations([*load_validators(), Clash()])  # its own names: no clash


def test_undeclared_metrics_are_namespaced_and_read_back_by_their_validator() -> None:
    energy = Energy()
    assert metric_key(energy, "energy_ratio") == "energy_ratio" and metric_key(energy, "joules") == "energy.joules"
    published = publish(energy, {"energy_ratio": 1.0, "joules": 2.0})
    assert own_metrics(energy, GOOD | published) == {"energy_ratio": 1.0, "joules": 2.0}
