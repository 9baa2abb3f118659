"""The PNG plots drawn from a result document."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quantgate import plots
from tests.test_report import GATE, _image_size, sample_doc


@pytest.fixture
def doc() -> dict[str, Any]:
    return sample_doc()


def test_plots_are_pngs_of_a_useful_size(doc: dict[str, Any]) -> None:
    for png in (plots.plot_latency(doc), plots.plot_tradeoff(doc, GATE), plots.plot_sizes(doc, GATE)):
        width, height = _image_size(png)
        assert width >= 400 and height >= 250


def test_tradeoff_falls_back_to_fidelity_without_labels(doc: dict[str, Any]) -> None:
    for cand in doc["candidates"]:
        for key in ("accuracy", "accuracy_drop", "accuracy_baseline"):
            cand["all_metrics"].pop(key, None)
            cand["metrics"].pop(key, None)
    assert _image_size(plots.plot_tradeoff(doc, {"min_fidelity": 0.99, "min_speedup": 1.1}))[0] >= 400


def test_latency_plot_draws_the_logged_rounds_as_distributions(doc: dict[str, Any]) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    with_rounds = json.loads(json.dumps(doc))
    for cand in with_rounds["candidates"]:
        if cand["metrics"]:
            cand["latency_rounds_ms"] = {
                "baseline": rng.normal(1.0, 0.05, 40).tolist(),
                "candidate": rng.normal(0.4, 0.02, 40).tolist(),
            }
    assert plots._distributions(doc) == []  # summary statistics only: the bar fallback is drawn
    dists = plots._distributions(with_rounds)
    backends = {c["backend"] for c in with_rounds["candidates"] if c.get("latency_rounds_ms")}
    assert {label for label, _, _ in dists if label.endswith("/fp32")} == {f"{b}/fp32" for b in backends}
    assert len(dists) == len(backends) + sum(bool(c.get("latency_rounds_ms")) for c in with_rounds["candidates"])
    png = plots.plot_latency(with_rounds)
    assert png.startswith(b"\x89PNG") and png != plots.plot_latency(doc)
