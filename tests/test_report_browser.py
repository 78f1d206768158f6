"""The report in a real browser: headless Debian chromium (Playwright, no downloaded browser) via ``serve``.

Opens the reports index, follows the link to the version's report and then every navigation link, and
requires: no console error, no failed or 4xx/5xx request, every image decoded, no dialog (the labeller called
``<script>alert(1)</script>`` must stay text). A screenshot of every page is saved (to
``$LABELREFINERY_SCREENSHOTS`` when set, else the test's temporary folder).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tasks.report.pages import PAGES

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed at /usr/bin/chromium (CI: apt-get install -y chromium)",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_root):
    from test_report import (
        build_report_versions,
    )  # the same tiny region as the unit tests (tests/ is on the path)

    from flows.serve import make_server

    built = build_report_versions(tmp_path_factory.mktemp("browser"), demo_root, second=False)
    srv = make_server(built["root"], "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield built, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_every_page_in_headless_chromium(served, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright (the dev extra) is not installed"
    )
    built, base = served
    shots = Path(os.environ.get("LABELREFINERY_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on(
            "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} {r.failure}"))
        page.on(
            "response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None
        )
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

        page.goto(f"{base}/", wait_until="load")  # / redirects to the index across versions
        assert page.url.endswith("/reports/index.html")
        assert page.inner_text("h1") == "Reports"
        page.screenshot(path=str(shots / "reports-index.png"), full_page=True)
        vid = built["versions"][0]["dir"].name
        page.click(f'a[href="../versions/{vid}/report/index.html"]')
        page.wait_for_load_state("load")
        assert page.url.endswith(f"/versions/{vid}/report/index.html")
        for href, title in PAGES:
            page.click(f'nav a[href="{href}"]')
            page.wait_for_load_state("load")
            assert page.url.endswith(f"/report/{href}"), href
            assert page.inner_text("h1") == title
            assert page.get_attribute(f'nav a[href="{href}"]', "aria-current") == "page"
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            assert not broken, (href, broken)
            page.screenshot(path=str(shots / f"report-{href.removesuffix('.html')}.png"), full_page=True)
        assert (
            "<script>alert(1)</script>" not in page.goto(f"{base}/versions/{vid}/report/quality.html").text()
        )
        assert "<script>alert(1)</script>" in page.inner_text("main")  # shown as text, never run
        page.click(".brand a")
        page.wait_for_load_state("load")
        assert page.url.endswith("/reports/index.html")
        browser.close()
    assert not problems, problems
    assert len(list(shots.glob("report-*.png"))) == len(PAGES)
    assert all(s.stat().st_size > 5000 for s in shots.glob("*.png"))
