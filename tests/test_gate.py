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


def test_candidate_within_every_threshold_passes() -> None:
    verdict = judge(GOOD, GatePolicy(min_fidelity=0.99), has_labels=True)
    assert verdict.passed
    assert {c.name for c in verdict.checks} == {"accuracy", "fidelity", "speedup", "size"}
    assert verdict.reasons == []


def test_gate_rejects_candidate_slower_than_baseline_with_a_reason() -> None:
    slow = GOOD | {"speedup": 0.3, "speedup_ci_low": 0.28, "speedup_ci_high": 0.31}
    verdict = judge(slow, GatePolicy(), has_labels=True)
    assert not verdict.passed
    assert verdict.reasons == ["speedup lower bound 0.28x at batch 1 (95% CI 0.28-0.31), at least 1.10x required"]


def test_gate_rejects_accuracy_drop_over_the_limit() -> None:
    bad = GOOD | {"accuracy": 0.95, "accuracy_drop": 0.03}
    verdict = judge(bad, GatePolicy(max_accuracy_drop=0.01), has_labels=True)
    assert not verdict.passed
    assert "drop 3.00 points, at most 1.00 allowed" in verdict.reasons[0]


def test_speedup_statistic_p50_gates_on_the_point_estimate() -> None:
    m = GOOD | {"speedup": 1.2, "speedup_ci_low": 1.05}
    assert judge(m, GatePolicy(min_speedup=1.1, speedup_statistic="p50"), has_labels=True).passed
    assert not judge(m, GatePolicy(min_speedup=1.1, speedup_statistic="ci_low"), has_labels=True).passed


def test_accuracy_is_not_checked_without_labels_and_missing_metrics_fail() -> None:
    verdict = judge({"speedup": 2.0, "speedup_ci_low": 2.0}, GatePolicy(min_fidelity=0.9), has_labels=False)
    assert "accuracy" not in {c.name for c in verdict.checks}
    assert "fidelity was not measured" in verdict.reasons[0]


def test_build_error_is_the_only_reason() -> None:
    verdict = judge({}, GatePolicy(), has_labels=True, error="int8-dynamic failed: boom")
    assert not verdict.passed and verdict.reasons == ["int8-dynamic failed: boom"]


def test_winner_is_fastest_passing_candidate() -> None:
    policy = GatePolicy()
    fast_fail = GOOD | {"accuracy_drop": 0.5, "speedup": 9.0}
    slower = GOOD | {"speedup": 2.0}
    faster = GOOD | {"speedup": 3.5}
    cands = [(judge(m, policy, has_labels=True), m) for m in (fast_fail, slower, faster)]
    assert choose_winner(cands) == 2
    assert choose_winner(cands[:1]) is None
