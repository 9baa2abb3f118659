"""One model on the three CPU backends (issue 12, item 6): ONNX Runtime, OpenVINO and LiteRT in one table. One run:

1. train torchvision's MobileNetV2 (benchmarks/mobilenetv2.py, re-declared) briefly on generated images
   (benchmarks/qatdata.py, an easier setting than bench_qat's: a stronger class signal on a weaker background, so a
   few minutes of training on 2 cores classify well above chance), seeded, and register it as a pytorch model
   (MLflow's pt2) in a fresh temporary MLflow store;
2. ``quantgate compress --json`` through the CLI, ``backends: [onnxruntime, openvino, litert]``, the default gate
   (1 point of top-1 on a labelled held-out set), every passing candidate registered, cache off; the search picks
   the recipes within its budget (``--recipes`` names a set instead);
3. one table from the JSON document: every candidate with its outcome, top-1 and points lost, batch-1 speedup over
   its own backend's FP32 and over ONNX Runtime FP32 (quantgate's paired speedups, 95% CI), size; then each
   backend's FP32 baseline, the promoted version, the wall time of the compress run and the host. Nothing is
   asserted.

    python benchmarks/bench_edge.py [--epochs 10] [--train 1200] [--budget 600] [--recipes a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import qatdata  # noqa: E402
from bench_qat import cli, register, top1, train  # noqa: E402

from quantgate.documents import metric  # noqa: E402

BACKENDS = ["onnxruntime", "openvino", "litert"]


def _ci(cand: Mapping[str, Any], key: str) -> str:
    value, low, high = (metric(cand, key + s) for s in ("", "_ci_low", "_ci_high"))
    if value is None:
        return "-"
    return f"{value:.2f}x ({low:.2f}-{high:.2f})" if low is not None and high is not None else f"{value:.2f}x"


def _vs_ort(cand: Mapping[str, Any]) -> str:
    if metric(cand, "speedup_vs_ort_fp32") is not None:
        return _ci(cand, "speedup_vs_ort_fp32")
    probe = _ci(cand, "probe_speedup_vs_ort_fp32")  # the search's short timing of a quality failure, never gated on
    return "-" if probe == "-" else f"{probe} probe"


def _outcome(cand: Mapping[str, Any]) -> str:
    if cand.get("promoted"):
        return "**promoted**"
    if cand.get("passed"):
        return "passed"
    word = "skipped" if cand.get("status") == "skipped" else "failed"
    reasons = [str(r) for r in cand.get("reasons") or []]
    reason = reasons[0] if reasons else ""
    if len(reason) > 110:
        reason = reason[:107] + "..."
    return f"{word}: {reason.replace('|', '/')}" if reason else word


def _size(cand: Mapping[str, Any], key: str = "size_bytes") -> str:
    value = metric(cand, key)
    return "-" if value is None else f"{value / 1e6:.2f}"


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(doc: Mapping[str, Any]) -> list[str]:
    lines = [
        "| backend | recipe | outcome | top-1 | points lost | b1 p50 ms | b1 speedup vs own FP32 (95% CI) "
        "| b1 speedup vs ORT FP32 (95% CI) | size MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cands = list(doc.get("candidates") or [])
    for c in cands:
        drop = metric(c, "accuracy_drop")
        lines.append(
            f"| {c['backend']} | {c['recipe']} | {_outcome(c)} | {_f(metric(c, 'accuracy'), '.4f')} "
            f"| {_f(None if drop is None else drop * 100, '+.2f')} | {_f(metric(c, 'latency_p50_ms'), '.3f')} "
            f"| {_ci(c, 'speedup')} | {_vs_ort(c)} | {_size(c)} |"
        )
    for backend in BACKENDS:  # each runtime's FP32, from the baseline_* metrics of its first measured candidate
        c = next((c for c in cands if c["backend"] == backend and metric(c, "baseline_latency_p50_ms")), None)
        if c is None:
            c = next((c for c in cands if c["backend"] == backend and metric(c, "accuracy_baseline")), None)
        if c is None:
            continue
        vs_ort = metric(c, "baseline_speedup_vs_ort_fp32")
        lines.append(
            f"| {backend} | fp32 (baseline) | - | {_f(metric(c, 'accuracy_baseline'), '.4f')} | +0.00 "
            f"| {_f(metric(c, 'baseline_latency_p50_ms'), '.3f')} | 1.00x "
            f"| {'1.00x' if backend == 'onnxruntime' else _f(vs_ort, '.2f') + 'x' if vs_ort else '-'} "
            f"| {_size(c, 'baseline_size_bytes')} |"
        )
    return lines


def run_lines(doc: Mapping[str, Any], wall: float, args: argparse.Namespace) -> list[str]:
    cands = list(doc.get("candidates") or [])
    promoted = next((c for c in cands if c.get("promoted")), None)
    registered = [str(c["registered_uri"]) for c in cands if c.get("registered_uri")]
    won = f"{promoted['backend']}/{promoted['recipe']} as {doc['promoted_uri']}" if promoted else "none"
    return [
        f"- promoted: {won} (outcome {doc.get('outcome')}); {sum(1 for c in cands if c.get('passed'))} of "
        f"{len(cands)} candidates passed; registered: {', '.join(registered) or 'none'}",
        f"- quantgate compress wall time {wall:.0f} s (search budget {args.budget:.0f} s; recipes: "
        f"{args.recipes or 'the search picks'})",
    ]


def host_lines(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> list[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    amx = sorted(f for f in flags if f.startswith("amx"))
    before, after = (", ".join(f"{x:.2f}" for x in la) for la in (load_before, load_after))
    return [
        f"- host: {model}, {os.cpu_count()} logical cores; lscpu flags: AVX-512 VNNI "
        f"{'yes' if 'avx512_vnni' in flags else 'no'}, AMX {'yes (' + ', '.join(amx) + ')' if amx else 'no'}",
        f"- load average (1/5/15 min): {before} before, {after} after",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the FP32 MobileNetV2")
    parser.add_argument("--train", type=int, default=1200, help="generated training images")
    parser.add_argument("--eval", type=int, default=1000, help="held-out labelled images the gate scores")
    parser.add_argument("--signal", type=float, default=1.5, help="class pattern amplitude (qatdata.make)")
    parser.add_argument("--background", type=float, default=1.0, help="background amplitude (qatdata.make)")
    parser.add_argument("--budget", type=float, default=600.0, help="search.time_budget_s")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: the search picks)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out_json = args.json.resolve() if args.json is not None else None  # the run chdirs into its temporary store
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    data = {"signal": args.signal, "background": args.background}
    train_split = qatdata.make(args.train, seed=1, **data)
    eval_split = qatdata.make(args.eval, seed=2, **data)
    model = train(train_split, args.epochs, seed=0)
    train_s = time.perf_counter() - t0
    import torch

    with torch.no_grad():
        fp32 = top1(model(torch.from_numpy(eval_split.x)).numpy(), eval_split.y)
    print(f"trained in {train_s:.0f} s: FP32 top-1 {fp32:.4f}; compressing", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        root = Path(tmp)
        tracking_uri = f"sqlite:///{root}/mlflow.db"
        os.chdir(root)
        uri = register(tracking_uri, model, eval_split.x[:2])
        calibration, evaluation = root / "calibration.npz", root / "evaluation.npz"
        np.savez(calibration, input=train_split.x[:512], labels=train_split.y[:512])
        np.savez(evaluation, input=eval_split.x, labels=eval_split.y)
        policy: dict[str, Any] = {
            "backends": BACKENDS,
            "data": {"calibration": str(calibration), "evaluation": str(evaluation)},
            "search": {"time_budget_s": args.budget, "cache": False},
            "registry": {"register_all_passing": True},
        }
        if args.recipes:
            policy["recipes"] = [r.strip() for r in args.recipes.split(",") if r.strip()]
        (root / "policy.yaml").write_text(yaml.safe_dump(policy))
        argv = ["compress", uri, "--policy", str(root / "policy.yaml"), "--tracking-uri", tracking_uri, "--json"]
        # The CLI of this checkout, not whichever quantgate the environment has installed.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        from quantgate.flows.prefect_server import stop_local_server

        try:
            doc, wall = cli(argv, root / "qghome")
        finally:
            stop_local_server(root / "qghome")
    lines = [
        f"MobileNetV2 (torchvision's, {qatdata.CLASSES} classes, {qatdata.SIZE}x{qatdata.SIZE}) trained "
        f"{args.epochs} epochs on {args.train} generated images (signal {args.signal}, background "
        f"{args.background}) in {train_s:.0f} s: FP32 top-1 {fp32:.4f} (PyTorch) on {args.eval} held-out",
        "",
        *table(doc),
        "",
        *run_lines(doc, wall, args),
        *host_lines(load_before, os.getloadavg()),
    ]
    print("\n".join(lines))
    if out_json is not None:
        result = {"doc": doc, "lines": lines, "fp32_top1": fp32, "train_s": train_s, "wall_s": wall}
        out_json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
