"""Reading a result document (``CompressionResult.to_document()``): the helpers report and plots share.

Its own module so that ``report`` (which embeds the plots) and ``plots`` (which reads documents) do not import each
other. Reads only the JSON-able document: no MLflow, no Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Doc = Mapping[str, Any]


def metric(cand: Mapping[str, Any], key: str) -> float | None:
    """A finite number or None: NaN/inf would break the JSON that Prefect artifacts are stored as."""
    for source in (cand.get("all_metrics") or {}, cand.get("metrics") or {}):
        value = source.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def candidates(doc: Doc) -> list[Mapping[str, Any]]:
    return list(doc.get("candidates") or [])


def label(cand: Mapping[str, Any]) -> str:
    return f"{cand.get('backend', '?')}/{cand.get('recipe', '?')}"


def _verdict(cand: Mapping[str, Any]) -> str:
    if cand.get("promoted"):
        return "PROMOTED"
    return "passed" if cand.get("passed") else "skipped" if cand.get("status") == "skipped" else "failed"


def status(cand: Mapping[str, Any]) -> str:
    if cand.get("promoted"):
        return "win"
    return "pass" if cand.get("passed") else "skip" if cand.get("status") == "skipped" else "fail"


def _winner(doc: Doc) -> Mapping[str, Any] | None:
    return next((c for c in candidates(doc) if c.get("promoted")), None)


def _checks(cand: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(cand.get("checks") or [])


def _check_names(doc: Doc) -> list[str]:
    names: dict[str, None] = {}
    for cand in candidates(doc):
        names.update((str(ch.get("name")), None) for ch in _checks(cand))
    return list(names)


def _reasons(cand: Mapping[str, Any]) -> list[str]:
    reasons = [str(r) for r in cand.get("reasons") or []]
    return reasons or [str(ch.get("detail", "")) for ch in _checks(cand) if not ch.get("passed")]


def _check_result(cand: Mapping[str, Any], name: str) -> str:
    """'pass', 'FAIL' or '' (not applied); a candidate with metrics evidently built, so its build check passed."""
    for ch in _checks(cand):
        if ch.get("name") == name:
            return "pass" if ch.get("passed") else "FAIL"
    if name == "build" and (cand.get("all_metrics") or cand.get("metrics")):
        return "pass"
    return ""


def baselines(doc: Doc) -> dict[str, Mapping[str, Any]]:
    """The first measured candidate per backend: its baseline_* metrics describe that backend's FP32 run."""
    out: dict[str, Mapping[str, Any]] = {}
    for cand in candidates(doc):
        if metric(cand, "baseline_latency_p50_ms") is not None:
            out.setdefault(str(cand.get("backend")), cand)
    return out
