from __future__ import annotations

import copy
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from quantgate import plots, report
from quantgate.gate import judge
from quantgate.hardware import Hardware
from quantgate.plugins.base import Recipe
from quantgate.policy import GatePolicy
from quantgate.registry import SourceVersion
from quantgate.result import HEADLINE_METRICS, CandidateResult, CompressionResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GATE = {
    "max_accuracy_drop": 0.01,
    "min_fidelity": None,
    "min_speedup": 1.1,
    "max_size_ratio": 1.0,
    "speedup_against": "own_fp32",
}
HARDWARE = Hardware("Intel(R) Xeon(R) Platinum 8480+", "x86_64", 16, ("avx2", "fma", "avx512f", "avx512_vnni"))
BUILD_ERROR = "nncf refused the model: <script>alert(1)</script> op is not supported"


def _candidate(
    backend: str, recipe: str, metrics: dict[str, float], *, error: str | None = None, promoted: bool = False
) -> dict[str, Any]:
    """A candidate dict as CandidateResult.to_dict() writes it, judged by the real gate."""
    verdict = judge(metrics, GatePolicy(**GATE), has_labels=True, error=error)
    uri = f"models:/digits-{backend}-int8/3" if verdict.passed else None
    return {
        "backend": backend,
        "recipe": recipe,
        "recipe_hash": "0123456789abcdef",
        "settings": {},
        "passed": verdict.passed,
        "promoted": promoted,
        "reasons": verdict.reasons,
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in verdict.checks],
        "metrics": {k: metrics[k] for k in HEADLINE_METRICS if k in metrics},
        "all_metrics": dict(sorted(metrics.items())),
        "notes": [],
        "registered_uri": uri,
        "run_id": f"run-{recipe}",
        "hardware_fingerprint": HARDWARE.fingerprint(),
    }


def _metrics(base_p50: float, p50: float, size: float, acc: float) -> dict[str, float]:
    s = base_p50 / p50
    return {
        "accuracy_baseline": 0.98,
        "accuracy": acc,
        "accuracy_drop": 0.98 - acc,
        "fidelity": 0.9991,
        "baseline_latency_p50_ms": base_p50,
        "baseline_latency_p95_ms": base_p50 * 1.2,
        "latency_p50_ms": p50,
        "latency_p95_ms": p50 * 1.3,
        "speedup": s,
        "speedup_ci_low": s * 0.95,
        "speedup_ci_high": s * 1.05,
        "size_ratio": size,
        "gate_batch_size": 1.0,
    }


@pytest.fixture
def doc() -> dict[str, Any]:
    return sample_doc()


def sample_doc() -> dict[str, Any]:
    """A document with a winner, a loser on speed, a build failure and two backends (also used by test_plots)."""
    ort_base = 1.0
    slow = _metrics(ort_base, 1.05, 0.27, 0.975)
    qdq = _metrics(ort_base, 0.6, 0.27, 0.976)
    ov = _metrics(0.8, 0.35, 0.26, 0.978) | {"speedup_vs_ort_fp32": ort_base / 0.35}
    return {
        "source": {"name": "digits", "version": "7", "uri": "models:/digits/7"},
        "flavor": "pytorch",
        "policy_hash": "ab12cd34ef56",
        "outcome": "promoted",
        "promoted_uri": "models:/digits-openvino-int8/3",
        "candidates": [
            _candidate("onnxruntime", "dynamic-int8", slow),
            _candidate("onnxruntime", "static-int8-qdq", qdq),
            _candidate("openvino", "int8-ptq", ov, promoted=True),
            _candidate("openvino", "int8-accuracy-control", {}, error=BUILD_ERROR),
        ],
        "hardware": HARDWARE.as_dict(),
        "experiment": "quantgate",
        "parent_run_id": "parent123",
        "tracking_uri": "http://mlflow.internal:5000",
        "timings_s": {"intake": 1.25, "compress": 12.5, "validate": 30.0},
    }


def _no_winner(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["candidates"] = [c for c in out["candidates"] if not c["passed"]]
    out["outcome"], out["promoted_uri"] = "none_passed", None
    return out


def _only_build_failures(doc: dict[str, Any]) -> dict[str, Any]:
    out = _no_winner(doc)
    out["candidates"] = [c for c in out["candidates"] if not c["all_metrics"]] * 2
    return out


def _image_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        return img.size


def test_rows_have_one_shape_with_baselines_first_and_plain_values(doc: dict[str, Any]) -> None:
    rows = report.comparison_rows(doc)
    assert [(r["backend"], r["verdict"]) for r in rows] == [
        ("onnxruntime", "baseline"),
        ("openvino", "baseline"),
        ("onnxruntime", "failed"),
        ("onnxruntime", "passed"),
        ("openvino", "PROMOTED"),
        ("openvino", "failed"),
    ]
    assert len({tuple(r) for r in rows}) == 1  # same columns in the same order everywhere
    assert list(rows[0])[:3] == ["backend", "recipe", "verdict"]
    checks = ["accuracy_check", "speedup_check", "size_check", "build_check"]
    numeric = ["accuracy", "accuracy_drop", "fidelity", "speedup", "speedup_vs_ort_fp32", "size_ratio"]
    assert set(checks + numeric + ["latency_p95_ms", "baseline_latency_p50_ms", "reason"]) <= set(rows[0])
    assert all(v is None or type(v) in (str, float) for r in rows for v in r.values())
    json.dumps(rows, allow_nan=False)  # Prefect stores table artifacts as strict JSON

    slow, qdq, winner, broken = rows[2:]
    assert slow["speedup_check"] == "FAIL" and slow["accuracy_check"] == "pass" and slow["build_check"] == "pass"
    assert slow["speedup"] == pytest.approx(1 / 1.05)
    assert str(slow["reason"]).startswith("speedup lower bound 0.90x")
    assert winner["accuracy_drop"] == pytest.approx(0.2)  # points, not a fraction
    assert winner["speedup_vs_ort_fp32"] == pytest.approx(1 / 0.35)
    assert qdq["speedup_vs_ort_fp32"] is None and qdq["reason"] == ""
    assert broken["build_check"] == "FAIL" and broken["speedup_check"] == "" and broken["latency_p50_ms"] is None
    assert broken["reason"] == BUILD_ERROR
    ov_base = rows[1]
    assert ov_base["latency_p50_ms"] == pytest.approx(0.8) and ov_base["speedup_vs_ort_fp32"] == pytest.approx(1.25)


def test_rows_load_into_a_dataframe_with_numeric_columns(doc: dict[str, Any]) -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(report.comparison_rows(doc))
    assert frame.shape[0] == 6
    assert frame["speedup"].dtype.kind == "f" and frame["latency_p95_ms"].dtype.kind == "f"


def test_markdown_report_names_the_winner_hardware_and_every_reason(doc: dict[str, Any]) -> None:
    md = report.markdown_report(doc)
    assert md.startswith("# quantgate: digits version 7\n")
    assert "Promoted openvino/int8-ptq as models:/digits-openvino-int8/3: 2.29x faster" in md
    assert "Intel(R) Xeon(R) Platinum 8480+" in md and "avx512_vnni" in md and "INT8 dot-product (VNNI/AMX): yes" in md
    assert "(#/models/digits-openvino-int8/versions/3)" in md
    assert "## Why the others lost" in md
    assert "speedup lower bound 0.90x at batch 1" in md
    assert "passed the gate, but openvino/int8-ptq was faster (2.29x vs 1.67x)" in md
    assert "&lt;script&gt;" in md and "<script>" not in md
    assert "ab12cd34ef56" in md and "| compress | 12.5 s |" in md
    table = [line for line in md.splitlines() if line.startswith("| onnxruntime/dynamic-int8 ")]
    assert len(table) == 1 and "FAIL (0.95x [0.90-1.00])" in table[0]
    header = next(line for line in md.splitlines() if line.startswith("| candidate "))
    assert header.count("|") == next(line for line in md.splitlines() if line.startswith("|---")).count("|")


def test_summary_links_the_source_version_and_lists_the_candidates_checks(doc: dict[str, Any]) -> None:
    winner = doc["candidates"][2]
    md = report.summary_markdown(doc, winner)
    assert "[digits v7](#/models/digits/versions/7)" in md
    assert "openvino/int8-ptq" in md and "promoted winner" in md
    for check in ("accuracy", "speedup", "size"):
        assert f"| {check} | pass | " in md
    assert "Xeon" in md


def test_summary_escapes_model_names_in_links() -> None:
    line = report._md_link("a b/c", "a b/c", 2)
    assert line == "[a b/c](#/models/a%20b%2Fc/versions/2)"


def test_source_line_links_the_promoted_and_other_registered_versions(doc: dict[str, Any]) -> None:
    line = report.source_description_line(doc)
    assert line.startswith("quantgate: compressed version [digits-openvino-int8 v3](#/models/digits-openvino-int8/")
    assert "also registered: [digits-onnxruntime-int8 v3](#/models/digits-onnxruntime-int8/versions/3)" in line
    assert "\n" not in line
    assert "no compressed version passed" in report.source_description_line(_no_winner(doc))


def test_html_is_self_contained_with_three_inline_plots_and_escaped_text(doc: dict[str, Any]) -> None:
    page = report.html_report(doc, GATE)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "openvino/int8-ptq" in page and "Why the others lost" in page
    assert 'class="fail">FAIL (0.95x [0.90-1.00])</td>' in page


@pytest.mark.parametrize("variant", [_no_winner, _only_build_failures])
def test_every_output_copes_without_a_winner_or_without_any_metrics(doc: dict[str, Any], variant: Any) -> None:
    bad = variant(doc)
    rows = report.comparison_rows(bad)
    assert len(rows) == len(bad["candidates"]) + len({c["backend"] for c in bad["candidates"] if c["all_metrics"]})
    md = report.markdown_report(bad)
    assert "No candidate passed the gate" in md and "## Why nothing was promoted" in md
    assert "Promoted" not in md
    for cand in bad["candidates"]:
        assert report.summary_markdown(bad, cand)
    assert report.source_description_line(bad).startswith("quantgate: no compressed version")
    for png in (plots.plot_latency(bad), plots.plot_tradeoff(bad, GATE), plots.plot_sizes(bad)):
        assert _image_size(png)[0] >= 300
    page = report.html_report(bad)
    assert page.count("data:image/png;base64,") == 3


def test_reads_the_document_the_real_result_objects_write() -> None:
    metrics = _metrics(1.0, 0.5, 0.3, 0.975)
    gate = GatePolicy(**GATE)
    winner = CandidateResult(
        Recipe.make("onnxruntime", "static-int8", "int8"), metrics, judge(metrics, gate, has_labels=True), HARDWARE
    )
    winner.promoted, winner.registered_uri = True, "models:/m-onnxruntime-int8/1"
    broken = CandidateResult(
        Recipe.make("onnxruntime", "fp16", "fp16"), {}, judge({}, gate, has_labels=True, error="boom"), HARDWARE
    )
    source = SourceVersion("m", "1", None, "runs:/x/model", {})
    result = CompressionResult(source, "onnx", "hash", HARDWARE, [winner, broken], "exp", timings={"total": 2.0})
    doc = json.loads(json.dumps(result.to_document()))
    assert [r["verdict"] for r in report.comparison_rows(doc)] == ["baseline", "PROMOTED", "failed"]
    assert "Promoted onnxruntime/static-int8 as models:/m-onnxruntime-int8/1" in report.markdown_report(doc)
    assert "boom" in report.html_report(doc, gate.model_dump())


def test_host_notes_say_when_the_cpu_has_no_int8_dot_product() -> None:
    from quantgate.hardware import Hardware
    from quantgate.registry import SourceVersion
    from quantgate.result import CompressionResult

    def result(flags: tuple[str, ...]) -> CompressionResult:
        hw = Hardware(cpu_model="x", arch="x86_64", logical_cores=2, isa_flags=flags, libraries={})
        return CompressionResult(SourceVersion("m", "1", None, "", {}), "onnx", "h", hw, [], "quantgate")

    assert result(("avx2", "avx512_vnni")).host_notes == []
    notes = result(("avx2",)).to_document()["host_notes"]
    assert isinstance(notes, list) and len(notes) == 1 and "no VNNI/AMX" in notes[0]


def test_a_candidate_measured_in_a_target_pool_says_where(doc: dict[str, Any]) -> None:
    gpu_host = Hardware("AMD EPYC 7R13", "x86_64", 16, ("avx2",), gpus=("NVIDIA H100 80GB HBM3",))
    where = f"AMD EPYC 7R13 (16 cores, NVIDIA H100 80GB HBM3), fingerprint {gpu_host.fingerprint()}"
    winner = doc["candidates"][2]
    winner["hardware_fingerprint"] = gpu_host.fingerprint()
    winner["checks"].append(
        {"name": "hardware", "passed": True, "detail": f"measured on {where}: meets the requirements of pool gpu"}
    )
    md = report.markdown_report(doc)
    assert f"Measured on {where}" in md  # the outcome line names the winner's host, not this run's
    assert "Measured by target pool workers:" in md and "openvino/int8-ptq" in md.split("target pool workers:")[1]
    assert f"Hardware: {where}" in report.summary_markdown(doc, winner)
    # Candidates measured here keep this run's hardware.
    assert "Intel(R) Xeon(R) Platinum 8480+" in report.summary_markdown(doc, doc["candidates"][1])
    assert any(r.get("hardware_check") == "pass" for r in report.comparison_rows(doc))
