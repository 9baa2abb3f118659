"""Target pools: requirement matching, the hardware check, and a step's results surviving the JSON round trip."""

from __future__ import annotations

import json

import pytest

from quantgate import targets
from quantgate.errors import PolicyError
from quantgate.gate import Check, Verdict
from quantgate.hardware import Hardware, detect
from quantgate.pipeline import PlannedRecipe
from quantgate.plugins.base import Recipe
from quantgate.policy import HardwareRequirements, TargetPolicy, parse_policy
from quantgate.result import CandidateResult

XEON = Hardware("Intel(R) Xeon(R) Platinum 8375C", "x86_64", 8, ("avx2", "fma", "avx512f", "avx512_vnni"))
GPU_HOST = Hardware("AMD EPYC 7R13", "x86_64", 16, ("avx2", "fma"), gpus=("NVIDIA H100 80GB HBM3",))


def _candidate(hw: Hardware = XEON, backend: str = "openvino", passed: bool = True) -> CandidateResult:
    recipe = Recipe.make(backend, "int8-ptq-performance", "int8", preset="performance", subset_size=300)
    verdict = Verdict(passed, (Check("speedup", passed, "speedup 2.50x at batch 1, at least 1.10x required"),))
    metrics = {"speedup": 2.5, "speedup_vs_ort_fp32": 2.2, "size_ratio": 0.26, "accuracy_drop": 0.0}
    details = {"latency": {"rounds_ms": {"baseline": [1.0, 1.1], "candidate": [0.4, 0.41]}}}
    return CandidateResult(recipe, metrics, verdict, hw, notes=["note"], details=details, run_id="abc123")


def test_requirements_are_matched_against_the_recorded_hardware() -> None:
    assert targets.mismatches(XEON, HardwareRequirements(arch="x86_64", cpu="*Xeon*", isa=("avx512_vnni",))) == []
    problems = targets.mismatches(XEON, HardwareRequirements(isa=("amx_int8", "avx512_vnni"), min_cores=16))
    assert problems == ["CPU lacks amx_int8", "8 cores, at least 16 required"]
    assert targets.mismatches(XEON, HardwareRequirements(gpu="*")) == ["no NVIDIA GPU"]
    assert targets.mismatches(GPU_HOST, HardwareRequirements(gpu="*H100*")) == []
    assert targets.mismatches(GPU_HOST, HardwareRequirements(gpu="*A10G*")) == [
        "GPU NVIDIA H100 80GB HBM3 does not match '*A10G*'"
    ]
    assert targets.mismatches(XEON, HardwareRequirements(arch="aarch64", cpu="*Graviton*")) == [
        "architecture x86_64 is not aarch64",
        "CPU 'Intel(R) Xeon(R) Platinum 8375C' does not match '*Graviton*'",
    ]


def test_a_gpu_changes_the_fingerprint_and_cpu_only_fingerprints_are_unchanged() -> None:
    no_gpu = Hardware("AMD EPYC 7R13", "x86_64", 16, ("avx2", "fma"))
    assert GPU_HOST.fingerprint() != no_gpu.fingerprint()
    assert Hardware.from_dict(json.loads(json.dumps(GPU_HOST.as_dict()))) == GPU_HOST
    here = detect()
    assert Hardware.from_dict(json.loads(json.dumps(here.as_dict()))).fingerprint() == here.fingerprint()


def test_policy_targets_are_validated_at_the_edge() -> None:
    policy = parse_policy(
        {
            "backends": ["onnxruntime", "openvino", "tensorrt"],
            "targets": {
                "openvino": {"pool": "cpu-vnni", "requires": {"isa": ["avx512_vnni"]}},
                "tensorrt": {"pool": "nvidia-gpu", "requires": {"gpu": "*H100*"}},
            },
        }
    )
    assert policy.pools() == {"cpu-vnni": ("openvino",), "nvidia-gpu": ("tensorrt",)}
    assert parse_policy({}).digest() == parse_policy({"targets": {}}).digest()
    assert policy.digest() != parse_policy({"backends": ["onnxruntime", "openvino", "tensorrt"]}).digest()
    with pytest.raises(PolicyError, match=r"targets name backend.*openvino"):
        parse_policy({"targets": {"openvino": {"pool": "p"}}})
    with pytest.raises(PolicyError, match=r"targets.onnxruntime.requires.isa: .*unknown ISA flag.*avx9"):
        parse_policy({"targets": {"onnxruntime": {"pool": "p", "requires": {"isa": ["avx9"]}}}})
    with pytest.raises(PolicyError, match=r"targets.onnxruntime.pool"):
        parse_policy({"targets": {"onnxruntime": {"pool": "bad pool!"}}})


def test_a_result_survives_the_step_document_round_trip() -> None:
    cand = _candidate()
    cand.logged_model_uri = "models:/m-123"
    doc = targets.step_document("cpu-vnni", "run-1", XEON, [cand], {"compress_s": 1.5})
    outcome = targets.read_step_document("cpu-vnni", json.loads(json.dumps(doc)))
    (back,) = outcome.results
    assert back.recipe == cand.recipe and back.recipe.digest == cand.recipe.digest
    assert back.metrics == cand.metrics and back.verdict == cand.verdict and back.hardware == XEON
    assert back.run_id == "abc123" and back.logged_model_uri == "models:/m-123" and back.notes == ["note"]
    assert back.to_dict()["latency_rounds_ms"] == cand.to_dict()["latency_rounds_ms"]
    assert outcome.fingerprints == [XEON.fingerprint()] and outcome.timings == {"compress_s": 1.5}
    with pytest.raises(ValueError, match="names pool 'cpu-vnni', expected 'other'"):
        targets.read_step_document("other", doc)
    tampered = json.loads(json.dumps(doc))
    tampered["candidates"][0]["settings"]["preset"] = "mixed"
    with pytest.raises(ValueError, match="recorded recipe hash"):
        targets.read_step_document("cpu-vnni", tampered)


def test_results_from_the_wrong_hardware_are_refused() -> None:
    policy = parse_policy(
        {
            "backends": ["onnxruntime", "openvino"],
            "targets": {"openvino": {"pool": "cpu-amx", "requires": {"isa": ["amx_int8"]}}},
        }
    )
    ort = _candidate(backend="onnxruntime")
    refused, untouched = targets.check_targets([_candidate(), ort], policy)
    assert untouched is ort
    assert not refused.passed
    assert refused.verdict.checks[-1].name == "hardware"
    assert "refused for pool cpu-amx: CPU lacks amx_int8" in refused.verdict.reasons[0]

    ok_policy = policy.model_copy(update={"targets": {"openvino": TargetPolicy(pool="cpu-vnni")}})
    (accepted,) = targets.check_targets([_candidate()], ok_policy, [XEON.fingerprint()])
    assert accepted.passed and "meets the requirements of pool cpu-vnni" in accepted.verdict.checks[-1].detail
    # A fingerprint that does not belong to the hardware recorded next to it is refused, requirements or not.
    (forged,) = targets.check_targets([_candidate()], ok_policy, [GPU_HOST.fingerprint()])
    assert not forged.passed and "does not match the recorded hardware" in forged.verdict.reasons[0]


def test_a_failed_step_fails_only_its_own_recipes_and_is_not_hardware_checked() -> None:
    policy = parse_policy({"backends": ["onnxruntime", "openvino"], "targets": {"openvino": {"pool": "p"}}})
    recipe = Recipe.make("openvino", "int8-ptq-performance", "int8")
    planned = [PlannedRecipe("openvino", recipe), PlannedRecipe("openvino", Recipe.make("openvino", "fp16-ir", "fp16"))]
    outcome = targets.failed_step("p", planned, "no worker picked it up", XEON)
    assert [r.recipe.name for r in outcome.results] == ["int8-ptq-performance", "fp16-ir"]
    checked = outcome.checked(policy)
    assert all(not r.passed and r.verdict.reasons == ["no worker picked it up"] for r in checked)
    missing = targets.failed_step("p", [PlannedRecipe("openvino", None, "not installed")], "why", XEON)
    assert [r.recipe.name for r in missing.results] == ["(step failed)"]


def test_a_candidate_computing_in_bf16_or_fp16_needs_that_isa_on_the_hardware_it_recorded() -> None:
    """The recipe's compute precision is part of every candidate's hardware requirement, on top of ``requires``."""
    from pathlib import Path

    from quantgate.model import ModelInfo
    from quantgate.plugins.openvino import OpenVinoBackend

    recipes = {r.name: r for r in OpenVinoBackend().recipes(ModelInfo(Path("m.onnx"), (), (), 17))}
    zen4 = Hardware("AMD EPYC 9R14", "x86_64", 8, ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"))
    sapphire = Hardware("Intel(R) Xeon(R) Platinum 8488C", "x86_64", 8, ("avx512_bf16", "avx512_fp16", "amx_bf16"))
    graviton3 = Hardware("Neoverse-V1", "aarch64", 8, ("asimdhp",))
    bf16 = "computes in BF16, which needs a CPU with AVX512_BF16 or AMX-BF16; this CPU has neither"
    fp16 = "computes in FP16, which needs a CPU with AVX512-FP16, AMX-FP16 or ARM FP16 arithmetic; this CPU has none"
    cases = [
        (XEON, "int8-ptq-performance", []),
        (XEON, "int8-ptq-performance-bf16", [f"recipe int8-ptq-performance-bf16 {bf16}"]),
        (XEON, "f16", [f"recipe f16 {fp16} of them"]),
        (zen4, "bf16", []),
        (zen4, "int8-accuracy-control-f16", [f"recipe int8-accuracy-control-f16 {fp16} of them"]),
        (sapphire, "int8-weights-bf16", []),
        (sapphire, "f16", []),
        (graviton3, "f16", []),
        (graviton3, "bf16", [f"recipe bf16 {bf16}"]),  # OpenVINO computes in BF16 on x86 only
        (Hardware("x", "x86_64", 2, ("amx_bf16",)), "bf16", []),
    ]
    for hw, name, expected in cases:
        assert targets.compute_mismatches(hw, recipes[name]) == expected, (hw.cpu_model, name)
    assert targets.compute_mismatches(XEON, Recipe.make("openvino", "old", "int8")) == []  # recorded before the setting
    odd = Recipe.make("openvino", "future", "fp8", inference_precision="f8")
    assert targets.compute_mismatches(sapphire, odd) == [
        "recipe future names inference precision 'f8', which this quantgate does not know"
    ]

    policy = parse_policy({"backends": ["openvino"], "targets": {"openvino": {"pool": "cpu-x86"}}})
    candidate = _candidate()
    on_xeon = CandidateResult(recipes["bf16"], candidate.metrics, candidate.verdict, XEON)
    on_zen4 = CandidateResult(recipes["bf16"], candidate.metrics, candidate.verdict, zen4)
    refused, accepted = targets.check_targets([on_xeon, on_zen4], policy, [XEON.fingerprint(), zen4.fingerprint()])
    assert not refused.passed and f"refused for pool cpu-x86: recipe bf16 {bf16}" in refused.verdict.reasons[0]
    assert accepted.passed and "meets the requirements of pool cpu-x86" in accepted.verdict.checks[-1].detail
    # The new flags can be required by a policy too.
    assert parse_policy({"targets": {"onnxruntime": {"pool": "p", "requires": {"isa": ["amx_fp16", "asimdhp"]}}}})
