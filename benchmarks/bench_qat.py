"""Quantization-aware fine-tuning where post-training quantization cannot hold the gate (issue 13). One run:

1. generate images on which INT8 PTQ loses points (benchmarks/qatdata.py), train torchvision's MobileNetV2
   (benchmarks/mobilenetv2.py, re-declared) on them, seeded, and register it as a pytorch model (MLflow's pt2);
2. ``quantgate compress --json`` through the CLI, ``backends: [onnxruntime, openvino]``, the default gate (1 point),
   the full-INT8 post-training recipes of both backends and ``int8-qat`` (distillation on the unlabelled calibration
   set: no labels needed; with ``--labelled-training N``, cross-entropy plus distillation on N of the labelled
   images the FP32 model was trained on, as ``data.training``); every passing candidate registered;
3. in this process, one blocked latency measurement (quantgate's validator code) rotating both FP32 baselines, each
   backend's post-training recipe that its QAT recipe finishes with, and the registered QAT versions: batch-1
   speedups measured side by side.

Targets: the best PTQ candidate loses at least 2 points; the QAT candidate at most 1, at a batch-1 speedup within
10% of the PTQ candidate's; QAT's wall time reported and within its budget. Nothing is asserted.

    python benchmarks/bench_qat.py [--epochs 24] [--qat-epochs 4] [--labelled-training 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import qatdata  # noqa: E402
from mobilenetv2 import MobileNetV2  # noqa: E402

from quantgate.data import NpzDataset  # noqa: E402
from quantgate.intake import to_onnx  # noqa: E402
from quantgate.plugins.base import Calibration, Candidate, Recipe  # noqa: E402
from quantgate.plugins.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from quantgate.plugins.openvino import OpenVinoBackend  # noqa: E402
from quantgate.policy import LatencyPolicy  # noqa: E402
from quantgate.validators.latency import choose_blocks, measure_blocked, paired_speedup, speedup_ci  # noqa: E402

PTQ_RECIPES = [
    "int8-static-qdq-minmax-perchannel",
    "int8-static-qdq-entropy-perchannel",
    "int8-static-qdq-percentile-perchannel",
    "int8-ptq-performance",
    "int8-ptq-mixed",
]
QAT_RECIPE = "int8-qat"


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def train(split: qatdata.Split, epochs: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=qatdata.CLASSES)
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    steps = epochs * -(-len(x) // 64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(scores, axis=1) == labels).mean())


def register(tracking_uri: str, model: Any, example: np.ndarray) -> str:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("training")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, out), input_example=example,
            pip_requirements=["torch"], registered_model_name="mobilenetv2",
        )  # fmt: skip
    return f"models:/mobilenetv2/{info.registered_model_version}"


def cli(argv: list[str], home: Path) -> tuple[dict[str, Any], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["QUANTGATE_HOME"] = str(home)
    env["QUANTGATE_CACHE_DIR"] = str(home / "cache")
    code = "import sys; from quantgate.cli import main; sys.argv[0] = 'quantgate'; main()"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        # A native crash: faulthandler's Python tracebacks (when PYTHONFAULTHANDLER is set) say where; they are
        # long (every thread, every extension module), so the whole stderr is kept.
        kept = HERE / ".cache" / "qat" / "compress-crash.stderr"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(proc.stderr)
        raise RuntimeError(f"quantgate compress exited {proc.returncode}; its stderr: {kept}")
    return json.loads(proc.stdout), wall


def side_by_side(
    doc: dict[str, Any], model_dir: Path, calibration: Path, evaluation: qatdata.Split, tracking_uri: str, work: Path
) -> dict[str, tuple[float, float, float]]:
    """Batch-1 speedups over each runtime's FP32 of the PTQ recipe each QAT recipe finishes with and of the QAT
    versions as registered, all timed in one rotation: the median of paired block ratios and its bootstrap interval
    (quantgate's latency validator's estimate)."""
    import mlflow

    info, _ = to_onnx(model_dir, work / "intake")
    calib = Calibration(NpzDataset.open(calibration), 16, 512)
    runners: dict[str, Any] = {}
    for backend in (OnnxRuntimeBackend(), OpenVinoBackend()):
        base = backend.baseline(info, work / backend.name / "fp32")
        runners[f"{backend.name} fp32"] = backend.runner(base, threads=1)
        qat_recipe = backend.qat_recipes(info)[0]
        finish = next(r for r in backend.recipes(info) if r.name == qat_recipe.options["finish"])
        ptq = backend.compress(info, finish, calib, work / backend.name / "ptq")
        runners[f"{backend.name} {finish.name} (PTQ)"] = backend.runner(ptq, threads=1)
        cand = next((c for c in doc["candidates"] if c["backend"] == backend.name and c["recipe"] == QAT_RECIPE), None)
        if cand is not None and cand.get("registered_uri"):
            mlflow.set_tracking_uri(tracking_uri)
            local = Path(mlflow.artifacts.download_artifacts(cand["registered_uri"], dst_path=str(work / "dl")))
            artifact = next(local.rglob("*.xml" if backend.name == "openvino" else "*.onnx"))
            recipe = Recipe.make(backend.name, QAT_RECIPE, "int8", **cand["settings"])
            runners[f"{backend.name} {QAT_RECIPE}"] = backend.runner(Candidate(recipe, artifact), threads=1)
    x = {"input": np.ascontiguousarray(evaluation.x[:1])}
    order = list(runners)
    only = [runners[k] for k in order]
    cfg = LatencyPolicy()
    timed = measure_blocked(
        only, x, warmup=20, rounds=150, block_calls=choose_blocks(only, x, cfg.min_block_ms, cfg.switch_ms)
    )
    blocks = dict(zip(order, (t.block_ms for t in timed), strict=True))
    out = {}
    for label, b in blocks.items():
        ref = blocks[f"{label.split()[0]} fp32"]
        low, high = speedup_ci(ref, b)
        out[label] = (paired_speedup(ref, b), low, high)  # the median of paired block ratios, as quantgate reports
    return out


def report(doc: dict[str, Any], speed: dict[str, tuple[float, float, float]], wall: float, args: Any) -> list[str]:
    fp32 = next(
        (c["all_metrics"]["accuracy_baseline"] for c in doc["candidates"] if "accuracy_baseline" in c["all_metrics"]),
        None,
    )
    lines = [
        "| backend | recipe | quantgate | top-1 | points lost | b1 speedup vs own FP32 (side by side, 95% CI) "
        "| QAT s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in doc["candidates"]:
        m = c["all_metrics"]
        s = speed.get(f"{c['backend']} {c['recipe']}") or speed.get(f"{c['backend']} {c['recipe']} (PTQ)")
        sp = f"{s[0]:.2f}x ({s[1]:.2f}-{s[2]:.2f})" if s else "-"
        lost = f"{m['accuracy_drop'] * 100:+.2f}" if "accuracy_drop" in m else "-"
        acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "-"
        qat_s = f"{m['qat_train_s']:.0f} of {m['qat_time_budget_s']:.0f}" if "qat_train_s" in m else ""
        lines.append(f"| {c['backend']} | {c['recipe']} | {c['status']} | {acc} | {lost} | {sp} | {qat_s} |")
    for label in (k for k in speed if k.endswith("fp32")):
        acc = "-" if fp32 is None else f"{fp32:.4f}"
        lines.append(f"| {label.split()[0]} | fp32 (baseline) | - | {acc} | +0.00 | 1.00x | |")
    # int8-qat's shape-specialized variant (int8-qat-static) is QAT too
    ptq = [
        c for c in doc["candidates"] if not c["recipe"].startswith(QAT_RECIPE) and "accuracy_drop" in c["all_metrics"]
    ]
    best = min(ptq, key=lambda c: c["all_metrics"]["accuracy_drop"]) if ptq else None
    lines.append("")
    if best is not None:
        drop = best["all_metrics"]["accuracy_drop"] * 100
        lines.append(
            f"- best PTQ candidate {best['backend']}/{best['recipe']} loses {drop:.2f} points "
            f"(more than 1: {met(drop > 1)}; at least 2: {met(drop >= 2)})"
        )
    for c in (c for c in doc["candidates"] if c["recipe"] == QAT_RECIPE):
        m = c["all_metrics"]
        drop = m.get("accuracy_drop", float("nan")) * 100
        q, p = (
            speed.get(f"{c['backend']} {QAT_RECIPE}"),
            next((v for k, v in speed.items() if k.startswith(c["backend"]) and k.endswith("(PTQ)")), None),
        )
        ratio = q[0] / p[0] if q and p else float("nan")
        lines.append(
            f"- {c['backend']}/{QAT_RECIPE}: loses {drop:.2f} points (at most 1: {met(drop <= 1)}); batch-1 speedup "
            f"{q[0] if q else float('nan'):.2f}x vs the PTQ recipe's {p[0] if p else float('nan'):.2f}x, ratio "
            f"{ratio:.2f} (within 10%: {met(ratio >= 0.9)}); fine-tuning {m.get('qat_train_s', float('nan')):.0f} s "
            f"of its {m.get('qat_time_budget_s', float('nan')):.0f} s budget "
            f"({met(m.get('qat_train_s', 1e9) <= m.get('qat_time_budget_s', 0))}), {m.get('qat_epochs', 0):.0f} "
            f"epochs, {m.get('qat_steps', 0):.0f} steps, final loss {m.get('qat_final_loss', float('nan')):.4g}"
        )
    lines.append(f"- quantgate compress wall time {wall:.0f} s (search budget {args.budget:.0f} s); outcome "
                 f"{doc['outcome']}, promoted {doc['promoted_uri']}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=24, help="training epochs of the FP32 MobileNetV2")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--signal", type=float, default=qatdata.SIGNAL, help="class pattern amplitude")
    parser.add_argument("--background", type=float, default=qatdata.BACKGROUND, help="smooth background amplitude")
    parser.add_argument("--noise", type=float, default=qatdata.NOISE, help="pixel noise")
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--qat-budget", type=float, default=400.0)
    parser.add_argument("--budget", type=float, default=1800.0, help="search.time_budget_s")
    parser.add_argument(
        "--labelled-training",
        type=int,
        default=0,
        help="also give QAT this many labelled training images as data.training (0: distillation on the "
        "unlabelled calibration set only)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    look = {"signal": args.signal, "background": args.background, "noise": args.noise}
    train_split, eval_split = qatdata.make(args.train, seed=1, **look), qatdata.make(args.eval, seed=2, **look)
    import torch

    # The trained FP32 model is kept between runs (training is most of a run's time); the data's settings are in
    # the key, and the training itself is seeded.
    look_key = f"s{args.signal}-b{args.background}-n{args.noise}"
    key = f"mobilenetv2-{qatdata.SIZE}px-{args.train}-{args.epochs}ep-{look_key}.pt"
    kept = HERE / ".cache" / "qat" / key
    reused = kept.exists()
    if reused:
        model = MobileNetV2(num_classes=qatdata.CLASSES)
        model.load_state_dict(torch.load(kept, weights_only=True))
        model.eval()
    else:
        model = train(train_split, args.epochs, seed=0)
        kept.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), kept)
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        fp32 = top1(model(torch.from_numpy(eval_split.x)).numpy(), eval_split.y)
    with tempfile.TemporaryDirectory(prefix="bench-qat-") as tmp:
        root = Path(tmp)
        tracking_uri = f"sqlite:///{root}/mlflow.db"
        os.chdir(root)
        uri = register(tracking_uri, model, eval_split.x[:2])
        calibration, evaluation = root / "calibration.npz", root / "evaluation.npz"
        np.savez(calibration, input=train_split.x[:512])  # no labels: QAT distils from the FP32 model
        np.savez(evaluation, input=eval_split.x, labels=eval_split.y)
        data = {"calibration": str(calibration), "evaluation": str(evaluation)}
        if args.labelled_training:
            # The images the FP32 model was trained on, with their labels: what the model's owner has.
            training = root / "training.npz"
            n = args.labelled_training
            np.savez(training, input=train_split.x[:n], labels=train_split.y[:n])
            data["training"] = str(training)
        policy = {
            "backends": ["onnxruntime", "openvino"],
            "recipes": [*PTQ_RECIPES, QAT_RECIPE],
            "data": data,
            "search": {"time_budget_s": args.budget, "cache": False},
            "qat": {"epochs": args.qat_epochs, "time_budget_s": args.qat_budget},
            "registry": {"register_all_passing": True},
        }
        (root / "policy.yaml").write_text(yaml.safe_dump(policy))
        argv = ["compress", uri, "--policy", str(root / "policy.yaml"), "--tracking-uri", tracking_uri, "--json"]
        doc, wall = cli(argv, root / "qghome")
        model_dir = root / "source"
        import mlflow.pytorch

        mlflow.pytorch.save_model(model, str(model_dir), input_example=eval_split.x[:2])
        speed = side_by_side(doc, model_dir, calibration, eval_split, tracking_uri, root / "timing")
        from quantgate.flows.prefect_server import stop_local_server

        stop_local_server(root / "qghome")
    how_trained = f"(kept from an earlier run: {kept.name})" if reused else f"in {train_s:.0f} s"
    lines = [
        f"MobileNetV2 (torchvision's, {qatdata.CLASSES} classes, {qatdata.SIZE}x{qatdata.SIZE}) trained {args.epochs} "
        f"epochs on {args.train} generated images {how_trained}: FP32 top-1 {fp32:.4f} on {args.eval} held-out",
        f"QAT fine-tunes {args.qat_epochs} epochs on "
        + (
            f"{args.labelled_training} labelled training images (cross-entropy plus distillation)"
            if args.labelled_training
            else "the 512 unlabelled calibration images (distillation only)"
        ),
        "",
        *report(doc, speed, wall, args),
        f"- host load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores",
    ]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"doc": doc, "speed": speed, "lines": lines}, indent=2, default=str))


if __name__ == "__main__":
    main()
