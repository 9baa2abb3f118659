"""A result document on the terminal: the gate table, the summary under it, the history table, the live progress
line. The same document as ``quantgate.report`` renders for MLflow and Prefect, drawn with rich for the CLI."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from quantgate.review import Attempt


class ProgressHandler(logging.Handler):
    """A live progress display on stderr (only on a terminal): the search's stage, candidate i of N and the budget
    used from its progress events, and quantgate's other INFO messages as the line under it."""

    def __init__(self, progress: Any) -> None:
        super().__init__(logging.INFO)
        self.progress = progress
        self.task = progress.add_task("[bold]quantgate[/] starting", total=100, note="")

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "quantgate_progress", None)
        if event is not None:
            self.progress.update(self.task, completed=event.fraction * 100, description=escape(event.describe()))
        else:
            self.progress.update(self.task, note=escape(record.getMessage()[:120]))


def gate_table(doc: dict[str, Any]) -> Table:
    """One row per candidate: its verdict and headline figures."""
    table = Table(title=f"quantgate: {doc['source']['uri']} ({doc['flavor']})", title_justify="left")
    # Each speedup is against FP32 on the candidate's own runtime; with several runtimes, the common yardstick too.
    cross = len({c["backend"] for c in doc["candidates"]}) > 1
    columns = ["backend", "recipe", "gate", "speedup", "95% CI", *(["vs ORT FP32"] if cross else [])]
    for col in (*columns, "p50 ms", "size", "acc. drop", "fidelity"):
        table.add_column(col, justify="right" if col not in ("backend", "recipe", "gate") else "left")
    for c in doc["candidates"]:
        m = c["all_metrics"]
        verdict = "[green]PROMOTED[/]" if c["promoted"] else ("[green]pass[/]" if c["passed"] else "[red]fail[/]")
        if c.get("status") == "skipped":
            verdict = "[yellow]skipped[/]"
        vs_ort = [f"{m['speedup_vs_ort_fp32']:.2f}x" if "speedup_vs_ort_fp32" in m else "-"] if cross else []
        table.add_row(
            c["backend"], escape(c["recipe"]), verdict,
            f"{m['speedup']:.2f}x" if "speedup" in m else "-",
            f"{m['speedup_ci_low']:.2f}-{m['speedup_ci_high']:.2f}" if "speedup_ci_low" in m else "-",
            *vs_ort,
            f"{m['latency_p50_ms']:.3f}" if "latency_p50_ms" in m else "-",
            f"{m['size_ratio']:.2f}" if "size_ratio" in m else "-",
            f"{m['accuracy_drop'] * 100:+.2f} pt" if "accuracy_drop" in m else "-",
            f"{m['fidelity']:.4f}" if "fidelity" in m else "-",
        )  # fmt: skip
    return table


def print_summary(out: Console, doc: dict[str, Any]) -> None:
    """The gate table, why each candidate failed, and what was promoted."""
    out.print(gate_table(doc))
    for c in doc["candidates"]:
        if not c["passed"]:
            mark = "[yellow]-[/]" if c.get("status") == "skipped" else "[red]x[/]"
            out.print(f"  {mark} {escape(c['backend'] + '/' + c['recipe'])}: " + escape("; ".join(c["reasons"])))
    for note in doc.get("host_notes", []):
        out.print(f"  [yellow]![/] {escape(note)}")
    if doc["promoted_uri"]:
        out.print(f"[green]promoted[/] {doc['promoted_uri']}")
    else:
        out.print("[red]no candidate passed the gate[/]: nothing was registered")
    hw = doc["hardware"]
    out.print(f"hardware: {hw['cpu_model']} ({hw['logical_cores']} cores; {', '.join(hw['isa_flags'])})")


def history_table(name: str, attempts: Sequence[Attempt]) -> Table:
    """Every compression attempt of a registered model, newest first."""
    table = Table(title=f"quantgate history: {escape(name)}", title_justify="left")
    for col in ("started (UTC)", "version", "outcome", "passed", "promoted", "policy", "run"):
        table.add_column(col)
    for a in attempts:
        outcome = a.outcome or a.status.lower()
        style = "green" if outcome == "promoted" else ("red" if a.status == "FAILED" else "yellow")
        table.add_row(
            a.started.strftime("%Y-%m-%d %H:%M:%S"), a.version, f"[{style}]{escape(outcome)}[/]",
            f"{a.passed}/{a.candidates}", escape(a.promoted_uri or "-"), a.policy_hash, a.run_id,
        )  # fmt: skip
    return table
