"""clusterlab.cluster.report: the command's report.html in a real browser."""

from __future__ import annotations

from tests.cluster.browser import open_in_chromium
from tests.cluster.folders import KINDS


def test_the_report_opens_offline_in_a_real_browser_with_every_image(grouped):
    _, out = grouped
    requests, images, text = open_in_chromium(out / "report.html")
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
