"""The report in a real browser: headless Chromium opens results/report.html with the network
cut off, and every table and image must be there and every image must decode.

Needs Chromium (Debian package ``chromium``). Without it the test is skipped, unless the
environment variable CI is set: then it fails. ``DPTQ_REPORT_HTML=path/to/report.html``
checks that report (e.g. a smoke run's) instead of a synthetic one.
"""
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from test_report import build_report

TABLES = {"reference", "table1", "table1-summary", "table1-tidy", "table2", "table3", "remedy", "versions"}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # Any request off this machine fails: a report that needs one shows it as an undecoded image.
         "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Dom(HTMLParser):
    """Table ids, image sources, figure count and the body's data-* attributes of a dumped DOM."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.figures, self.body = [], [], 0, {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "figure":
            self.figures += 1
        elif tag == "body":
            self.body = attrs


def check_report_in_chromium(html_path, screenshot_path, timeout: float = 120) -> dict:
    """Open ``html_path`` in headless Chromium: a screenshot (1400 px wide) and the DOM after load.

    Returns ``tables`` (their ids, in page order), ``images`` (number of <img>), ``figures``
    (number of <figure>), ``rendered`` (images with a decoded bitmap, counted by the page's own
    script on the load event; -1 if the script did not run), ``external`` (image sources that
    are not data URIs) and ``screenshot`` (its path).
    """
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH; install the Debian package 'chromium'")
    url = Path(html_path).resolve().as_uri()
    screenshot_path = Path(screenshot_path).resolve()
    with tempfile.TemporaryDirectory() as profile:
        common = [exe, *FLAGS, f"--user-data-dir={profile}"]
        subprocess.run([*common, f"--screenshot={screenshot_path}", "--window-size=1400,4000", url],
                       check=True, capture_output=True, timeout=timeout)
        # The virtual time budget lets the load event (and the counting script) run before the dump.
        dom = subprocess.run([*common, "--dump-dom", "--virtual-time-budget=10000", url],
                             check=True, capture_output=True, text=True, timeout=timeout).stdout
    page = Dom(dom)
    return {"tables": page.tables, "images": len(page.images), "figures": page.figures,
            "rendered": int(page.body.get("data-rendered", -1)),
            "external": [s[:80] for s in page.images if not s.startswith("data:image/png;base64,")],
            "screenshot": screenshot_path}


@pytest.fixture
def report_html(tmp_path):
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI is not set")
    if os.environ.get("DPTQ_REPORT_HTML"):
        return Path(os.environ["DPTQ_REPORT_HTML"])
    return build_report(tmp_path, layers={"resnet18": 8}, histogram_archs=["resnet18"])["html"]  # small: fast


def test_report_renders_offline_in_chromium(report_html, tmp_path):
    result = check_report_in_chromium(report_html, tmp_path / "report.png")
    assert TABLES <= set(result["tables"]), result["tables"]
    assert result["images"] == result["figures"] > 0
    assert result["rendered"] == result["images"], "some figures did not decode"
    assert result["external"] == []
    assert result["screenshot"].stat().st_size > 50_000  # a blank page is a few kB
