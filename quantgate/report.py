"""Review material from a result document: tables, Markdown and one self-contained HTML page (plots: quantgate.plots).

Everything here reads the JSON-able dict from ``CompressionResult.to_document()`` (or the same dict loaded back
from ``result.json``), so a report can be rebuilt later from a logged artifact without the objects or MLflow.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from quantgate.documents import (
    Doc,
    _check_names,
    _check_result,
    _checks,
    _reasons,
    _verdict,
    _winner,
    baselines,
    candidates,
    label,
    metric,
    status,
)
from quantgate.names import DESCRIPTION_PREFIX

__all__ = ["Doc", "baselines", "candidates", "comparison_rows", "label", "markdown_report", "metric", "status"]

Row = dict[str, str | float | None]

_NUMERIC = (
    "accuracy",
    "accuracy_drop",
    "fidelity",
    "speedup",
    "speedup_ci_low",
    "speedup_ci_high",
    "speedup_vs_ort_fp32",
    "size_ratio",
    "latency_p50_ms",
    "latency_p95_ms",
    "baseline_latency_p50_ms",
)


# --- table rows ----------------------------------------------------------------------------------------------------


def _check_column(name: str) -> str:
    """Checks share names with metrics ("accuracy", "speedup"), so their pass/FAIL columns need a suffix."""
    return f"{name}_check"


def comparison_rows(doc: Doc) -> list[Row]:
    """One row per FP32 baseline (per backend) and per candidate, all with the same columns.

    Columns: backend, recipe, verdict (PROMOTED/passed/failed/baseline), ``<check>_check`` (pass/FAIL, "" where
    the check did not apply), the numeric metrics, reason (the first failed check's detail).

    Values are str, float or None only, so ``mlflow.log_table(data=pandas.DataFrame(rows))`` and Prefect's
    ``create_table_artifact(table=rows)`` take them as they are. ``accuracy_drop`` is in points (percent).
    Baselines' ``speedup_vs_ort_fp32`` is derived from two separately measured baselines on the same host.
    """
    checks = _check_names(doc)
    rows: list[Row] = []
    bases = baselines(doc)
    from quantgate.plugins.base import reference_name  # lazily: reading a document needs no plugin otherwise

    reference = reference_name()
    ort = bases.get(reference)
    ort_p50 = metric(ort, "baseline_latency_p50_ms") if ort is not None else None
    for backend, cand in bases.items():
        p50 = metric(cand, "baseline_latency_p50_ms")
        row: Row = {"backend": backend, "recipe": "fp32-baseline", "verdict": "baseline"}
        row.update(dict.fromkeys(map(_check_column, checks), ""))
        row.update(dict.fromkeys(_NUMERIC))
        acc = metric(cand, "accuracy_baseline")
        # Measured side by side with the candidates when present; else the ratio of two separately timed baselines.
        vs_ort = metric(cand, "baseline_speedup_vs_ort_fp32")
        if vs_ort is None:
            vs_ort = ort_p50 / p50 if ort_p50 is not None and p50 else None
        row.update(
            accuracy=acc,
            accuracy_drop=0.0 if acc is not None else None,
            speedup=1.0,
            speedup_vs_ort_fp32=1.0 if backend == reference else vs_ort,
            size_ratio=1.0,
            latency_p50_ms=p50,
            latency_p95_ms=metric(cand, "baseline_latency_p95_ms"),
            baseline_latency_p50_ms=p50,
            reason="",
        )
        rows.append(row)
    for cand in candidates(doc):
        row = {"backend": str(cand.get("backend")), "recipe": str(cand.get("recipe")), "verdict": _verdict(cand)}
        row.update({_check_column(name): _check_result(cand, name) for name in checks})
        row.update({key: metric(cand, key) for key in _NUMERIC})
        drop = row["accuracy_drop"]
        row["accuracy_drop"] = drop * 100 if isinstance(drop, float) else None
        reasons = _reasons(cand)
        row["reason"] = reasons[0] if reasons else ""
        rows.append(row)
    return [_ordered(row, checks) for row in rows]


# The UI shows the first columns without scrolling: what won and by how much first, then pass/fail per check.
_LEADING = ("backend", "recipe", "verdict", "speedup", "speedup_vs_ort_fp32", "accuracy_drop", "fidelity", "size_ratio")


def _ordered(row: Row, checks: Sequence[str]) -> Row:
    order = [*_LEADING, *map(_check_column, checks), *(k for k in _NUMERIC if k not in _LEADING), "reason"]
    return {key: row.get(key) for key in order}


# --- plain-text pieces shared by Markdown and HTML -----------------------------------------------------------------


def _f(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _key_number(cand: Mapping[str, Any], check: str) -> str:
    """The one figure a reviewer wants next to a check's pass/FAIL."""
    if check == "accuracy":
        drop = metric(cand, "accuracy_drop")
        return "" if drop is None else f"{drop * 100:.2f} pt drop"
    if check == "fidelity":
        fid = metric(cand, "fidelity")
        return "" if fid is None else f"{fid:.4f}"
    if check == "speedup":
        s, lo, hi = (metric(cand, k) for k in ("speedup", "speedup_ci_low", "speedup_ci_high"))
        if s is None:
            return ""
        return f"{s:.2f}x" + (f" [{lo:.2f}-{hi:.2f}]" if lo is not None and hi is not None else "")
    if check == "size":
        size = metric(cand, "size_ratio")
        return "" if size is None else f"{size:.2f} of FP32"
    return ""


def _gate_table(doc: Doc) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Header and cells as (text, status); status drives colours in HTML and is dropped in Markdown."""
    checks = _check_names(doc)
    show_ort = any(metric(c, "speedup_vs_ort_fp32") is not None for c in candidates(doc))
    header = ["candidate", "verdict", *checks, "p50 ms (FP32)"] + (["vs ORT FP32"] if show_ort else [])
    body: list[list[tuple[str, str]]] = []
    for cand in candidates(doc):
        cells = [(label(cand), ""), (_verdict(cand), status(cand))]
        for name in checks:
            result = _check_result(cand, name)
            number = _key_number(cand, name)
            text = f"{result} ({number})" if result and number else result or "n/a"
            cells.append((text, {"pass": "pass", "FAIL": "fail"}.get(result, "")))
        p50, base = metric(cand, "latency_p50_ms"), metric(cand, "baseline_latency_p50_ms")
        cells.append((f"{_f(p50, '.3f')} ({_f(base, '.3f')})" if p50 is not None else "-", ""))
        if show_ort:
            cells.append((_f(metric(cand, "speedup_vs_ort_fp32"), ".2f", "x"), ""))
        body.append(cells)
    return header, body


def _hardware_text(hw: Mapping[str, Any]) -> str:
    flags = ", ".join(str(f) for f in hw.get("isa_flags") or []) or "none of interest"
    dot = "yes" if hw.get("int8_dot_product") else "no (INT8 matmuls have no fast path here)"
    return (
        f"{hw.get('cpu_model', 'unknown CPU')} ({hw.get('arch', '?')}, {hw.get('logical_cores', '?')} logical cores); "
        f"ISA: {flags}; INT8 dot-product (VNNI/AMX): {dot}"
    )


def _measured_on(doc: Doc, cand: Mapping[str, Any]) -> str:
    """The host a candidate was measured on: this run's, or a target pool worker's (from its hardware check)."""
    here = (doc.get("hardware") or {}).get("fingerprint")
    check = next((c for c in _checks(cand) if c.get("name") == "hardware"), None)
    if check is not None and cand.get("hardware_fingerprint") != here:
        return str(check.get("detail")).removeprefix("measured on ")
    return _hardware_text(doc.get("hardware") or {})


def _remote(doc: Doc) -> list[tuple[str, str]]:
    """(candidate, where) for every candidate a target pool's worker measured."""
    here = (doc.get("hardware") or {}).get("fingerprint")
    return [
        (label(c), _measured_on(doc, c))
        for c in candidates(doc)
        if c.get("hardware_fingerprint") not in (None, here) and any(x.get("name") == "hardware" for x in _checks(c))
    ]


def _libraries_text(hw: Mapping[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in (hw.get("libraries") or {}).items()]
    if hw.get("python"):
        parts.append(f"Python {hw['python']}")
    return ", ".join(parts)


def _headline(cand: Mapping[str, Any]) -> str:
    """Speed, size and quality of one candidate in one clause."""
    parts: list[str] = []
    s, lo, hi = (metric(cand, k) for k in ("speedup", "speedup_ci_low", "speedup_ci_high"))
    if s is not None:
        ci = f" (95% CI {lo:.2f}-{hi:.2f}x)" if lo is not None and hi is not None else ""
        parts.append(f"{s:.2f}x faster than FP32 on {cand.get('backend')}{ci}")
    vs_ort = metric(cand, "speedup_vs_ort_fp32")
    if vs_ort is not None:
        parts.append(f"{vs_ort:.2f}x vs ONNX Runtime FP32")
    if (size := metric(cand, "size_ratio")) is not None:
        parts.append(f"{size:.2f} of the FP32 size")
    if (drop := metric(cand, "accuracy_drop")) is not None:
        parts.append(f"accuracy drop {drop * 100:.2f} points")
    elif (fid := metric(cand, "fidelity")) is not None:
        parts.append(f"fidelity {fid:.4f}")
    return ", ".join(parts) or "no measurements"


def _outcome_text(doc: Doc) -> str:
    winner = _winner(doc)
    hw = _hardware_text(doc.get("hardware") or {})
    if winner is None:
        n = len(candidates(doc))
        return f"No candidate passed the gate ({n} tried); nothing was promoted. Measured on {hw}."
    where = f" as {winner['registered_uri']}" if winner.get("registered_uri") else ""
    return f"Promoted {label(winner)}{where}: {_headline(winner)}. Measured on {_measured_on(doc, winner)}."


def _losers(doc: Doc) -> list[tuple[str, str]]:
    """(candidate, why it was not promoted) for every candidate but the winner."""
    winner = _winner(doc)
    out: list[tuple[str, str]] = []
    for cand in candidates(doc):
        if cand is winner:
            continue
        if not cand.get("passed"):
            out.append((label(cand), "; ".join(_reasons(cand)) or "failed the gate"))
        elif winner is not None:
            mine, theirs = metric(cand, "speedup") or 0.0, metric(winner, "speedup") or 0.0
            why = f"{label(winner)} was faster ({theirs:.2f}x vs {mine:.2f}x)"
            if math.isclose(mine, theirs):
                why = f"same speedup as {label(winner)}, but larger"
            out.append((label(cand), f"passed the gate, but {why}"))
        else:
            out.append((label(cand), "passed the gate but was not promoted"))
    return out


def _timings(doc: Doc) -> list[tuple[str, str]]:
    items = (doc.get("timings_s") or {}).items()
    return [(str(k), f"{v:.1f} s" if isinstance(v, int | float) else str(v)) for k, v in items]


def _split_uri(uri: str) -> tuple[str, str]:
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    return name, version


def _ui_path(name: str, version: object) -> str:
    """Relative link into MLflow's hash-routed UI: it resolves against whatever host serves the UI."""
    return f"#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"


# --- Markdown ------------------------------------------------------------------------------------------------------


def _md(text: object) -> str:
    """Entities rather than backslashes: MLflow's renderer and markdown-it both decode them, neither runs HTML."""
    s = html.escape(str(text), quote=False).replace("|", "\\|")
    return " ".join(s.splitlines())


def _md_link(text: str, name: str, version: object) -> str:
    label = _md(text).replace("[", "\\[").replace("]", "\\]")
    return f"[{label}]({_ui_path(name, version)})"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def markdown_report(doc: Doc) -> str:
    """The whole run for a reviewer: outcome, gate table, why the others lost, hardware, policy and timings."""
    src = doc.get("source") or {}
    lines = [f"# quantgate: {_md(src.get('name'))} version {_md(src.get('version'))}", ""]
    lines += [f"**Outcome:** {_md(_outcome_text(doc))}", ""]
    winner = _winner(doc)
    if winner is not None and winner.get("registered_uri"):
        name, version = _split_uri(str(winner["registered_uri"]))
        lines += [f"Compressed version: {_md_link(f'{name} v{version}', name, version)}", ""]
    header, body = _gate_table(doc)
    lines += ["## Gate", "", *_md_table(header, [[text for text, _ in row] for row in body]), ""]
    losers = _losers(doc)
    if losers:
        lines += ["## Why the others lost" if winner else "## Why nothing was promoted", ""]
        lines += [f"- **{_md(label)}**: {_md(why)}" for label, why in losers] + [""]
    hw = doc.get("hardware") or {}
    lines += ["## Hardware", "", _md(_hardware_text(hw)), ""]
    remote = _remote(doc)
    if remote:
        lines += ["Measured by target pool workers:", ""]
        lines += [f"- **{_md(label)}**: {_md(where)}" for label, where in remote] + [""]
    if _libraries_text(hw):
        lines += [f"Libraries: {_md(_libraries_text(hw))}", ""]
    lines += ["## Run", "", f"- policy hash: `{_md(doc.get('policy_hash'))}`", f"- flavor: {_md(doc.get('flavor'))}"]
    lines += [f"- experiment: {_md(doc.get('experiment'))}", f"- parent run: `{_md(doc.get('parent_run_id'))}`"]
    timings = _timings(doc)
    if timings:
        lines += ["", *_md_table(["step", "wall time"], timings)]
    return "\n".join(lines) + "\n"


def summary_markdown(doc: Doc, candidate: Mapping[str, Any]) -> str:
    """Description of one compressed model version: where it came from, how it was made, why it passed."""
    src = doc.get("source") or {}
    name, version = str(src.get("name")), src.get("version")
    status = "promoted winner" if candidate.get("promoted") else _verdict(candidate)
    lines = [
        f"Compressed by **quantgate** from {_md_link(f'{name} v{version}', name, version)} "
        f"with **{_md(label(candidate))}** ({_md(status)}).",
        "",
        _md(_headline(candidate)) + ".",
        "",
    ]
    checks = [
        [str(c.get("name")), "pass" if c.get("passed") else "FAIL", str(c.get("detail"))] for c in _checks(candidate)
    ]
    lines += [*_md_table(["check", "result", "detail"], checks), ""]
    lines += [f"Hardware: {_md(_measured_on(doc, candidate))}", ""]
    lines.append(f"Policy hash `{_md(doc.get('policy_hash'))}`, recipe hash `{_md(candidate.get('recipe_hash'))}`.")
    return "\n".join(lines) + "\n"


def source_description_line(doc: Doc) -> str:
    """One line for the source version's description, linking to the compressed version(s) it produced."""
    winner = _winner(doc)
    others = [c for c in candidates(doc) if c is not winner and c.get("registered_uri")]
    if winner is None:
        return f"{DESCRIPTION_PREFIX}no compressed version passed the gate ({len(candidates(doc))} candidates tried)."
    if not winner.get("registered_uri"):
        return f"{DESCRIPTION_PREFIX}{_md(label(winner))} passed the gate but was not registered."
    name, version = _split_uri(str(winner["registered_uri"]))
    s, size = metric(winner, "speedup"), metric(winner, "size_ratio")
    line = (
        f"{DESCRIPTION_PREFIX}compressed version {_md_link(f'{name} v{version}', name, version)} "
        f"({_md(label(winner))}, {_f(s, '.2f', 'x')} faster, {_f(size, '.2f')} of the size)"
    )
    if others:
        links = [_md_link(f"{n} v{v}", n, v) for n, v in (_split_uri(str(c["registered_uri"])) for c in others)]
        line += "; also registered: " + ", ".join(links)
    return line + "."


def artifact_key(doc: Doc) -> str:
    """A Prefect artifact key for this source version: Prefect allows lowercase letters, digits and dashes only."""
    src = doc.get("source") or {}
    raw = f"quantgate-{src.get('name', 'model')}-v{src.get('version', '0')}".lower()
    key = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")
    return key[:100]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#212121;max-width:70rem}
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}
th{background:#f5f5f5}.pass{background:#e8f5e9}.fail{background:#ffebee}.win{background:#c8e6c9;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}code{background:#f5f5f5;padding:0 .2rem}
"""


def _png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def html_report(doc: Doc, gate: Mapping[str, Any] | None = None, pngs: Mapping[str, bytes] | None = None) -> str:
    """One file a reviewer can open anywhere (MLflow artifact view, Prefect, a browser): no external assets.

    ``pngs``: the plots already drawn for this document ("tradeoff", "latency", "sizes"), so they are not drawn twice.
    """
    from quantgate import plots  # imported here: plots reads documents with this module's helpers

    drawn = dict(pngs or {})
    if not drawn:
        drawn = {
            "tradeoff": plots.plot_tradeoff(doc, gate),
            "latency": plots.plot_latency(doc),
            "sizes": plots.plot_sizes(doc, gate),
        }

    e = html.escape
    src = doc.get("source") or {}
    title = f"quantgate: {src.get('name')} version {src.get('version')}"
    header, body = _gate_table(doc)
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f'<td class="{cls}">{e(text)}</td>' for text, cls in row) + "</tr>" for row in body)
    losers = "".join(f"<li><b>{e(label)}</b>: {e(why)}</li>" for label, why in _losers(doc))
    hw = doc.get("hardware") or {}
    timings = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _timings(doc))
    run = [
        ("policy hash", doc.get("policy_hash")),
        ("flavor", doc.get("flavor")),
        ("experiment", doc.get("experiment")),
    ]
    run += [("parent run", doc.get("parent_run_id")), ("tracking URI", doc.get("tracking_uri"))]
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>',
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
        f'<p class="outcome">{e(_outcome_text(doc))}</p>',
        f"<h2>Gate</h2><table><tr>{head}</tr>{rows}</table>",
        f"<h2>{'Why the others lost' if _winner(doc) else 'Why nothing was promoted'}</h2><ul>{losers}</ul>"
        if losers
        else "",
        "<h2>Plots</h2>",
        _png_img(drawn["tradeoff"], "accuracy or fidelity against speedup"),
        _png_img(drawn["latency"], "latency p50 and p95 per candidate and baseline"),
        _png_img(drawn["sizes"], "size ratio per candidate"),
        f"<h2>Hardware</h2><p>{e(_hardware_text(hw))}</p>",
        f"<p>Libraries: {e(_libraries_text(hw))}</p>" if _libraries_text(hw) else "",
        "<h2>Run</h2><ul>" + "".join(f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in run) + "</ul>",
        f"<table><tr><th>step</th><th>wall time</th></tr>{timings}</table>" if timings else "",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
