from quantgate.gate import choose_winner, judge
from quantgate.policy import GatePolicy

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
