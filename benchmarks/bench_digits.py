"""Digits CNN: every ONNX Runtime recipe against FP32, through the real `quantgate compress` CLI.

In a fresh temporary directory: a new SQLite MLflow store, the demo CNN trained and registered
(quantgate.demo), a policy that runs every recipe with latency at batch 1 and 32, then
`quantgate compress ... --json` twice as a subprocess with its own QUANTGATE_HOME: a cold run (the
local Prefect server is created and started) and a warm run (server reused, nothing new to register).

Prints one markdown table (from the cold run) and the figures that go with it. Speedups are measured
side by side (baseline and candidate interleaved in one process), so they hold on a shared machine even
when absolute milliseconds drift. Nothing here is asserted; targets are printed as MET / NOT MET.

    python benchmarks/bench_digits.py [--out DIR] [--epochs 8] [--rounds 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

TARGET_SPEEDUP_B1 = 2.5
TARGET_MAX_DROP = 0.01  # top-1, absolute (1 point)
TARGET_OVERHEAD = 0.15
TARGET_STARTUP_S = 5.0
MODEL_NAME = "digits-cnn"


@dataclass(frozen=True)
class CliRun:
    label: str
    doc: dict[str, Any]
    wall_s: float
    exit_code: int
    stderr: str


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def quantgate_exe() -> str:
    return str(Path(sys.executable).with_name("quantgate"))


def cli_env(home: Path) -> dict[str, str]:
    # Hermetic: a PREFECT_API_URL or MLFLOW_* setting in the caller's shell must not redirect the benchmark.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["QUANTGATE_HOME"] = str(home)
    return env


def run_compress(label: str, argv: list[str], env: dict[str, str], cwd: Path) -> CliRun:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"{label} run: quantgate compress exited {proc.returncode}:\n{proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return CliRun(label, doc, wall, proc.returncode, proc.stderr)


def train_and_register(tracking_uri: str, workdir: Path, epochs: int) -> str:
    """register_demo_model, with MLflow's INFO chatter ("Creating initial MLflow database tables...") held back."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from quantgate.demo import register_demo_model

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return register_demo_model(tracking_uri, workdir, name=MODEL_NAME, epochs=epochs)
    finally:
        # Only MLflow's registration notices are expected; anything else (a warning, an error) is shown.
        notices = ("Successfully registered model", "Created version", " INFO mlflow.")
        for line in captured.getvalue().splitlines():
            if line.strip() and not any(n in line for n in notices):
                print(line, file=sys.stderr)


def registered_versions(tracking_uri: str) -> dict[str, tuple[str, str]]:
    """``name/version`` -> (source URI, recipe), from the lineage tags of every version quantgate registered."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return {
        f"{mv.name}/{mv.version}": (mv.tags.get("quantgate.source_uri", "?"), mv.tags.get("quantgate.recipe", "?"))
        for mv in client.search_model_versions()
        if (mv.tags or {}).get("quantgate.managed") == "true"
    }


def registration_line(
    after_cold: dict[str, tuple[str, str]], after_warm: dict[str, tuple[str, str]], cold: CliRun, warm: CliRun
) -> str:
    keys = list(after_warm.values())
    duplicates = sorted({f"{recipe} of {source}" for source, recipe in keys if keys.count((source, recipe)) > 1})
    passed_cold = {c["recipe"] for c in cold.doc["candidates"] if c["passed"]}
    new = [
        f"{version} ({recipe}{'' if recipe in passed_cold else ': failed the gate in the cold run'})"
        for version, (_, recipe) in after_warm.items()
        if version not in after_cold
    ]
    return (
        f"registration: cold run registered {len(after_cold)} versions, warm run {len(new)} new"
        + (f" [{', '.join(new)}]" if new else "")
        + f"; same source+recipe registered twice: {', '.join(duplicates) or 'none'} "
        f"(no duplicate: {met(not duplicates)}); promoted: cold {cold.doc['promoted_uri']}, "
        f"warm {warm.doc['promoted_uri']}"
    )


def torch_test_accuracy(tracking_uri: str) -> float | None:
    """The PyTorch model's test accuracy that register_demo_model logged, as a cross-check of FP32 ONNX."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("digits-training")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=1)
    value = runs[0].data.metrics.get("test_accuracy") if runs else None
    return float(value) if value is not None else None


def _f(m: dict[str, float], key: str, fmt: str, scale: float = 1.0) -> str:
    return format(m[key] * scale, fmt) if key in m else "-"


def short_reason(candidate: dict[str, Any]) -> str:
    """`check: measured value` of the first failed check, e.g. `speedup: lower bound 0.34x at batch 1`."""
    failed = [c for c in candidate.get("checks", []) if not c["passed"]]
    if not failed:
        reasons = candidate.get("reasons") or ["?"]
        return str(reasons[0])[:50]
    name, detail = failed[0]["name"], str(failed[0]["detail"])
    detail = detail.split(" (")[0].split(", at ")[0]
    detail = detail.removeprefix("speedup ").removeprefix("top-1 accuracy ")
    more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"{name}: {detail}{more}"


def verdict(candidate: dict[str, Any]) -> str:
    if candidate["promoted"]:
        return "PROMOTED"
    return "pass" if candidate["passed"] else "fail: " + short_reason(candidate)


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def baseline_row(candidates: list[dict[str, Any]]) -> str:
    # Every candidate is timed against its own interleaved FP32 run: show the median and range of those.
    ms = [c["all_metrics"] for c in candidates if "accuracy_baseline" in c["all_metrics"]]
    first = ms[0] if ms else {}
    b1 = [m["baseline_latency_p50_ms_b1"] for m in ms if "baseline_latency_p50_ms_b1" in m]
    b32 = [m["baseline_latency_p50_ms_b32"] for m in ms if "baseline_latency_p50_ms_b32" in m]
    return (
        f"| FP32 (baseline) | - | {_f(first, 'accuracy_baseline', '.4f')} | - | 1 "
        f"| {_f(first, 'baseline_size_bytes', '.2f', 1e-6)} | 1.00 | {_spread(b1, '.3f')} | 1.00 "
        f"| {_spread(b32, '.2f')} | 1.00 |"
    )


def candidate_row(c: dict[str, Any]) -> str:
    m = c["all_metrics"]
    b1 = (
        f"{m['speedup_b1']:.2f}x ({m['speedup_ci_low_b1']:.2f}-{m['speedup_ci_high_b1']:.2f})"
        if "speedup_ci_low_b1" in m
        else "-"
    )
    b32 = f"{m['speedup_b32']:.2f}x" if "speedup_b32" in m else "-"
    return (
        f"| {c['recipe']} | {verdict(c)} | {_f(m, 'accuracy', '.4f')} | {_f(m, 'accuracy_drop', '+.2f', 100)} "
        f"| {_f(m, 'fidelity', '.5f')} | {_f(m, 'size_bytes', '.2f', 1e-6)} | {_f(m, 'size_ratio', '.2f')} "
        f"| {_f(m, 'latency_p50_ms_b1', '.3f')} | {b1} | {_f(m, 'latency_p50_ms_b32', '.2f')} | {b32} |"
    )


def table(doc: dict[str, Any]) -> str:
    rows = [
        "| recipe | gate | top-1 | top-1 lost (pt) | fidelity | size MB | size ratio | b1 p50 ms "
        "| b1 speedup (95% CI) | b32 p50 ms | b32 speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        baseline_row(doc["candidates"]),
    ]
    rows += [candidate_row(c) for c in doc["candidates"]]
    return "\n".join(rows)


def _failed_latency_gate(candidate: dict[str, Any]) -> bool:
    return any(k["name"] == "speedup" and not k["passed"] for k in candidate.get("checks", []))


def target_lines(label: str, doc: dict[str, Any]) -> list[str]:
    promoted = next((c for c in doc["candidates"] if c["promoted"]), None)
    target = f"target >= {TARGET_SPEEDUP_B1}x and <= {TARGET_MAX_DROP * 100:.0f} pt lost"
    if promoted is None:
        first = f"{label} run: nothing promoted; {target}: NOT MET"
    else:
        m = promoted["all_metrics"]
        speedup, drop = m.get("speedup_b1", 0.0), m.get("accuracy_drop", float("inf"))
        ci = f"95% CI {m.get('speedup_ci_low_b1', 0.0):.2f}-{m.get('speedup_ci_high_b1', 0.0):.2f}"
        # Three decimals: at two, 2.497x would read "2.50x ... NOT MET".
        first = (
            f"{label} run: promoted {promoted['recipe']} ({promoted['registered_uri']}): {speedup:.3f}x at batch 1 "
            f"({ci}), top-1 lost {drop * 100:.2f} pt; {target}: "
            + met(speedup >= TARGET_SPEEDUP_B1 and drop <= TARGET_MAX_DROP + 1e-12)
        )
    dynamic = [c for c in doc["candidates"] if c["recipe"].startswith("int8-dynamic")]
    parts = [
        f"{c['recipe']} {c['all_metrics'].get('speedup_b1', float('nan')):.2f}x "
        f"(latency gate {'failed' if _failed_latency_gate(c) else 'passed'}, "
        f"{'promoted' if c['promoted'] else 'not promoted'})"
        for c in dynamic
    ]
    rejected = bool(dynamic) and all(_failed_latency_gate(c) and not c["promoted"] for c in dynamic)
    second = f"{label} run: dynamic INT8 rejected by the latency gate, not promoted: {met(rejected)}: " + "; ".join(
        parts
    )
    return [first, second]


def timing_line(run: CliRun) -> str:
    t = run.doc["timings_s"]
    work = t["compress_s"] + t["validate_s"]
    overhead = run.wall_s - work
    share = overhead / run.wall_s
    startup = t["process_start_to_flow_s"]
    after_flow = run.wall_s - startup - t["flow_s"]
    steps = ", ".join(
        f"{k.removesuffix('_s')} {t[k]:.1f}" for k in ("resolve_s", "intake_s", "data_s", "register_s") if k in t
    )
    tasks = t.get("candidates_s", work) - work
    return (
        f"{run.label} run (exit {run.exit_code}): wall {run.wall_s:.1f} s, compress+measure {work:.1f} s, "
        f"overhead {overhead:.1f} s = {share:.1%} (target < {TARGET_OVERHEAD:.0%}: {met(share < TARGET_OVERHEAD)}); "
        f"start-up before the first task {startup:.2f} s (target < {TARGET_STARTUP_S:.0f} s: "
        f"{met(startup < TARGET_STARTUP_S)}); overhead split, s: start-up {startup:.1f}, {steps}, "
        f"task bookkeeping {tasks:.1f}, after the flow {after_flow:.1f}"
    )


def warm_speedups(warm: dict[str, Any]) -> str:
    parts = [
        f"{c['recipe']} {c['all_metrics']['speedup_b1']:.2f}x"
        for c in warm["candidates"]
        if "speedup_b1" in c["all_metrics"]
    ]
    return "warm run, every recipe re-measured: batch-1 speedups " + ", ".join(parts)


def host_lines(doc: dict[str, Any], load: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    hw = doc["hardware"]
    libs = dict(hw.get("libraries", {}))
    for extra in ("prefect", "torch", "mlflow"):
        libs.setdefault(extra, _version(extra))
    before, after = (", ".join(f"{x:.2f}" for x in la) for la in load)
    return [
        f"host: {hw['cpu_model']} ({hw['arch']}), {hw['logical_cores']} logical cores, ISA: "
        f"{', '.join(hw['isa_flags']) or 'none of interest'}; int8 dot product: {hw['int8_dot_product']}; "
        f"load average (1/5/15 min) {before} before, {after} after",
        f"libraries: python {hw.get('python', '?')}, " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())),
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def stderr_line(runs: list[CliRun]) -> str:
    parts = []
    for run in runs:
        text = run.stderr.strip()
        if not text:
            parts.append(f"{run.label}: empty")
        else:
            first = text.splitlines()[0][:160]
            parts.append(f"{run.label}: {len(text.splitlines())} lines, first: {first!r}")
    return "CLI stderr: " + "; ".join(parts)


def report(
    model_uri: str,
    args: argparse.Namespace,
    runs: list[CliRun],
    versions: tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]],
    torch_acc: float | None,
    evaluated: int,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    cold, warm = runs
    after_cold, after_warm = versions
    figures = [
        *target_lines("cold", cold.doc),
        *target_lines("warm", warm.doc),
        warm_speedups(warm.doc),
        *(timing_line(r) for r in runs),
        registration_line(after_cold, after_warm, cold, warm),
        "PyTorch FP32 test accuracy at registration: " + (f"{torch_acc:.4f}" if torch_acc is not None else "unknown"),
        *host_lines(cold.doc, load),
        stderr_line(runs),
    ]
    head = (
        f"## digits CNN ({model_uri}, {args.epochs} epochs): every onnxruntime recipe vs FP32 "
        f"(1 thread, {args.rounds} interleaved rounds, {evaluated} held-out digits; cold run)"
    )
    return "\n".join([head, "", table(cold.doc), "", *[f"- {line}" for line in figures]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write digits.md and the two JSON documents here")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the demo CNN")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved latency rounds per batch size")
    args = parser.parse_args()

    from quantgate.demo import digits_data
    from quantgate.flows.prefect_server import local_server_status, stop_local_server

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="quantgate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp}/mlflow.db"
        cwd = Path.cwd()
        # MLflow puts a SQLite store's artifacts in ./mlruns: keep them in the temporary directory.
        os.chdir(tmp)
        try:
            model_uri = train_and_register(uri, tmp / "work", args.epochs)
        finally:
            os.chdir(cwd)
        torch_acc = torch_test_accuracy(uri)
        evaluated = len(digits_data().y_test)  # what register_demo_model wrote as the evaluation set
        policy = tmp / "policy.yaml"
        latency = {"threads": 1, "warmup": 20, "rounds": args.rounds, "batch_sizes": [1, 32]}
        policy.write_text(yaml.safe_dump({"latency": latency}))
        home = tmp / "qghome"
        env = cli_env(home)
        argv = [quantgate_exe(), "compress", model_uri, "--policy", str(policy), "--tracking-uri", uri, "--json"]
        try:
            cold = run_compress("cold", argv, env, tmp)
            after_cold = registered_versions(uri)
            warm = run_compress("warm", argv, env, tmp)
            after_warm = registered_versions(uri)
        finally:
            stopped = stop_local_server(home)
            left = local_server_status(home)
        load_after = os.getloadavg()
    text = report(
        model_uri, args, [cold, warm], (after_cold, after_warm), torch_acc, evaluated, (load_before, load_after)
    )
    text += f"\n- local Prefect server stopped at the end: {stopped}; still running: {left is not None}"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "digits.md").write_text(text + "\n")
        for run in (cold, warm):
            (args.out / f"digits-{run.label}.json").write_text(json.dumps(run.doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
