"""ONNX Runtime against OpenVINO: every variant of one model built in one run and timed side by side.

Per model, in a fresh temporary directory:

- the digits CNN (quantgate.demo: trained on scikit-learn's digits, exported to ONNX; its held-out digits carry
  labels, so quality is top-1 accuracy), and
- a small BERT-like encoder built from a ``transformers`` config with random weights (no download; random token
  ids, no labels, so quality is fidelity: mean cosine similarity of the first output, the last hidden state, to
  ONNX Runtime FP32),

built as ONNX Runtime FP32 (the baseline) and INT8 static QDQ per-channel (entropy and minmax calibration), and as
OpenVINO FP32 IR, FP16 IR, INT8 post-training (performance and mixed presets), INT8 weights-only and INT8 with
accuracy control. Latency is measured with one thread, at batch 1 and batch 32: for each batch size every variant of
the model is timed in one round-robin loop (round i starts with variant i mod n; the order runs forwards for n
rounds, then backwards for n rounds), so all variants see the same machine noise. Medians and ratios of medians are
reported. Nothing here is asserted; targets are printed as MET / NOT MET.

    python benchmarks/bench_runtimes.py [--models cnn,transformer] [--rounds 200] [--epochs 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 1
WARMUP = 20
BATCH_SIZES = (1, 32)
CALIBRATION_BATCH = 16  # the pipeline's defaults (policy.data)
CALIBRATION_SAMPLES = 512
ACCURACY_CONTROL_MAX_DROP = 0.01
ACCURACY_CONTROL_BUDGET_S = 300.0
ACCURACY_CONTROL_LIMIT = 300

TARGET_OV_INT8_VS_OV_FP32_B1 = 1.6
TARGET_BEST_VS_ORT_FP32_B1 = 2.5
TARGET_MAX_POINTS_LOST = 1.0  # top-1, in points (0.01 absolute)

# The transformer encoder: big enough that its matmuls dominate, small enough for 200 rounds at batch 32.
BERT = {
    "vocab_size": 4000,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 128,
}
SEQ_LEN = 32
TRANSFORMER_EVAL_SAMPLES = 300

ORT, OV = "onnxruntime", "openvino"
ORT_FP32, OV_FP32 = "fp32", "fp32-ir"
ORT_RECIPES = ("int8-static-qdq-entropy-perchannel", "int8-static-qdq-minmax-perchannel")
OV_RECIPES = ("fp16-ir", "int8-ptq-performance", "int8-ptq-mixed", "int8-weights", "int8-accuracy-control")
PREFIX = {ORT: "ORT", OV: "OV"}


@dataclass(frozen=True)
class ModelCase:
    key: str  # "cnn" or "transformer"
    title: str
    path: Path
    calibration: Path
    evaluation: Path
    metric: str  # "accuracy" (labels) or "fidelity" (no labels)
    facts: tuple[str, ...] = ()


@dataclass
class Variant:
    backend: str
    recipe: str
    candidate: Any = None  # quantgate.plugins.base.Candidate
    runner: Any = None  # quantgate.plugins.base.Runner
    build_s: float = 0.0
    size_bytes: int | None = None  # read at build time: the files go with the temporary directory
    error: str | None = None
    notes: tuple[str, ...] = ()
    outputs: np.ndarray | None = None
    accuracy: float | None = None
    fidelity: float | None = None
    times: dict[int, np.ndarray] = field(default_factory=dict)  # batch size -> per-round ms

    @property
    def label(self) -> str:
        base = " (baseline)" if (self.backend, self.recipe) == (ORT, ORT_FP32) else ""
        return f"{PREFIX[self.backend]} {self.recipe}{base}"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def is_fp32(self) -> bool:
        return self.recipe in (ORT_FP32, OV_FP32)


@dataclass
class ModelResult:
    case: ModelCase
    variants: list[Variant]
    build_s: float = 0.0
    evaluate_s: float = 0.0
    latency_s: float = 0.0

    def find(self, backend: str, recipe: str) -> Variant | None:
        return next((v for v in self.variants if (v.backend, v.recipe) == (backend, recipe)), None)

    @property
    def ort_fp32(self) -> Variant | None:
        return self.find(ORT, ORT_FP32)

    @property
    def ov_fp32(self) -> Variant | None:
        return self.find(OV, OV_FP32)


class _OncePerMessage(logging.Filter):
    """Show each distinct log message once: onnxruntime's quantizer repeats its warnings for every calibration
    chunk ("Axis 1 is out-of-range for weight ... LayerNorm.weight" on transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- models and data --------------------------------------------------------------------------------------------


def _export(module: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str], dyn: Any) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=17,
            dynamo=False,
        )
    return path


def build_cnn_case(root: Path, epochs: int) -> ModelCase:
    """quantgate.demo's CNN, trained here, exported with a dynamic batch; its calibration/evaluation .npz files."""
    import torch

    from quantgate.demo import digits_data, test_accuracy, train_cnn, write_data

    root.mkdir(parents=True, exist_ok=True)
    print(f"digits CNN: training {epochs} epochs", flush=True)
    data = digits_data()
    start = time.perf_counter()
    model = train_cnn(data, epochs=epochs)
    train_s = time.perf_counter() - start
    torch_acc = test_accuracy(model, data)
    path = _export(
        model,
        (torch.zeros(1, 1, 32, 32),),
        root / "digits-cnn.onnx",
        ["input"],
        ["output"],
        {"input": {0: "batch"}, "output": {0: "batch"}},
    )
    calib, evaluation = write_data(data, root / "data", calibration_samples=CALIBRATION_SAMPLES)
    facts = (
        f"digits CNN: {epochs} epochs in {train_s:.1f} s, PyTorch test top-1 {torch_acc:.4f}; "
        f"calibration {min(CALIBRATION_SAMPLES, len(data.x_train))} training images, "
        f"evaluation {len(data.y_test)} held-out images with labels",
    )
    return ModelCase("cnn", "digits CNN", path, calib, evaluation, "accuracy", facts)


def build_transformer_case(root: Path) -> ModelCase:
    """A BERT encoder with random weights from a transformers config (``quantgate.demo.export_bert_encoder``)."""
    from quantgate.demo import export_bert_encoder

    root.mkdir(parents=True, exist_ok=True)
    print("transformer encoder: exporting a random-weight BERT encoder", flush=True)
    path = root / "bert.onnx"
    params = export_bert_encoder(path, seq_len=SEQ_LEN, pooled=True, config=BERT)
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(exist_ok=True)
    calib, evaluation = data / "calibration.npz", data / "evaluation.npz"
    for file, n in ((calib, CALIBRATION_SAMPLES), (evaluation, TRANSFORMER_EVAL_SAMPLES)):
        ids_np = rng.integers(1, BERT["vocab_size"], (n, SEQ_LEN), dtype=np.int64)
        np.savez(file, input_ids=ids_np, attention_mask=np.ones((n, SEQ_LEN), dtype=np.int64))
    facts = (
        f"transformer: BertModel, random weights, {BERT['num_hidden_layers']} layers, hidden {BERT['hidden_size']}, "
        f"{BERT['num_attention_heads']} heads, FFN {BERT['intermediate_size']}, vocab {BERT['vocab_size']}, "
        f"{params / 1e6:.1f} M parameters; sequence length {SEQ_LEN}; random token ids: calibration "
        f"{CALIBRATION_SAMPLES}, evaluation {TRANSFORMER_EVAL_SAMPLES} (no labels: fidelity of the last hidden state)",
    )
    return ModelCase("transformer", "transformer encoder", path, calib, evaluation, "fidelity", facts)


# -- building every variant -------------------------------------------------------------------------------------


def _timed_build(variant: Variant, make: Callable[[], Any]) -> None:
    from quantgate.errors import QuantgateError

    start = time.perf_counter()
    try:
        variant.candidate = make()
        variant.notes = tuple(variant.candidate.notes)
        variant.size_bytes = variant.candidate.size_bytes
    except QuantgateError as exc:
        variant.error = _first_line(exc)
    variant.build_s = time.perf_counter() - start


def build_variants(case: ModelCase, workdir: Path) -> list[Variant]:
    from quantgate.data import NpzDataset
    from quantgate.model import read_model_info
    from quantgate.plugins.base import Calibration
    from quantgate.plugins.onnxruntime import OnnxRuntimeBackend
    from quantgate.plugins.openvino import OpenVinoBackend

    info = read_model_info(case.path)
    calib = Calibration(NpzDataset.open(case.calibration), CALIBRATION_BATCH, CALIBRATION_SAMPLES)
    ort_backend, ov_backend = OnnxRuntimeBackend(), OpenVinoBackend()
    ov_backend.configure_accuracy_control(
        NpzDataset.open(case.evaluation),
        "accuracy" if case.metric == "accuracy" else "fidelity",
        ACCURACY_CONTROL_MAX_DROP,
        ACCURACY_CONTROL_BUDGET_S,
        limit=ACCURACY_CONTROL_LIMIT,
    )
    backends = {ORT: ort_backend, OV: ov_backend}
    ort_recipes = {r.name: r for r in ort_backend.recipes(info)}
    ov_recipes = {r.name: r for r in ov_backend.recipes(info)}

    variants: list[Variant] = []

    def add(backend: str, recipe: str, make: Callable[[], Any]) -> None:
        variant = Variant(backend, recipe)
        _timed_build(variant, make)
        if variant.ok:
            try:
                variant.runner = backends[backend].runner(variant.candidate, threads=THREADS)
            except Exception as exc:  # a BackendError from loading, or anything the runtime raises
                variant.error = "cannot load: " + _first_line(exc)
        print(
            f"  built {variant.label} in {variant.build_s:.1f} s"
            + (f": FAILED {variant.error}" if variant.error else ""),
            flush=True,
        )
        variants.append(variant)

    ort_dir, ov_dir = workdir / "ort", workdir / "ov"
    add(ORT, ORT_FP32, lambda: ort_backend.baseline(info, ort_dir))
    for name in ORT_RECIPES:
        add(ORT, name, lambda name=name: ort_backend.compress(info, ort_recipes[name], calib, ort_dir / name))
    add(OV, OV_FP32, lambda: ov_backend.baseline(info, ov_dir / OV_FP32))
    for name in OV_RECIPES:
        add(OV, name, lambda name=name: ov_backend.compress(info, ov_recipes[name], calib, ov_dir / name))
    return variants


# -- quality and latency ----------------------------------------------------------------------------------------


def evaluate(case: ModelCase, variants: list[Variant]) -> None:
    """Top-1 against labels (CNN) and fidelity of the first output to ONNX Runtime FP32, over the evaluation set."""
    from quantgate.data import NpzDataset
    from quantgate.validators.accuracy import top1
    from quantgate.validators.fidelity import cosine_per_row

    evaluation = NpzDataset.open(case.evaluation)
    labels = evaluation.take(evaluation.n_samples).labels
    for v in variants:
        if not v.ok:
            continue
        try:
            outs = [np.asarray(v.runner.run(b.inputs)[0]) for b in evaluation.batches(32)]
        except Exception as exc:  # a runtime that loads the model but cannot run it
            v.error = "cannot run: " + _first_line(exc)
            continue
        out = np.concatenate(outs)
        v.outputs = out.reshape(out.shape[0], -1)
        if labels is not None:
            v.accuracy = top1(out.reshape(out.shape[0], -1), labels)
    reference = next((v for v in variants if (v.backend, v.recipe) == (ORT, ORT_FP32) and v.ok), None)
    if reference is None or reference.outputs is None:
        return
    for v in variants:
        if v.ok and v.outputs is not None:
            v.fidelity = float(np.mean(cosine_per_row(reference.outputs, v.outputs)))


def latency_inputs(case: ModelCase, size: int) -> dict[str, np.ndarray]:
    from quantgate.data import NpzDataset

    head = NpzDataset.open(case.evaluation).take(size).inputs
    n = next(iter(head.values())).shape[0]
    if n < size:  # fewer samples than the batch: repeat them
        reps = -(-size // n)
        head = {k: np.concatenate([a] * reps)[:size] for k, a in head.items()}
    return {k: np.ascontiguousarray(a) for k, a in head.items()}


def round_order(i: int, n: int) -> list[int]:
    """Round i starts with variant i mod n; forwards for n rounds, then backwards for n rounds."""
    step = 1 if (i // n) % 2 == 0 else -1
    return [(i + step * k) % n for k in range(n)]


def time_round_robin(runners: list[Any], inputs: Mapping[str, np.ndarray], *, warmup: int, rounds: int) -> np.ndarray:
    """Per-variant, per-round milliseconds (shape n x rounds), every variant timed once per round."""
    n = len(runners)
    for _ in range(warmup):
        for runner in runners:
            runner.run(inputs)
    out = np.empty((n, rounds))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            for j in round_order(i, n):
                start = time.perf_counter_ns()
                runners[j].run(inputs)
                out[j, i] = (time.perf_counter_ns() - start) / 1e6
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def measure_latency(case: ModelCase, variants: list[Variant], rounds: int, warmup: int) -> None:
    live = [v for v in variants if v.ok]
    for size in BATCH_SIZES:
        inputs = latency_inputs(case, size)
        times = time_round_robin([v.runner for v in live], inputs, warmup=warmup, rounds=rounds)
        for v, row in zip(live, times, strict=True):
            v.times[size] = row


# -- figures ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speedup:
    ratio: float
    ci_low: float
    ci_high: float


def p50(v: Variant | None, size: int) -> float | None:
    if v is None or size not in v.times:
        return None
    return float(np.median(v.times[size]))


def speedup(v: Variant, ref: Variant | None, size: int) -> Speedup | None:
    """The median of paired rounds' ref/v from the same interleaved loop, with a paired-round bootstrap 95% interval."""
    from quantgate.validators.latency import paired_speedup, speedup_ci

    if ref is None or size not in v.times or size not in ref.times:
        return None
    base, cand = ref.times[size], v.times[size]
    low, high = speedup_ci(base, cand)
    return Speedup(paired_speedup(base, cand), low, high)


def ratio(v: Variant, ref: Variant | None, size: int) -> float:
    """The speedup point estimate, 0.0 when it was not measured (for ranking)."""
    if ref is None or size not in v.times or size not in ref.times:
        return 0.0
    return float(np.median(ref.times[size]) / np.median(v.times[size]))


def points_lost(v: Variant, result: ModelResult) -> float | None:
    ref = result.ort_fp32
    if ref is None or ref.accuracy is None or v.accuracy is None:
        return None
    return (ref.accuracy - v.accuracy) * 100


def size_mb(v: Variant) -> float | None:
    return v.size_bytes / 1e6 if v.ok and v.size_bytes is not None else None


def size_ratio(v: Variant, result: ModelResult) -> float | None:
    ref = result.ort_fp32
    ours, theirs = size_mb(v), size_mb(ref) if ref is not None else None
    return ours / theirs if ours is not None and theirs else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_speedup(s: Speedup | None, with_ci: bool) -> str:
    if s is None:
        return "-"
    return f"{s.ratio:.2f}x ({s.ci_low:.2f}-{s.ci_high:.2f})" if with_ci else f"{s.ratio:.2f}x"


def table(result: ModelResult) -> str:
    cnn = result.case.metric == "accuracy"
    quality = "| top-1 | top-1 lost (pt) | fidelity " if cnn else "| fidelity vs ORT FP32 "
    head = (
        f"| variant {quality}| size MB | size ratio "
        "| b1 p50 ms | b1 vs ORT FP32 (95% CI) | b1 vs OV FP32 (95% CI) "
        "| b32 p50 ms | b32 vs ORT FP32 | b32 vs OV FP32 |"
    )
    rows = [head, "|" + "---|" * head.count(" |")]
    ort_ref, ov_ref = result.ort_fp32, result.ov_fp32
    for v in result.variants:
        if v.error is not None:
            blanks = 9 + (2 if cnn else 0)  # cells after the variant name
            rows.append(f"| {v.label} | failed: {v.error[:120]} |" + " - |" * (blanks - 1))
            continue
        quality_cells = (
            f"| {_fmt(v.accuracy, '.4f')} | {_fmt(points_lost(v, result), '+.2f')} | {_fmt(v.fidelity, '.5f')} "
            if cnn
            else f"| {_fmt(v.fidelity, '.5f')} "
        )
        rows.append(
            f"| {v.label} {quality_cells}| {_fmt(size_mb(v), '.2f')} | {_fmt(size_ratio(v, result), '.2f')} "
            f"| {_fmt(p50(v, 1), '.3f')} | {_fmt_speedup(speedup(v, ort_ref, 1), True)} "
            f"| {_fmt_speedup(speedup(v, ov_ref, 1), True)} "
            f"| {_fmt(p50(v, 32), '.2f')} | {_fmt_speedup(speedup(v, ort_ref, 32), False)} "
            f"| {_fmt_speedup(speedup(v, ov_ref, 32), False)} |"
        )
    return "\n".join(rows)


def passes(v: Variant, result: ModelResult) -> bool:
    """A compressed variant within 1 point of ORT FP32's top-1 whose batch-1 speedup CI lies above 1."""
    lost = points_lost(v, result)
    s = speedup(v, result.ort_fp32, 1)
    return (
        v.ok
        and not v.is_fp32
        and lost is not None
        and lost <= TARGET_MAX_POINTS_LOST + 1e-9
        and s is not None
        and s.ci_low > 1.0
    )


def cnn_target_lines(result: ModelResult) -> list[str]:
    lines = []
    ov_int8 = result.find(OV, "int8-ptq-performance")
    target = (
        f"target: OpenVINO INT8 (ptq performance) >= {TARGET_OV_INT8_VS_OV_FP32_B1}x faster than OpenVINO FP32 "
        f"at batch 1 with <= {TARGET_MAX_POINTS_LOST:.0f} point top-1 lost"
    )
    s = speedup(ov_int8, result.ov_fp32, 1) if ov_int8 is not None and ov_int8.ok else None
    lost = points_lost(ov_int8, result) if ov_int8 is not None else None
    if s is None or lost is None:
        reason = ov_int8.error if ov_int8 is not None and ov_int8.error else "not measured"
        lines.append(f"{target}: NOT MET ({reason})")
    else:
        ok = s.ratio >= TARGET_OV_INT8_VS_OV_FP32_B1 and lost <= TARGET_MAX_POINTS_LOST + 1e-9
        # Three decimals: at two, 1.597x would read "1.60x ... NOT MET".
        lines.append(
            f"{target}: {met(ok)}: {s.ratio:.3f}x (95% CI {s.ci_low:.2f}-{s.ci_high:.2f}), top-1 lost {lost:+.2f} pt"
        )
    target = (
        f"target: best passing candidate across both backends (<= {TARGET_MAX_POINTS_LOST:.0f} point lost, faster) "
        f">= {TARGET_BEST_VS_ORT_FP32_B1}x faster than ORT FP32 at batch 1"
    )
    passing = [v for v in result.variants if passes(v, result)]
    if not passing:
        lines.append(f"{target}: NOT MET (no candidate passes)")
        return lines
    best = max(passing, key=lambda v: ratio(v, result.ort_fp32, 1))
    s = speedup(best, result.ort_fp32, 1)
    assert s is not None
    others = ", ".join(f"{v.label} {ratio(v, result.ort_fp32, 1):.2f}x" for v in passing if v is not best)
    lines.append(
        f"{target}: {met(s.ratio >= TARGET_BEST_VS_ORT_FP32_B1)}: {best.label} {s.ratio:.3f}x "
        f"(95% CI {s.ci_low:.2f}-{s.ci_high:.2f}), top-1 lost {points_lost(best, result):+.2f} pt"
        + (f"; other passing candidates: {others}" if others else "")
    )
    return lines


def transformer_lines(result: ModelResult) -> list[str]:
    """Informational, no target: the fastest variant that keeps fidelity >= 0.99, against both FP32 baselines."""
    keep = [v for v in result.variants if v.ok and not v.is_fp32 and (v.fidelity or 0.0) >= 0.99 and 1 in v.times]
    if not keep:
        return ["transformer: no compressed variant keeps fidelity >= 0.99"]
    out = []
    for size in BATCH_SIZES:
        best = max(keep, key=lambda v: ratio(v, result.ort_fp32, size))
        vs_ort, vs_ov = speedup(best, result.ort_fp32, size), speedup(best, result.ov_fp32, size)
        out.append(
            f"transformer, fastest variant with fidelity >= 0.99 at batch {size} (information, no target): "
            f"{best.label}, fidelity {best.fidelity:.5f}, {_fmt_speedup(vs_ort, True)} vs ORT FP32, "
            f"{_fmt_speedup(vs_ov, True)} vs OV FP32"
        )
    return out


def note_lines(result: ModelResult) -> list[str]:
    builds = ", ".join(f"{v.label} {v.build_s:.1f}" for v in result.variants)
    lines = [
        f"{result.case.title}: build s: {builds}",
        f"{result.case.title}: wall s: build {result.build_s:.1f}, evaluate {result.evaluate_s:.1f}, "
        f"latency {result.latency_s:.1f}",
    ]
    ac = result.find(OV, "int8-accuracy-control")
    if ac is not None:
        detail = next((n for n in ac.notes if n.startswith("accuracy control")), ac.error or "no note")
        lines.append(f"{result.case.title}: OV int8-accuracy-control: {detail}")
    return lines


def host_lines(load: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    from quantgate.hardware import detect

    hw = detect()
    flags = set(hw.isa_flags)
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    amx = sorted(f for f in flags if f.startswith("amx"))
    before, after = (", ".join(f"{x:.2f}" for x in la) for la in load)
    libs = ", ".join(f"{k} {v}" for k, v in sorted(hw.libraries.items()))
    return [
        f"host: {hw.cpu_model} ({hw.arch}), {hw.logical_cores} logical cores; VNNI: "
        f"{'yes (' + ', '.join(vnni) + ')' if vnni else 'no'}; AMX: {'yes (' + ', '.join(amx) + ')' if amx else 'no'}; "
        f"INT8 dot product: {hw.int8_dot_product}; ISA: {', '.join(hw.isa_flags) or 'none of interest'}",
        f"load average (1/5/15 min): {before} before, {after} after",
        f"libraries: python {hw.python}, {libs}",
    ]


def model_doc(result: ModelResult) -> dict[str, Any]:
    variants = []
    for v in result.variants:
        latency: dict[str, Any] = {}
        for size in BATCH_SIZES:
            if size not in v.times:
                continue
            entry: dict[str, Any] = {
                "p50_ms": p50(v, size),
                "p95_ms": float(np.percentile(v.times[size], 95)),
            }
            for name, ref in (("vs_ort_fp32", result.ort_fp32), ("vs_ov_fp32", result.ov_fp32)):
                s = speedup(v, ref, size)
                if s is not None:
                    entry[f"speedup_{name}"] = s.ratio
                    entry[f"speedup_{name}_ci"] = [s.ci_low, s.ci_high]
            latency[f"b{size}"] = entry
        variants.append(
            {
                "variant": v.label,
                "backend": v.backend,
                "recipe": v.recipe,
                "error": v.error,
                "notes": list(v.notes),
                "build_s": v.build_s,
                "accuracy": v.accuracy,
                "points_lost": points_lost(v, result),
                "fidelity": v.fidelity,
                "size_bytes": v.size_bytes if v.ok else None,
                "size_ratio": size_ratio(v, result),
                "passes": passes(v, result) if result.case.metric == "accuracy" else None,
                "latency": latency,
            }
        )
    return {
        "title": result.case.title,
        "metric": result.case.metric,
        "facts": list(result.case.facts),
        "wall_s": {"build": result.build_s, "evaluate": result.evaluate_s, "latency": result.latency_s},
        "variants": variants,
    }


# -- main -------------------------------------------------------------------------------------------------------


def run_model(case: ModelCase, workdir: Path, rounds: int, warmup: int) -> ModelResult:
    print(f"{case.title}: building every variant", flush=True)
    start = time.perf_counter()
    variants = build_variants(case, workdir)
    result = ModelResult(case, variants, build_s=time.perf_counter() - start)
    start = time.perf_counter()
    evaluate(case, variants)
    result.evaluate_s = time.perf_counter() - start
    print(f"{case.title}: timing {sum(v.ok for v in variants)} variants side by side, {rounds} rounds", flush=True)
    start = time.perf_counter()
    measure_latency(case, variants, rounds, warmup)
    result.latency_s = time.perf_counter() - start
    for v in variants:  # free the compiled models before the next model is built
        v.runner = None
    return result


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(models) - {"cnn", "transformer"})
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"--models takes cnn and/or transformer, got {text!r}")
    return list(dict.fromkeys(models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=parse_models, default=["cnn", "transformer"], help="cnn,transformer")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved latency rounds per batch size")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the digits CNN")
    parser.add_argument("--out", type=Path, help="also write runtimes.md and runtimes.json here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OncePerMessage())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    load_before = os.getloadavg()
    run_start = time.perf_counter()
    results: list[ModelResult] = []
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="quantgate-bench-runtimes-") as tmp_name:
        tmp = Path(tmp_name)
        os.chdir(tmp)  # anything a library drops in the working directory lands in the temporary directory
        try:
            for key in args.models:
                if key == "cnn":
                    case = build_cnn_case(tmp / "cnn", args.epochs)
                else:
                    case = build_transformer_case(tmp / "transformer")
                results.append(run_model(case, tmp / key / "variants", args.rounds, WARMUP))
        finally:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
    load_after = os.getloadavg()
    total_s = time.perf_counter() - run_start

    sections = []
    figures: list[str] = []
    for result in results:
        head = (
            f"## {result.case.title}: ONNX Runtime and OpenVINO side by side ({THREADS} thread, warmup {WARMUP}, "
            f"{args.rounds} round-robin rounds per batch size; medians and ratios of medians)"
        )
        sections.append("\n".join([head, "", table(result)]))
        figures += list(result.case.facts)
        if result.case.metric == "accuracy":
            figures += cnn_target_lines(result)
        else:
            figures += transformer_lines(result)
        figures += note_lines(result)
    figures += host_lines((load_before, load_after))
    figures.append(f"total wall time {total_s:.1f} s")
    text = "\n\n".join(sections) + "\n\n" + "\n".join(f"- {line}" for line in figures)
    print()
    print(text)
    if args.out:
        from quantgate.hardware import detect

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runtimes.md").write_text(text + "\n")
        doc = {
            "args": {"models": args.models, "rounds": args.rounds, "epochs": args.epochs, "warmup": WARMUP},
            "threads": THREADS,
            "batch_sizes": list(BATCH_SIZES),
            "host": detect().as_dict(),
            "load_average": {"before": list(load_before), "after": list(load_after)},
            "total_s": total_s,
            "models": {r.case.key: model_doc(r) for r in results},
            "figures": figures,
        }
        (args.out / "runtimes.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
