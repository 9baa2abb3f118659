"""Digits CNN: every ONNX Runtime recipe against FP32, through the real `quantgate compress` CLI.

One run, one table. Speedups are measured side by side (baseline and candidate interleaved in one
process), so they hold on a shared machine even when absolute milliseconds drift. Nothing here is
asserted; targets are printed as MET / NOT MET.

    python benchmarks/bench_digits.py [--out DIR] [--epochs 8] [--rounds 200]
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

TARGET_SPEEDUP_B1 = 2.5
TARGET_MAX_DROP = 0.01
TARGET_OVERHEAD = 0.15
TARGET_STARTUP_S = 5.0


def run_compress(model_uri: str, policy: Path, env: dict[str, str], cwd: Path) -> tuple[dict[str, Any], float]:
    exe = str(Path(sys.executable).with_name("quantgate"))
    start = time.perf_counter()
    proc = subprocess.run(
        [exe, "compress", model_uri, "--policy", str(policy), "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"quantgate compress failed ({proc.returncode}): {proc.stderr.strip()}")
    if proc.stderr.strip():
        print(f"(stderr was not empty: {proc.stderr.strip()[:500]})")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc, wall


def _f(m: dict[str, float], key: str, fmt: str, scale: float = 1.0) -> str:
    return format(m[key] * scale, fmt) if key in m else "-"


def table(doc: dict[str, Any]) -> str:
    rows = [
        "| variant | gate | top-1 | drop (pt) | fidelity | size MB | size ratio | b1 p50 ms | b1 speedup (95% CI) "
        "| b32 p50 ms | b32 speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = doc["candidates"][0]["all_metrics"]
    rows.append(
        f"| FP32 (baseline) | - | {_f(first, 'accuracy_baseline', '.4f')} | - | 1 "
        f"| {_f(first, 'baseline_size_bytes', '.2f', 1e-6)} | 1.00 | {_f(first, 'baseline_latency_p50_ms_b1', '.3f')} "
        f"| 1.00 | {_f(first, 'baseline_latency_p50_ms_b32', '.3f')} | 1.00 |"
    )
    for c in doc["candidates"]:
        m = c["all_metrics"]
        verdict = "PROMOTED" if c["promoted"] else ("pass" if c["passed"] else "fail: " + c["reasons"][0][:60])
        ci = (
            f"{m['speedup_b1']:.2f}x ({m['speedup_ci_low_b1']:.2f}-{m['speedup_ci_high_b1']:.2f})"
            if "speedup_b1" in m
            else "-"
        )
        rows.append(
            f"| {c['recipe']} | {verdict} | {_f(m, 'accuracy', '.4f')} | {_f(m, 'accuracy_drop', '+.2f', 100)} "
            f"| {_f(m, 'fidelity', '.5f')} | {_f(m, 'size_bytes', '.2f', 1e-6)} | {_f(m, 'size_ratio', '.2f')} "
            f"| {_f(m, 'latency_p50_ms_b1', '.3f')} | {ci} | {_f(m, 'latency_p50_ms_b32', '.3f')} "
            f"| {_f(m, 'speedup_b32', '.2f')}x |"
        )
    return "\n".join(rows)


def figures(doc: dict[str, Any], runs: list[tuple[str, dict[str, Any], float]]) -> list[str]:
    lines = []
    promoted = next((c for c in doc["candidates"] if c["promoted"]), None)
    if promoted is None:
        lines.append("promoted: none -> target NOT MET")
    else:
        m = promoted["all_metrics"]
        met = m["speedup_b1"] >= TARGET_SPEEDUP_B1 and m.get("accuracy_drop", 0.0) <= TARGET_MAX_DROP
        lines.append(
            f"promoted: {promoted['recipe']}: {m['speedup_b1']:.2f}x at batch 1, top-1 drop "
            f"{m.get('accuracy_drop', 0.0) * 100:.2f} pt (target >= {TARGET_SPEEDUP_B1}x, <= 1 pt): "
            + ("MET" if met else "NOT MET")
        )
    dynamic = [c for c in doc["candidates"] if c["recipe"].startswith("int8-dynamic")]
    rejected = all(not c["promoted"] and any("speedup" in r for r in c["reasons"]) for c in dynamic)
    lines.append(f"dynamic INT8 rejected by the latency gate: {'MET' if dynamic and rejected else 'NOT MET'}")
    for label, run_doc, wall in runs:
        t = run_doc["timings_s"]
        work = t["compress_s"] + t["validate_s"]
        startup = t["process_start_to_flow_s"]
        overhead = (wall - work) / wall
        steps = ", ".join(
            f"{k.removesuffix('_s')} {t[k]:.1f}s" for k in ("resolve_s", "intake_s", "data_s", "register_s") if k in t
        )
        lines.append(
            f"{label} run: wall {wall:.1f}s, compress+measure {work:.1f}s, overhead {overhead:.1%} "
            f"(target < {TARGET_OVERHEAD:.0%}: {'MET' if overhead < TARGET_OVERHEAD else 'NOT MET'}); "
            f"start-up before the first task {startup:.2f}s "
            f"(target < {TARGET_STARTUP_S:.0f}s: {'MET' if startup < TARGET_STARTUP_S else 'NOT MET'}); "
            f"other steps: {steps}"
        )
    hw = doc["hardware"]
    lines.append(
        f"host: {hw['cpu_model']}, {hw['logical_cores']} cores, ISA {', '.join(hw['isa_flags'])}, "
        f"int8 dot product: {hw['int8_dot_product']}"
    )
    lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(hw["libraries"].items())))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write digits.md and the JSON documents here")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    from quantgate.demo import register_demo_model
    from quantgate.flows.runtime import stop_local_server

    with tempfile.TemporaryDirectory(prefix="quantgate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            model_uri = register_demo_model(uri, tmp / "work", epochs=args.epochs)
        finally:
            os.chdir(cwd)
        policy = tmp / "policy.yaml"
        latency = {"threads": 1, "warmup": 20, "rounds": args.rounds, "batch_sizes": [1, 32]}
        policy.write_text(yaml.safe_dump({"latency": latency}))
        home = tmp / "qghome"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update({"MLFLOW_TRACKING_URI": uri, "QUANTGATE_HOME": str(home)})
        try:
            cold, cold_wall = run_compress(model_uri, policy, env, tmp)
            warm, warm_wall = run_compress(model_uri, policy, env, tmp)
        finally:
            stop_local_server(home)
    report = "\n".join(
        [
            f"## digits CNN ({model_uri}), every onnxruntime recipe, {args.rounds} interleaved rounds",
            "",
            table(cold),
            "",
            *[f"- {line}" for line in figures(cold, [("cold", cold, cold_wall), ("warm", warm, warm_wall)])],
            f"- second run registered no duplicate: promoted {warm['promoted_uri']} (first: {cold['promoted_uri']})",
        ]
    )
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "digits.md").write_text(report + "\n")
        (args.out / "cold.json").write_text(json.dumps(cold, indent=2))
        (args.out / "warm.json").write_text(json.dumps(warm, indent=2))


if __name__ == "__main__":
    main()
