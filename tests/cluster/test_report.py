"""clusterlab.cluster.report: the command's report.html in a real browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cluster.folders import KINDS


def test_the_report_opens_offline_in_a_real_browser_with_every_image(grouped):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the dev extra: make setup"
    )
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (make setup installs it with apt-get)")
    _, out = grouped
    page_path = out / "report.html"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium",
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])"
        )
        text = page.inner_text("body")
        browser.close()
    assert requests and all(url.startswith("file://") for url in requests), [
        u for u in requests if "file:" not in u
    ]
    assert len(images) > 4 * 2  # figures and thumbnails
    for src, width in images:
        assert not src.startswith(("/", "http")) and (out / src).is_file(), src
        assert width > 0, f"{src} did not load"
    for k in range(len(KINDS)):
        assert f"cluster {k}" in text
    assert "ACC" in text and "most confident" in text and "least confident" in text
