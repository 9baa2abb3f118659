"""The staged, budgeted search: what it skips and why, its order, its budget, its cache, its progress events."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from quantgate import pipeline
from quantgate.build import BuildWorker
from quantgate.cache import CandidateCache, RunKey
from quantgate.data import NpzDataset
from quantgate.hardware import detect
from quantgate.model import read_model_info
from quantgate.plugins.base import Calibration, Recipe
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend
from quantgate.policy import Policy, parse_policy
from quantgate.search import Budget, Planned, cannot_beat, next_index, prior
from quantgate.validators.base import collect_outputs
from tests.conftest import test_policy

STATIC = "int8-static-qdq-minmax-perchannel"


@pytest.fixture()
def setup(digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = read_model_info(digits_onnx)
    data = pipeline.DataSets(NpzDataset.open(calib_npz), NpzDataset.open(eval_npz), "c", "e")
    backend = OnnxRuntimeBackend()
    cand = backend.baseline(model, tmp_path)
    runner = backend.runner(cand, threads=1)
    base = pipeline.Baseline(backend, cand, runner, collect_outputs(runner, data.evaluation, None))
    recipe = next(r for r in backend.recipes(model) if r.name == STATIC)
    return model, data, base, recipe


def _policy(calib: Path, evaluation: Path, **overrides: object) -> Policy:
    return parse_policy(test_policy(calib, evaluation, **overrides))


def test_a_candidate_far_outside_the_gate_stops_at_the_quick_check_and_says_why(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    model, data, base, recipe = setup
    # INT8 keeps top-1 on digits but its outputs are not identical to FP32's: far below a 0.999999 fidelity gate.
    policy = _policy(calib_npz, eval_npz, gate={"min_fidelity": 0.999999})
    state = pipeline.SearchState.for_policy(policy, 1)
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, state=state)
    assert run.result.status == "skipped"
    (reason,) = run.result.verdict.reasons
    assert reason.startswith("quick check on 64 samples: fidelity") and "far below the 0.999999 required" in reason
    assert "latency_p50_ms" not in run.result.metrics and state.quality_failed == 1
    assert run.result.to_dict()["status"] == "skipped"


def test_a_candidate_failing_full_quality_is_probed_once_per_family_never_gated_on_speed(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz, gate={"max_size_ratio": 0.01}, search={"quick_samples": 8})
    state = pipeline.SearchState.for_policy(policy, 2)
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, state=state)
    assert run.result.status == "failed"
    assert [c.name for c in run.result.verdict.checks if not c.passed] == ["size"]  # no speed check at all
    assert "latency_p50_ms" not in run.result.metrics
    m = run.result.metrics
    assert (
        m["probe_speedup_vs_ort_fp32_ci_low"]
        <= m["probe_speedup_vs_ort_fp32"]
        <= m["probe_speedup_vs_ort_fp32_ci_high"]
    )
    (note,) = [n for n in run.result.notes if n.startswith("failed on quality, then timed briefly")]
    assert "(onnxruntime, int8, f32) runs at here" in note
    assert state.timed == [(recipe, m["probe_speedup_vs_ort_fp32_ci_high"])]
    # A sibling of the same family that fails too is not timed again: its family's speed is known.
    sibling = next(r for r in base.backend.recipes(model) if r.name == "int8-static-qdq-minmax")
    again = pipeline.evaluate(base, sibling, model, data, policy, detect(), tmp_path / "s", state=state)
    assert "probe_speedup_vs_ort_fp32" not in again.result.metrics
    assert "latency not measured: the candidate failed on quality" in again.result.notes


def test_a_spent_budget_skips_what_is_left_and_says_so(setup, calib_npz: Path, eval_npz: Path, tmp_path: Path) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz)
    state = pipeline.SearchState.for_policy(policy, 1)
    state.budget = Budget(1.0, clock=iter([0.0, 5.0, 5.0, 5.0, 5.0, 5.0]).__next__)
    run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, state=state)
    assert run.result.status == "skipped"
    assert run.result.verdict.reasons == ["not tried: the search budget was spent (5 s of 1 s used)"]


def test_a_full_evaluation_that_would_end_past_the_budget_is_not_started(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz)
    built = base.backend.compress(model, recipe, Calibration(data.calibration, 32, 256), tmp_path / "b")
    now = [0.0]

    class SlowRunner:  # every batch costs 10 s on the budget's clock
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def run(self, inputs):  # type: ignore[no-untyped-def]
            now[0] += 10.0
            return self.inner.run(inputs)  # type: ignore[attr-defined]

    class SlowBackend:
        def __init__(self, inner: OnnxRuntimeBackend) -> None:
            self.inner, self.name = inner, inner.name

        def runner(self, cand, *, threads):  # type: ignore[no-untyped-def]
            return SlowRunner(self.inner.runner(cand, threads=threads))

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    slow = pipeline.Baseline(SlowBackend(base.backend), base.candidate, base.runner, base.outputs)  # type: ignore[arg-type]
    n_eval = data.evaluation.n_samples
    state = pipeline.SearchState.for_policy(policy, 1)
    # The quick check (64 samples, one batch) costs 10 s: all samples would take 10 * n_eval / 64 s, past the 60 s left.
    state.budget = Budget(100.0, clock=lambda: now[0])
    now[0] = 40.0
    run = pipeline.evaluate(base=slow, recipe=recipe, model=model, data=data, policy=policy, hardware=detect(),
                            workdir=tmp_path, state=state, prebuilt=built)  # fmt: skip
    assert n_eval * 10 / 64 > 50
    assert run.result.status == "skipped"
    (reason,) = run.result.verdict.reasons
    assert reason.startswith(f"quality not measured: all {n_eval} samples would take about") and "50 s left" in reason
    assert now[0] == 50.0  # nothing ran after the quick check
    # With no budget to run out, the same candidate is measured to the end.
    now[0] = 0.0
    state = pipeline.SearchState.for_policy(policy, 1)
    state.budget = Budget(None, clock=lambda: now[0])
    run = pipeline.evaluate(base=slow, recipe=recipe, model=model, data=data, policy=policy, hardware=detect(),
                            workdir=tmp_path / "2", state=state, prebuilt=built)  # fmt: skip
    assert run.result.status != "skipped" and "fidelity" in run.result.metrics


def test_the_budget_stops_a_build_that_runs_past_it(setup, calib_npz: Path, eval_npz: Path, tmp_path: Path) -> None:
    model, data, base, _ = setup
    # Entropy calibration over 256 samples takes seconds here; the budget leaves it a tenth of one.
    recipe = next(r for r in base.backend.recipes(model) if r.name == "int8-static-qdq-entropy-perchannel")
    policy = _policy(calib_npz, eval_npz, data={"calibration": str(calib_npz), "evaluation": str(eval_npz)})
    state = pipeline.SearchState.for_policy(policy, 1)
    with BuildWorker() as worker:
        worker.call(abs, 0, 120, what="warm-up")
        state.worker, state.budget = worker, Budget(0.1)
        run = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, state=state)
    assert run.result.status == "skipped"
    assert "was stopped after" in run.result.verdict.reasons[0]
    assert run.compress_s < 3


def test_a_cached_rerun_remeasures_nothing_and_regates_under_a_stricter_gate(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz)
    hw = detect()

    def run(p: Policy) -> pipeline.CandidateRun:
        state = pipeline.SearchState.for_policy(p, 1)
        state.cache = CandidateCache(tmp_path / "cache")
        state.run_key = RunKey.make(model.path, calib_npz, eval_npz, hw, p)
        return pipeline.evaluate(base, recipe, model, data, p, hw, tmp_path / "work", state=state)

    first = run(policy)
    assert first.result.passed and not first.extra.get("cached")
    again = run(policy)
    assert again.extra.get("cached") and again.compress_s == 0 and again.validate_s == 0
    assert again.result.metrics == first.result.metrics and again.result.passed
    assert again.result.artifact is not None and again.result.artifact.exists()
    strict = policy.model_copy(update={"gate": policy.gate.model_copy(update={"min_speedup": 1000.0})})
    regated = run(strict)
    assert regated.extra.get("cached") and not regated.result.passed
    assert any("at least 1000.00x required" in r for r in regated.result.verdict.reasons)
    # a different latency set-up is a different measurement
    other = policy.model_copy(update={"latency": policy.latency.model_copy(update={"rounds": 41})})
    assert not run(other).extra.get("cached")


def test_search_order_tries_likely_winners_first_and_restoring_searches_after_int8_fails() -> None:
    def make(name: str, **settings: object) -> Recipe:
        return Recipe.make("b", name, "int8", **settings)  # type: ignore[arg-type]

    recipes = [
        make("fp16-storage", kind="fp16"),
        make("dynamic", kind="dynamic"),
        make("restore", kind="accuracy_control"),
        make("static", kind="static", calibration="minmax", per_channel=True),
        make("static-bf16", kind="quantize", inference_precision="bf16"),
    ]
    floor = make("bf16", kind="float", inference_precision="bf16")
    pending = [Planned(i, r, prior(r, transformer=False)) for i, r in enumerate([*recipes, floor])]
    # BF16 compute of the float model first: no build, rarely a quality loss, a floor to prune against.
    assert pending[next_index(pending, quality_failed=0, quality_passed=0)].recipe.name == "bf16"
    pending = pending[:-1]
    first = pending[next_index(pending, quality_failed=0, quality_passed=0)]
    assert first.recipe.name == "static-bf16"
    left = [p for p in pending if p.recipe.name not in ("static-bf16", "static")]
    assert left[next_index(left, quality_failed=2, quality_passed=0)].recipe.name == "restore"
    assert left[next_index(left, quality_failed=2, quality_passed=1)].recipe.name == "restore"  # still ahead
    assert prior(make("dynamic", kind="dynamic"), transformer=True) > prior(
        make("d", kind="dynamic"), transformer=False
    )


def test_progress_events_name_the_stage_the_candidate_and_the_budget(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz)
    state = pipeline.SearchState.for_policy(policy, 3)
    state.index = 2
    with caplog.at_level(logging.INFO, logger="quantgate.progress"):
        pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path, state=state)
    events = [r.quantgate_progress for r in caplog.records if hasattr(r, "quantgate_progress")]
    assert [e.stage for e in events] == ["build", "quick", "quality", "latency"]
    assert events[-1].describe().startswith(f"latency · candidate 2/3 onnxruntime/{STATIC} · ")
    assert events[-1].describe().endswith("/150 s of the budget")
    assert 0 < events[-1].fraction < 1


def test_a_recipe_whose_family_measured_far_below_the_best_is_skipped_and_says_why() -> None:
    def make(name: str, backend: str = "onnxruntime", **settings: object) -> Recipe:
        return Recipe.make(backend, name, "int8", **settings)  # type: ignore[arg-type]

    measured = make("int8-static-minmax", kind="static", calibration="minmax")
    sibling = make("int8-static-entropy", kind="static", calibration="entropy")
    restoring = make("int8-static-mixed", kind="mixed")
    other = make("int8-ptq", backend="openvino", kind="quantize")
    timed = [(measured, 0.95)]
    why = cannot_beat(sibling, timed, best=6.0)
    assert why is not None and why.startswith("not tried: it could not beat the best so far (6.00x")
    assert "int8-static-minmax, of the same family (onnxruntime, int8, f32), measured at most 0.95x" in why
    assert cannot_beat(restoring, timed, best=6.0) is not None  # restoring float layers cannot make it faster
    assert cannot_beat(other, timed, best=6.0) is None  # another backend: nothing known
    assert cannot_beat(sibling, timed, best=1.05) is None  # within the family's spread: worth trying
    assert cannot_beat(sibling, timed, best=None) is None


def test_a_restoring_search_in_a_slower_float_precision_than_one_that_passed_is_skipped() -> None:
    """The real CRAFT detector on AMX: OpenVINO's full INT8 ran 12.5x (FP32 float parts), 12.4x (BF16), 11.5x
    (FP16); its float compute 1.0x (FP32), 5.4x (BF16), 0.66x (FP16); int8-mixed-bf16 passed."""

    def make(name: str, kind: str, precision: str) -> Recipe:
        return Recipe.make("openvino", name, "int8", kind=kind, inference_precision=precision)

    winner = make("int8-mixed-bf16", "mixed", "bf16")
    f16_control = make("int8-accuracy-control-f16", "accuracy_control", "f16")
    f32_mixed = make("int8-mixed", "mixed", "f32")
    timed = [
        (make("int8-ptq-performance", "quantize", "f32"), 12.47),
        (make("int8-ptq-performance-bf16", "quantize", "bf16"), 12.43),
        (make("int8-ptq-performance-f16", "quantize", "f16"), 11.53),
        (Recipe.make("openvino", "fp32", "fp32"), 1.03),
        (make("bf16", "float", "bf16"), 5.42),
        (make("f16", "float", "f16"), 0.66),
        (winner, 10.21),
    ]
    why = cannot_beat(f16_control, timed, 10.1, passed=[winner])
    assert why is not None and why.startswith("not tried: int8-mixed-bf16 already passed keeping layers in bf16")
    assert "5.42x ONNX Runtime FP32 here against 0.66x in f16" in why
    assert cannot_beat(f32_mixed, timed, 10.1, passed=[winner]) is not None
    # Not before the faster precision's search passed, nor where this precision's INT8 ran measurably faster.
    assert cannot_beat(f32_mixed, timed, 10.1, passed=[]) is None
    faster_int8 = [(r, 14.0 if r.name == "int8-ptq-performance" else h) for r, h in timed]
    assert cannot_beat(f32_mixed, faster_int8, 10.1, passed=[winner]) is None
    # Nor where its float precision was never measured (nothing known) or ran as fast.
    assert cannot_beat(f16_control, [t for t in timed if t[0].name != "f16"], 10.1, passed=[winner]) is None
    as_fast = [(r, 5.5 if r.name == "f16" else h) for r, h in timed]
    assert cannot_beat(f16_control, as_fast, 10.1, passed=[winner]) is None


def test_once_a_restoring_search_passed_another_precision_is_measured_before_its_own_restoring_search() -> None:
    def make(name: str, kind: str, precision: str) -> Recipe:
        return Recipe.make("openvino", name, "int8", kind=kind, inference_precision=precision)

    control = Planned(0, make("int8-accuracy-control-f16", "accuracy_control", "f16"), 2.0)
    f16 = Planned(1, make("f16", "float", "f16"), 1.5)
    pending = [control, f16]
    failed = {("openvino", "int8", "f16"): 12.5, ("openvino", "int8", "bf16"): 12.4}
    state = {"quality_failed": 2, "quality_passed": 2, "failed_families": failed, "best": 10.1}
    assert pending[next_index(pending, **state)] is control  # type: ignore[arg-type]
    winner = make("int8-mixed-bf16", "mixed", "bf16")
    assert pending[next_index(pending, **state, passed=[winner])] is f16  # type: ignore[arg-type]
    # Measured already (its family attempted): the restoring search goes on as before.
    measured = {("openvino", "float", "f16")}
    assert pending[next_index(pending, **state, passed=[winner], attempted=measured)] is control  # type: ignore[arg-type]


def test_close_finalists_are_re_timed_side_by_side_before_the_winner_is_chosen(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    model, data, base, recipe = setup
    policy = _policy(calib_npz, eval_npz, search={"exhaustive": True})
    other = next(r for r in base.backend.recipes(model) if r.name == "int8-static-qdq-minmax")
    results = [pipeline.evaluate(base, r, model, data, policy, detect(), tmp_path).result for r in (recipe, other)]
    assert all(r.passed for r in results), [r.verdict.reasons for r in results]
    for r in results:  # make them overlap, as two near-identical recipes do
        r.metrics["speedup_vs_ort_fp32_ci_low"], r.metrics["speedup_vs_ort_fp32_ci_high"] = 0.1, 100.0
    pipeline.playoff(results, {"onnxruntime": base}, data, policy)
    for r in results:
        assert r.metrics["playoff_blocks"] >= 30
        assert any(n.startswith("final ranking: re-timed side by side with ONNX Runtime FP32") for n in r.notes)
        assert r.metrics["speedup_vs_ort_fp32_ci_low"] <= r.metrics["speedup_vs_ort_fp32"]


def test_latency_timing_stops_at_the_search_deadline() -> None:
    from quantgate.validators.base import LatencyTarget
    from quantgate.validators.latency import BlockTimes, decided

    rng = np.random.default_rng(0)  # a candidate whose interval straddles the 1.1x threshold
    times = [BlockTimes(1.0 + 0.2 * rng.random((30, 4))), BlockTimes(1.0 / 1.1 + 0.2 * rng.random((30, 4)))]
    undecided = LatencyTarget(1.1, None, 0)
    assert not decided(times, undecided)
    assert decided(times, LatencyTarget(1.1, None, 0, deadline=time.monotonic() - 1.0))


def test_the_budget_has_a_deadline_on_its_clock() -> None:
    now = [100.0]
    budget = Budget(30.0, clock=lambda: now[0])
    assert budget.deadline == 130.0 and Budget(None).deadline is None


def test_the_fastest_openvino_candidates_get_a_static_shape_variant_measured_like_any_candidate(
    setup, calib_npz: Path, eval_npz: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    from quantgate.plugins.openvino import OpenVinoBackend

    model, data, ort_base, _ = setup
    policy = _policy(calib_npz, eval_npz, gate={"min_speedup": 0.5}, search={"exhaustive": True})
    ov = OpenVinoBackend()
    cand = ov.baseline(model, tmp_path / "ov")
    runner = ov.runner(cand, threads=1)
    base = pipeline.Baseline(ov, cand, runner, collect_outputs(runner, data.evaluation, None), ort_base.runner)
    recipe = next(r for r in ov.recipes(model) if r.name == "int8-ptq-performance")
    first = pipeline.evaluate(base, recipe, model, data, policy, detect(), tmp_path).result
    assert first.passed, first.verdict.reasons
    ((vbase, variant),) = pipeline.shape_variants([first], {"openvino": base})
    assert vbase is base and variant.recipe.name == "int8-ptq-performance-static" and variant.artifact == first.artifact
    run = pipeline.evaluate(base, variant.recipe, model, data, policy, detect(), tmp_path, prebuilt=variant)
    assert run.result.passed, run.result.verdict.reasons
    assert run.result.metrics["fidelity"] > 0.999 and "speedup_vs_ort_fp32" in run.result.metrics
    assert pipeline.shape_variants([run.result], {"openvino": base}) == []  # a variant is not specialized again
    assert pipeline.shape_variants([first], {"onnxruntime": ort_base}) == []  # a backend that cannot


def test_where_full_int8_failed_quality_its_restoring_search_goes_first_while_it_can_still_win() -> None:
    def make(name: str, **settings: object) -> Recipe:
        return Recipe.make("openvino", name, "int8", **settings)  # type: ignore[arg-type]

    other_calibration = make("int8-ptq-mixed-bf16", kind="quantize", preset="mixed", inference_precision="bf16")
    restoring = make("int8-mixed-bf16", kind="mixed", inference_precision="bf16")
    slow_restoring = make("int8-accuracy-control-bf16", kind="accuracy_control", inference_precision="bf16")
    elsewhere = make("int8-ptq-performance", kind="quantize", preset="performance")
    pending = [Planned(i, r, prior(r, transformer=False)) for i, r in enumerate(
        [other_calibration, slow_restoring, restoring, elsewhere])]  # fmt: skip
    failed = {("openvino", "int8", "bf16"): 3.6}  # full INT8 with BF16 float parts ran at up to 3.6x, but lost quality

    def pick(best: float | None) -> str:
        i = next_index(pending, quality_failed=1, quality_passed=1, failed_families=failed, best=best)
        return pending[i].recipe.name

    assert pick(best=2.0) == "int8-mixed-bf16"  # the BF16 float floor passed at 2.0x: INT8 could still beat it
    assert pick(best=5.0) == "int8-ptq-performance"  # it cannot: another family first


def test_a_budget_kept_back_for_a_later_stage_is_not_spent_before_it() -> None:
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    budget.reserved = 15.0
    now[0] = 80.0
    assert budget.remaining == 5.0 and budget.deadline == 85.0
    now[0] = 86.0
    assert budget.exhausted and "15 s kept for the shape-specialized variants" in budget.describe()
    budget.reserved = 0.0
    assert not budget.exhausted and budget.remaining == 14.0


def test_a_family_that_already_passed_is_not_built_again_and_low_priors_wait_for_nothing_to_pass() -> None:
    def make(name: str, backend: str = "openvino", **settings: object) -> Recipe:
        return Recipe.make(backend, name, "int8", **settings)  # type: ignore[arg-type]

    winner = make("int8-ptq-performance-bf16", kind="quantize", inference_precision="bf16")
    preset = make("int8-ptq-mixed-bf16", kind="quantize", preset="mixed", inference_precision="bf16")
    restoring = make("int8-mixed-bf16", kind="mixed", inference_precision="bf16")
    static = make("int8-ptq-performance-bf16-static", kind="quantize", inference_precision="bf16", static_shapes=True)
    weights = make("int8-weights", kind="weights")
    timed = [(winner, 3.8)]
    why = cannot_beat(preset, timed, 3.7, passed=[winner])
    assert why is not None and why.startswith("not tried: int8-ptq-performance-bf16, of the same family")
    assert cannot_beat(restoring, timed, 3.7, passed=[winner]) is not None
    assert cannot_beat(static, timed, 3.7, passed=[winner]) is None  # compiled otherwise: a family of its own
    # Weight-only INT8 computes in float: the OpenVINO FP32 IR, measured at 1.6x, is what it runs at.
    fp32 = Recipe.make("openvino", "fp32", "fp32")
    assert "fp32, of the same family (openvino, float, f32)" in str(cannot_beat(weights, [(fp32, 1.6)], 3.7))
    dynamic = make("int8-dynamic", backend="onnxruntime", kind="dynamic")
    low = prior(dynamic, transformer=False)
    assert low < 1.0
    assert "rarely the fastest" in str(cannot_beat(dynamic, [], 3.7, passed=[winner], prior_score=low))
    assert cannot_beat(dynamic, [], None, prior_score=low) is None  # nothing passed yet: worth a try
    qat = make("int8-qat", kind="qat")
    assert cannot_beat(qat, [], 3.7, passed=[winner], prior_score=prior(qat, transformer=False)) is None


def test_before_a_restoring_search_every_int8_family_is_measured_once_and_the_fastest_family_searches_first() -> None:
    """On the real CRAFT detector without AVX512: ONNX Runtime's full INT8 failed fidelity (1.74x), and its restoring
    search then spent the whole budget before OpenVINO's INT8 (1.96x, cheaper to search) was ever built."""

    def make(backend: str, name: str, kind: str) -> Recipe:
        return Recipe.make(backend, name, "int8", kind=kind)

    ort_mixed = make("onnxruntime", "int8-static-mixed", "mixed")
    ov_plain = make("openvino", "int8-ptq-performance", "quantize")
    ov_mixed = make("openvino", "int8-mixed", "mixed")
    pending = [Planned(i, r, prior(r, transformer=False)) for i, r in enumerate([ort_mixed, ov_plain, ov_mixed])]
    ort_family, ov_family = ("onnxruntime", "int8", "f32"), ("openvino", "int8", "f32")

    def pick(failed: dict[tuple[str, str, str], float], attempted: set[tuple[str, str, str]]) -> str:
        i = next_index(pending, quality_failed=len(failed), quality_passed=0, failed_families=failed,
                       attempted=attempted, floor=1.1)  # fmt: skip
        return pending[i].recipe.name

    assert pick({ort_family: 1.78}, {ort_family}) == "int8-ptq-performance"  # OpenVINO's INT8 is not measured yet
    both = {ort_family: 1.78, ov_family: 2.05}
    assert pick(both, {ort_family, ov_family}) == "int8-mixed"  # the faster family's search first
    assert pick({ort_family: 2.3, ov_family: 2.05}, {ort_family, ov_family}) == "int8-static-mixed"
    # A family measured below the gate's own speed threshold cannot pass: its search is not pulled forward.
    assert pick({ort_family: 0.9}, {ort_family}) == "int8-ptq-performance"
    assert pick({ort_family: 0.9}, {ort_family, ov_family}) != "int8-static-mixed"


def test_a_family_measured_below_the_gates_speed_threshold_is_not_tried_even_before_anything_passed() -> None:
    measured = Recipe.make("onnxruntime", "int8-static-minmax", "int8", kind="static")
    restoring = Recipe.make("onnxruntime", "int8-static-mixed", "int8", kind="mixed")
    why = cannot_beat(restoring, [(measured, 0.9)], best=None, floor=1.1)
    assert why is not None and why.startswith("not tried: it could not pass the gate's 1.10x against ONNX Runtime FP32")
    assert "int8-static-minmax, of the same family (onnxruntime, int8, f32), measured at most 0.90x" in why
    # Another calibration may land within the family's spread; restoring float layers never makes it faster.
    other = Recipe.make("onnxruntime", "int8-static-entropy", "int8", kind="static")
    assert cannot_beat(other, [(measured, 1.0)], best=None, floor=1.1) is None
    never = cannot_beat(restoring, [(measured, 1.0)], best=None, floor=1.1)
    assert never is not None and never.endswith("measured at most 1.00x (a float-restoring search is never faster)")
    assert cannot_beat(restoring, [(measured, 0.9)], best=None, floor=None) is None  # the gate reads another speedup


def test_static_int8_with_dynamic_lstm_goes_first_on_recurrent_models_only() -> None:
    hybrid = Recipe.make("onnxruntime", "int8-hybrid", "int8", kind="hybrid")
    static = Recipe.make("onnxruntime", STATIC, "int8", kind="static", calibration="minmax", per_channel=True)
    assert prior(hybrid, transformer=False, recurrent=True) > prior(static, transformer=False, recurrent=True)
    assert prior(hybrid, transformer=False) < 1.0  # without recurrent layers it is plain static INT8
    from quantgate.search import family

    assert family(hybrid) != family(static)  # faster than static INT8 where it holds: not pruned as its twin


def test_the_default_budget_grows_with_the_model_and_an_explicit_one_is_kept(calib_npz: Path, eval_npz: Path) -> None:
    from quantgate.search import budget_seconds

    assert budget_seconds("auto", 5_000_000) == 150.0  # up to 25 MB: three minutes with the rest of the run
    assert budget_seconds("auto", 83_000_000) == pytest.approx(498.0)  # the real CRAFT detector
    assert budget_seconds("auto", 10**10) == 1800.0
    assert budget_seconds(60.0, 83_000_000) == 60.0
    auto = _policy(calib_npz, eval_npz, search={"time_budget_s": "auto"})
    assert pipeline.SearchState.for_policy(auto, 1, model_bytes=50_000_000).budget.seconds == 300.0
    with pytest.raises(Exception, match=r"search.time_budget_s: .*must be 'auto' or a number of seconds"):
        _policy(calib_npz, eval_npz, search={"time_budget_s": "soon"})


def test_another_runtimes_fp32_is_the_floor_where_the_host_has_no_bf16() -> None:
    """On an AVX2 host the BF16 recipes fail at once; OpenVINO's FP32 IR (fp16-ir: FP16 storage, FP32 compute) is
    then the cheap floor, ahead of any INT8 build, while ONNX Runtime's FP16 compute stays last."""

    def make(backend: str, name: str, **settings: object) -> Recipe:
        return Recipe.make(backend, name, "int8", **settings)  # type: ignore[arg-type]

    bf16 = make("openvino", "bf16", kind="float", inference_precision="bf16")
    fp16_ir = make("openvino", "fp16-ir", kind="fp16", inference_precision="f32")
    int8 = make("openvino", "int8-ptq-performance-bf16", kind="quantize", inference_precision="bf16")
    ort_fp16 = make("onnxruntime", "fp16", kind="fp16", keep_io_types=True)
    score = {r.name: prior(r, transformer=False) for r in (bf16, fp16_ir, int8, ort_fp16)}
    assert score["bf16"] > score["fp16-ir"] > score["int8-ptq-performance-bf16"] > score["fp16"]
    # Once BF16 passed, the FP32 baseline timed beside it (its family) prunes fp16-ir without a build.
    fp32 = Recipe.make("openvino", "fp32", "fp32")
    assert cannot_beat(fp16_ir, [(fp32, 2.1)], best=3.9, passed=[bf16]) is not None
