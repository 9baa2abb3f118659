"""Where pass/fail is decided: policy thresholds against measured metrics, a reason for every failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quantgate.plugins.base import reference_label
from quantgate.policy import GatePolicy


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  # human-readable: what was measured against what was required


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    @property
    def skipped(self) -> bool:
        """Not measured to the end (a quick check, the budget): neither a pass nor a measured failure."""
        return any(c.name == SKIPPED for c in self.checks)


SKIPPED = "skipped"


def skip(reason: str, measured: Verdict | None = None) -> Verdict:
    """A candidate the search stopped before the end, with why; ``measured``: the checks it did get."""
    return Verdict(False, (*(measured.checks if measured else ()), Check(SKIPPED, False, reason)))


def quality_only(gate: GatePolicy) -> GatePolicy:
    """The gate without its latency and size thresholds: what a candidate must pass before it is timed."""
    return gate.model_copy(update={"min_speedup": None})


def _missing(name: str, metric: str) -> Check:
    return Check(name, False, f"{metric} was not measured, so the {name} check cannot pass")


def _accuracy(m: Mapping[str, float], limit: float) -> Check:
    if "accuracy_drop" not in m:
        return _missing("accuracy", "accuracy_drop")
    drop = m["accuracy_drop"]
    text = (
        f"top-1 accuracy {m['accuracy_baseline']:.4f} -> {m['accuracy']:.4f} "
        f"(drop {drop * 100:.2f} points, at most {limit * 100:.2f} allowed)"
    )
    return Check("accuracy", drop <= limit + 1e-12, text)


def _fidelity(m: Mapping[str, float], limit: float) -> Check:
    if "fidelity" not in m:
        return _missing("fidelity", "fidelity")
    value = m["fidelity"]
    return Check("fidelity", value >= limit, f"fidelity (mean cosine) {value:.5f}, at least {limit:.5f} required")


def _speedup(
    m: Mapping[str, float], limit: float, statistic: str, on: str = "warm", against: str = "own_fp32"
) -> Check:
    if on == "first_call":
        if "first_call_speedup" not in m:
            return _missing("speedup", "first_call_speedup")
        value = m["first_call_speedup"]
        text = (
            f"first-call speedup {value:.2f}x ({m.get('baseline_first_call_ms', 0):.2f} -> "
            f"{m.get('first_call_ms', 0):.2f} ms after loading), at least {limit:.2f}x required"
        )
        return Check("speedup", value >= limit, text)
    base = "speedup_vs_ort_fp32" if against == "reference" else "speedup"
    key = base if statistic == "p50" else f"{base}_ci_low"
    if key not in m:
        return _missing("speedup", key)
    batch = int(m.get("gate_batch_size", 1))
    ci = f" (95% CI {m.get(base + '_ci_low', 0):.2f}-{m.get(base + '_ci_high', 0):.2f}"
    ci += f", warm blocks of {int(m['block_calls'])} calls)" if "block_calls" in m else ")"
    what = "speedup" if statistic == "p50" else "speedup lower bound"
    over = f" over {reference_label()}" if against == "reference" else ""
    text = f"{what}{over} {m[key]:.2f}x at batch {batch}{ci}, at least {limit:.2f}x required"
    return Check("speedup", m[key] >= limit, text)


def _size(m: Mapping[str, float], limit: float) -> Check:
    if "size_ratio" not in m:
        return _missing("size", "size_ratio")
    value = m["size_ratio"]
    # 0.1% slack: a candidate with the FP32 weights (e.g. computed in BF16) differs from FP32 only in metadata bytes.
    return Check("size", value <= limit * 1.001, f"size ratio {value:.3f} of FP32, at most {limit:.3f} allowed")


def judge(metrics: Mapping[str, float], gate: GatePolicy, *, has_labels: bool, error: str | None = None) -> Verdict:
    """Apply every configured threshold. A candidate that failed to build fails with that reason only."""
    if error is not None:
        return Verdict(False, (Check("build", False, error),))
    checks: list[Check] = []
    if gate.max_accuracy_drop is not None and has_labels:
        checks.append(_accuracy(metrics, gate.max_accuracy_drop))
    if gate.min_fidelity is not None:
        checks.append(_fidelity(metrics, gate.min_fidelity))
    if gate.min_speedup is not None:
        checks.append(
            _speedup(metrics, gate.min_speedup, gate.speedup_statistic, gate.speedup_on, gate.speedup_against)
        )
    if gate.max_size_ratio is not None:
        checks.append(_size(metrics, gate.max_size_ratio))
    return Verdict(all(c.passed for c in checks), tuple(checks))


def choose_winner(candidates: Sequence[tuple[Verdict, Mapping[str, float]]]) -> int | None:
    """Index of the fastest passing candidate (ties go to the smaller one), or ``None``.

    Each candidate's own speedup is against FP32 on its own runtime; across runtimes they are ranked by the speedup
    against ONNX Runtime FP32, measured side by side with each candidate, when every passing candidate has it.
    """
    passing = [m for v, m in candidates if v.passed]
    common = "speedup_vs_ort_fp32" if passing and all("speedup_vs_ort_fp32" in m for m in passing) else "speedup"
    best: int | None = None
    best_key: tuple[float, float] = (0.0, 0.0)
    for i, (verdict, metrics) in enumerate(candidates):
        if not verdict.passed:
            continue
        key = (metrics.get(common, 0.0), -metrics.get("size_ratio", 1.0))
        if best is None or key > best_key:
            best, best_key = i, key
    return best
