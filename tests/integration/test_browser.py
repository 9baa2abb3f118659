"""In a real browser: what a reviewer sees in the MLflow UI after `quantgate compress` ran against a tracking server.

Debian's `chromium`, driven by Playwright (a browser is never downloaded), opens the compressed version's page and
the parent run's artifacts. Screenshots go to ``test-artifacts/browser/`` under the repository root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.conftest import register_onnx, test_policy

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
TIMEOUT_MS = 30_000
# MLflow 3.x opens its "MLflow Assistant" side panel on a profile's first visit; a fresh profile would get it on every
# page and it hides a quarter of each screenshot. Mark it as seen and closed (keys of the UI's localStorage).
_QUIET_ASSISTANT = """
try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}
"""


def _skip_reason() -> str | None:
    if CHROMIUM is None:
        return (
            "`chromium` is not on PATH (Debian package `chromium`; `make browser` installs it as root when apt-get "
            "can), so the MLflow UI cannot be checked in a browser"
        )
    if importlib.util.find_spec("playwright") is None:
        return "the `playwright` Python package is not installed (pip install -e '.[dev]')"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


class _Shots:
    """Numbered screenshots of what the reviewer sees, kept as test artifacts."""

    def __init__(self) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("*.png"):
            old.unlink()
        self.count = 0
        self.paths: list[Path] = []

    def take(self, page: Page, name: str) -> Path:
        self.count += 1
        path = SHOTS / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.paths.append(path)
        print(f"screenshot: {path}")
        return path


def _visible(locator: Locator) -> None:
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=TIMEOUT_MS)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _compress(url: str, source: str, policy: Path, qg_home: Path, cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["QUANTGATE_HOME"] = str(qg_home)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("quantgate")), "compress", source, "--policy", str(policy),
         "--tracking-uri", url, "--json"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.fixture()
def browser_page(tmp_path: Path) -> Iterator[Page]:
    """Headless Debian chromium with a fresh profile; nothing is downloaded, the network is not used."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            context.set_default_navigation_timeout(TIMEOUT_MS)
            context.add_init_script(_QUIET_ASSISTANT)
            yield context.new_page()
        finally:
            context.close()


def test_the_mlflow_ui_shows_the_summary_the_comparison_table_and_the_plots(
    mlflow_server: str, digits_onnx: Path, calib_npz: Path, eval_npz: Path, tmp_path: Path, qg_home: Path,
    monkeypatch: pytest.MonkeyPatch, browser_page: Page,
) -> None:  # fmt: skip
    import mlflow
    from mlflow import MlflowClient

    url = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        source_uri = register_onnx(url, digits_onnx, "digits-browser")
        policy = tmp_path / "policy.yaml"
        # A lenient gate: both recipes register and one is promoted; the browser, not the gate, is under test.
        lenient = {"min_speedup": 0.01, "max_accuracy_drop": 0.05}
        policy.write_text(yaml.safe_dump(test_policy(calib_npz, eval_npz, gate=lenient)))
        doc = _compress(url, source_uri, policy, qg_home, tmp_path)
        client = MlflowClient(url)
        exp_id = client.get_run(doc["parent_run_id"]).info.experiment_id
        plots = {
            name: _png_size(Path(client.download_artifacts(doc["parent_run_id"], f"plots/{name}", str(tmp_path))))
            for name in ("tradeoff.png", "latency.png")
        }
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)

    assert doc["promoted_uri"], [c["reasons"] for c in doc["candidates"]]
    name, _, version = doc["promoted_uri"].removeprefix("models:/").rpartition("/")
    src_name, _, src_version = source_uri.removeprefix("models:/").rpartition("/")
    winner = next(c for c in doc["candidates"] if c["promoted"])
    label = f"{winner['backend']}/{winner['recipe']}"
    run_id = doc["parent_run_id"]

    page = browser_page
    shots = _Shots()
    started = time.monotonic()
    try:
        # 1. The compressed version: its description is quantgate's summary, rendered from Markdown.
        page.goto(f"{url}/#/models/{name}/versions/{version}")
        summary = page.locator("p", has_text="Compressed by")
        _visible(summary)
        assert "quantgate" in summary.inner_text()
        _visible(summary.locator("strong", has_text=label))
        _visible(summary.get_by_text("promoted winner"))
        description = summary.locator("xpath=..")  # the rendered Markdown: the summary, then the checks table
        _visible(description.get_by_role("cell", name="accuracy", exact=True))
        link = summary.get_by_role("link", name=f"{src_name} v{src_version}", exact=True)
        _visible(link)
        assert link.get_attribute("href") == f"#/models/{src_name}/versions/{src_version}"
        source_page_url = f"{url}/#/models/{src_name}/versions/{src_version}"
        assert link.evaluate("a => a.href") == source_page_url
        shots.take(page, "compressed-version")

        # ... and its link leads to the source version, whose description links back.
        if link.get_attribute("target") == "_blank":  # MLflow's Markdown renderer opens links in a new tab
            with page.context.expect_page(timeout=TIMEOUT_MS) as opened:
                link.click()
            source_page = opened.value
        else:
            link.click()
            source_page = page
        source_page.wait_for_url(source_page_url)
        line = source_page.locator("p", has_text="quantgate: compressed version")
        _visible(line)
        back = line.get_by_role("link", name=f"{name} v{version}", exact=True)
        _visible(back)
        assert back.get_attribute("href") == f"#/models/{name}/versions/{version}"
        shots.take(source_page, "source-version")
        if source_page is not page:
            source_page.close()

        # 2. The parent run, then its Artifacts tab, as a reviewer clicks through.
        page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}")
        _visible(page.get_by_text(f"compress {src_name} v{src_version}", exact=True).first)
        page.get_by_role("tab", name="Artifacts").click()
        page.wait_for_url(f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts")
        for entry in ("plots", "comparison_table.json", "report.html", "report.md", "result.json"):
            _visible(page.get_by_text(entry, exact=True))
        shots.take(page, "run-artifacts")

        # The comparison table: MLflow renders a log_table artifact as a table ("View as table").
        page.get_by_text("comparison_table.json", exact=True).click()
        _visible(page.get_by_role("checkbox", name="View as table"))
        assert page.get_by_role("checkbox", name="View as table").is_checked()
        table = page.get_by_role("table")
        _visible(table)
        for column in ("backend", "recipe", "verdict", "speedup", "size_ratio", "accuracy_drop"):
            # A header cell holds a sort button named after the column, and a "Resize Column" button.
            _visible(table.get_by_role("columnheader").get_by_role("button", name=column, exact=True))
        for recipe in ("fp32-baseline", "int8-static-qdq-minmax-perchannel", "int8-dynamic"):
            _visible(table.get_by_role("cell", name=recipe, exact=True))
        _visible(table.get_by_role("cell", name="PROMOTED", exact=True))
        assert table.get_by_role("row").count() == 1 + 1 + len(doc["candidates"])  # header, baseline, candidates
        shots.take(page, "comparison-table")

        # The plots: the images load, at the size they were logged at.
        page.get_by_text("plots", exact=True).click()
        for plot, size in plots.items():
            page.get_by_text(plot, exact=True).click()
            _visible(page.get_by_text(f"plots/{plot}", exact=True))
            img = page.get_by_role("img", name=f"plots/{plot}", exact=True)
            _visible(img)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=img.element_handle(), timeout=TIMEOUT_MS
            )
            assert tuple(img.evaluate("img => [img.naturalWidth, img.naturalHeight]")) == size
            assert img.evaluate("img => img.getBoundingClientRect().width") > 100
            shots.take(page, f"plot-{plot.removesuffix('.png')}")

        # The HTML report, in MLflow's sandboxed viewer.
        page.get_by_text("report.html", exact=True).click()
        report = page.frame_locator("iframe").first
        _visible(report.get_by_role("heading", name=f"quantgate: {src_name} version {src_version}"))
        _visible(report.get_by_text("PROMOTED", exact=True).first)
        shots.take(page, "report-html")
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            print(f"screenshot of the failing page: {SHOTS / 'failure.png'}")
        raise
    print(f"browser checks took {time.monotonic() - started:.1f}s")
    assert all(p.stat().st_size > 10_000 for p in shots.paths), shots.paths
