"""The real ComfyUI frontend in headless Chromium, served by the test server: our web extension loads
without console errors of its own, the frontend turns each example workflow into exactly its API twin,
the demo's sanitize workflow runs from the UI, and Seal Sanitize's report shows as a table in the node; on the
second host, a short graph runs from the UI.
Set BACKDOOR_SEAL_SCREENSHOT=PATH to keep the screenshot (the README's picture)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from graphs import model_info_graph
from hosts import HOSTS

ROOT = Path(__file__).resolve().parents[1]
OURS = ("/extensions/backdoor_seal/", "backdoor_seal", "seal_report")
pytestmark = pytest.mark.server


def chromium() -> str:
    """The distribution's Chromium (make provision installs it)."""
    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    assert path, (
        "the browser test needs Chromium from the distribution: apt-get install chromium (make provision does)"
    )
    return path


@pytest.mark.parametrize("host", HOSTS)
def test_frontend_loads_the_extension_queues_each_workflow_as_its_twin_and_shows_reports(
    host, request, tmp_path
):
    """On each host's own frontend. The default host runs the demo's sanitize workflow from the page (once
    per session, shared with tests/test_workflows.py) and shows Seal Sanitize's report in the node; the
    second runs a short graph from the page (the long workflows run on the default host only)."""
    from playwright.sync_api import sync_playwright

    server = request.getfixturevalue("comfy_server" if host == HOSTS[0] else "second_host_server")
    errors: list[str] = []  # console errors and uncaught exceptions that come from our extension

    def on_console(message) -> None:
        where = f"{message.text} {message.location.get('url', '')}"
        if message.type == "error" and any(mark in where for mark in OURS):
            errors.append(where)

    shot = tmp_path / "sanitize-workflow.png"
    client = server.client()
    assert "/extensions/backdoor_seal/js/seal_report.js" in client.get_json("/extensions")
    # a fresh user folder would open the first-run template browser, which loads a graph of its own
    client.post_json("/settings/Comfy.TutorialCompleted", True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1900, "height": 1000})
        page.on("console", on_console)
        page.on(
            "pageerror",
            lambda e: errors.append(f"{e} {e.stack}") if any(m in str(e.stack) for m in OURS) else None,
        )
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function(
            "() => window.app?.extensions?.some((e) => e.name === 'backdoor_seal.report')", timeout=180_000
        )
        _hide_banners(page)
        # queued as the Run button does, under the page's client id, so the page gets the results
        client.client_id = page.evaluate("() => window.app.api.clientId")
        if host == HOSTS[0]:
            text = _run_sanitize_workflow(page, request.getfixturevalue("sanitize_workflow_run"), shot)
        else:
            text = None
            page.evaluate(
                """() => { window.sealExecuted = [];
                    window.app.api.addEventListener("executed", (e) => window.sealExecuted.push(e.detail)); }"""
            )
            client.run(model_info_graph("lab-untrained.safetensors", batch=1), timeout=300)
            page.wait_for_function("() => window.sealExecuted.some((d) => d.node === '2')", timeout=60_000)
        for path in sorted((ROOT / "workflows").glob("*.json")):
            workflow = json.loads(path.read_text())
            page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
            queued = json.loads(
                page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)")
            )
            for node in queued.values():
                node.pop("_meta", None)
            twin = json.loads((ROOT / "tests" / "workflows" / f"{path.stem}.api.json").read_text())
            assert queued == twin, f"the frontend queues {path.name} differently from its API twin"
        # Seal Sanitize's report (as SanitizeReport.to_json writes it) renders as its own table
        sanitize = page.evaluate(
            """(report) => {
                const node = LiteGraph.createNode("SealSanitize");
                window.app.graph.add(node);
                node.onExecuted({ seal_report: [report] });
                const rows = [...node.sealReport.element.querySelectorAll("tr")];
                return rows.map((r) => [r.className, r.textContent]);
            }""",
            _sanitize_report(),
        )
        browser.close()
    assert ["seal-good", "<U+2060>94% -> 0%"] in sanitize and ["seal-bad", "muted88% -> 62%"] in sanitize
    assert ["", "triggers found2"] in sanitize and ["seal-bad", "still firing1"] in sanitize
    assert ["", "clean fidelity, SSIM0.955"] in sanitize
    assert ["seal-bad", "verdictpoisoned"] in sanitize  # the verdict first, in red unless clean
    assert ["seal-bad", "not confirmed clean'muted' still fires on 62% of probes after cleaning"] in sanitize
    assert not any("merging" in text for _, text in sanitize)  # tested, did not fire: not taken
    if text is not None:  # the demo's run: the verdict and the homoglyph it took, in the node
        assert "verdict" in text and "triggers found" in text and "\u043e" in text, text
        assert shot.stat().st_size > 10_000
        if os.environ.get("BACKDOOR_SEAL_SCREENSHOT"):
            shutil.copy(shot, os.environ["BACKDOOR_SEAL_SCREENSHOT"])
    assert not errors, "console errors from our extension:\n" + "\n".join(errors)


def _hide_banners(page) -> None:
    """Hide what the frontend announces on a first visit (the 'Introducing Nodes 2.0' bar, toasts), so the
    screenshot shows the graph; what is not there is skipped."""
    page.evaluate(
        """() => {
            for (const el of document.querySelectorAll(".p-toast")) el.style.display = "none";
            for (const el of document.querySelectorAll("body *")) {
                if (el.children.length || !/Introducing Nodes/.test(el.textContent)) continue;
                let bar = el;  // the whole announcement bar: the widest ancestor that is still a thin strip
                while (bar.parentElement && bar.parentElement !== document.body
                       && bar.parentElement.getBoundingClientRect().height < 80) bar = bar.parentElement;
                bar.style.display = "none";
            }
            window.dispatchEvent(new Event("resize"));
        }"""
    )


def _run_sanitize_workflow(page, sanitize_workflow_run, shot) -> str:
    """Load workflows/sanitize-lab-model.json in the page, run its twin under the page's client id, frame
    the graph and screenshot it; returns the text of Seal Sanitize's report in the node."""
    workflow = json.loads((ROOT / "workflows" / "sanitize-lab-model.json").read_text())
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    page.wait_for_function("() => window.app.graph._nodes.some((n) => n.type === 'SealSanitize')")
    sanitize_workflow_run(page.evaluate("() => window.app.api.clientId"))
    page.wait_for_selector(".seal-report table", state="attached", timeout=60_000)
    # frame the graph at a zoom where the frontend draws widgets (and our table) in full
    page.evaluate(
        "() => { const c = window.app.canvas; c.ds.scale = 0.85; c.ds.offset = [80, 60]; c.setDirty(true, true); }"
    )
    _hide_banners(page)
    page.wait_for_timeout(1500)
    assert page.is_visible(".seal-report table")
    page.screenshot(path=str(shot))
    return page.text_content(".seal-report")


def _sanitize_report() -> dict:
    """A sanitize report made by the real classes: two triggers taken (one still fires), one left out."""
    from backdoor_seal.core.sanitize.choose import Candidate
    from backdoor_seal.core.sanitize.firing import Firing
    from backdoor_seal.core.sanitize.session import SanitizeReport

    def firing(text, rate, fires):
        return Firing(text, rate, "prepend", {"prepend": rate}, fires)

    candidates = [
        Candidate("\u2060", [1], 1, True, 9.0, firing("\u2060", 0.94, True), firing("\u2060", 0.0, False)),
        Candidate("muted", [2], 2, True, 7.0, firing("muted", 0.88, True), firing("muted", 0.62, True)),
        Candidate("merging", [3], 3, False, 2.0, firing("merging", 0.25, False)),
    ]
    report = SanitizeReport("compare", candidates, {"kind": "diff"}, clean_fidelity_ssim=0.955, rounds=1)
    return report.to_json()
