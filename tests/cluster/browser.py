"""A page opened in a real headless Chromium (Playwright), offline: what it requested, its images
(src, natural width: 0 when one did not load) and its text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def open_in_chromium(page_path: Path) -> tuple[list[str], list[tuple[str, int]], str]:
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the dev extra: make setup"
    )
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (make setup installs it with apt-get)")
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
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])"
        )
        text = page.inner_text("body")
        browser.close()
    return requests, [tuple(i) for i in images], text
