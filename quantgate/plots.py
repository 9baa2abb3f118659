"""PNG plots of a result document: latency (per-round box plots, or p50-p95 bars), the accuracy/fidelity against
speedup trade-off with the gate's thresholds, and sizes. Like quantgate.report, they read only the JSON-able
document, so they can be redrawn later from a logged ``result.json``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from quantgate.documents import Doc, baselines, candidates, label, metric, status

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_WIN, _PASS, _FAIL, _BASE = "#2e7d32", "#1f77b4", "#9e9e9e", "#37474f"


def _render(draw: Callable[[Axes], None], rows: int) -> bytes:
    """Figure + Agg canvas, never pyplot: no process-wide backend switch, no figure registry, safe in threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig: Figure = Figure(figsize=(8.0, max(3.0, 1.2 + 0.45 * rows)), dpi=100)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} measured for any candidate", ha="center", va="center", color=_FAIL)
    ax.set_axis_off()


def _colour(cand: Mapping[str, Any]) -> str:
    return {"win": _WIN, "pass": _PASS}.get(status(cand), _FAIL)


def _latency_rows(doc: Doc) -> Iterator[tuple[str, float, float | None, str, float | None]]:
    """(label, p50, p95, colour, backend baseline p50) grouped by backend, each backend's FP32 row first."""
    bases = baselines(doc)
    backends = dict.fromkeys(str(c.get("backend")) for c in candidates(doc))
    for backend in backends:
        base = bases.get(backend)
        base_p50 = metric(base, "baseline_latency_p50_ms") if base is not None else None
        if base is not None and base_p50 is not None:
            yield f"{backend}/fp32", base_p50, metric(base, "baseline_latency_p95_ms"), _BASE, None
        for cand in candidates(doc):
            p50 = metric(cand, "latency_p50_ms")
            if str(cand.get("backend")) == backend and p50 is not None:
                yield label(cand), p50, metric(cand, "latency_p95_ms"), _colour(cand), base_p50


def _rounds(cand: Mapping[str, Any], which: str) -> list[float] | None:
    rounds = cand.get("latency_rounds_ms")
    values = rounds.get(which) if isinstance(rounds, Mapping) else None
    return [float(v) for v in values] if isinstance(values, list) and values else None


def _distributions(doc: Doc) -> list[tuple[str, list[float], str]]:
    """Per-round latencies: each backend's FP32 (from its first measured candidate), then its candidates."""
    out: list[tuple[str, list[float], str]] = []
    for backend in dict.fromkeys(str(c.get("backend")) for c in candidates(doc)):
        mine = [c for c in candidates(doc) if str(c.get("backend")) == backend]
        base = next((r for c in mine if (r := _rounds(c, "baseline"))), None)
        if base:
            out.append((f"{backend}/fp32", base, _BASE))
        out.extend((label(c), r, _colour(c)) for c in mine if (r := _rounds(c, "candidate")))
    return out


def plot_latency(doc: Doc) -> bytes:
    """Latency per round as box plots (p50 line, p95 tick) when rounds were logged, else p50-p95 bars."""
    dists = _distributions(doc)
    rows = list(_latency_rows(doc))
    batch = next((b for c in candidates(doc) if (b := metric(c, "gate_batch_size")) is not None), None)
    title = "Latency: FP32 baselines and candidates" + (f" at batch {batch:g}" if batch else "")

    def draw_distributions(ax: Axes) -> None:
        data = [d[1] for d in dists]
        boxes = ax.boxplot(data, vert=False, whis=(5, 95), showfliers=False, patch_artist=True, widths=0.6)
        for patch, (_, _, colour) in zip(boxes["boxes"], dists, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.45)
        for y, (_, values, colour) in enumerate(dists, start=1):
            ax.plot([float(np.percentile(values, 95))], [y], marker="|", markersize=16, color=colour)
        ax.set_yticks(range(1, len(dists) + 1), [d[0] for d in dists], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel("latency per round, ms (box: p25-p75, line: p50, whiskers: p5-p95, tick: p95)")
        ax.set_title(title + f", {len(dists[0][1])} rounds each")
        ax.grid(axis="x", alpha=0.3)

    def draw(ax: Axes) -> None:
        if not rows:
            return _empty(ax, "latency")
        for y, (_, p50, p95, colour, base_p50) in enumerate(rows):
            if p95 is not None:
                ax.hlines(y, p50, p95, colors=colour, linewidth=6, alpha=0.45)
                ax.plot([p95], [y], marker="|", markersize=14, color=colour)
            ax.plot([p50], [y], marker="o", color=colour)
            if base_p50 is not None:
                ax.plot([base_p50], [y], marker="x", color=_BASE, alpha=0.6)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel("latency per batch, ms (dot: p50, bar end: p95, x: backend's FP32 p50)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        return None

    if dists:
        return _render(draw_distributions, len(dists))
    return _render(draw, len(rows))


def plot_tradeoff(doc: Doc, gate: Mapping[str, Any] | None = None) -> bytes:
    """Quality vs speed with the gate's lines: accuracy drop when labels existed, otherwise fidelity.

    ``gate`` is the policy's gate section as a dict (``policy.gate.model_dump()``); the thresholds are not in
    the document except inside the checks' prose.
    """
    gate = gate or {}
    use_acc = any(metric(c, "accuracy_drop") is not None for c in candidates(doc))
    key, scale = ("accuracy_drop", 100.0) if use_acc else ("fidelity", 1.0)
    points = [
        (c, s, y * scale)
        for c in candidates(doc)
        if (s := metric(c, "speedup")) is not None and (y := metric(c, key)) is not None
    ]

    def draw(ax: Axes) -> None:
        if not points:
            return _empty(ax, "speedup or quality")
        for cand, s, y in points:
            lo, hi = metric(cand, "speedup_ci_low"), metric(cand, "speedup_ci_high")
            if lo is not None and hi is not None:
                ax.errorbar([s], [y], xerr=[[max(s - lo, 0.0)], [max(hi - s, 0.0)]], color=_colour(cand), alpha=0.5)
            if cand.get("promoted"):
                ax.scatter([s], [y], marker="*", s=260, color=_WIN, zorder=3, label=f"winner: {label(cand)}")
            else:
                ax.scatter([s], [y], s=40, color=_colour(cand), zorder=2)
            ax.annotate(label(cand), (s, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
        ax.scatter([1.0], [0.0 if use_acc else 1.0], marker="x", color=_BASE, label="FP32 baseline")
        if gate.get("min_speedup") is not None:
            ax.axvline(float(gate["min_speedup"]), color="#c62828", linestyle="--", label="min speedup")
        if use_acc and gate.get("max_accuracy_drop") is not None:
            ax.axhline(float(gate["max_accuracy_drop"]) * 100, color="#ef6c00", linestyle="--", label="max drop")
        if not use_acc and gate.get("min_fidelity") is not None:
            ax.axhline(float(gate["min_fidelity"]), color="#ef6c00", linestyle="--", label="min fidelity")
        ax.set_xlabel("speedup vs FP32 on the same backend (bars: 95% CI)")
        ax.set_ylabel("accuracy drop, points (lower is better)" if use_acc else "fidelity, mean cosine")
        ax.set_title("Trade-off (grey: failed the gate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        return None

    return _render(draw, 6)


def plot_sizes(doc: Doc, gate: Mapping[str, Any] | None = None) -> bytes:
    """Size relative to FP32 per candidate; the winner in green, failed ones grey."""
    bars = [(c, r) for c in candidates(doc) if (r := metric(c, "size_ratio")) is not None]
    limit = (gate or {}).get("max_size_ratio")

    def draw(ax: Axes) -> None:
        if not bars:
            return _empty(ax, "size")
        ys = range(len(bars))
        ax.barh(ys, [r for _, r in bars], color=[_colour(c) for c, _ in bars])
        for y, (_, r) in zip(ys, bars, strict=True):
            ax.text(r, y, f" {r:.2f}", va="center", fontsize=8)
        ax.axvline(1.0, color=_BASE, linestyle=":", label="FP32")
        if limit is not None:
            ax.axvline(float(limit), color="#c62828", linestyle="--", label="max size ratio")
        ax.set_xlim(0, max(1.1, 1.15 * max(r for _, r in bars), 1.05 * float(limit or 0)))
        ax.set_yticks(ys, [label(c) for c, _ in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("size ratio (compressed / FP32)")
        ax.set_title("Model size")
        ax.legend(fontsize=7, loc="lower right")
        return None

    return _render(draw, len(bars))


# --- HTML ----------------------------------------------------------------------------------------------------------
