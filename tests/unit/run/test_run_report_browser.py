"""`mlpe run`'s report as a person sees it: rendered by headless Chromium (Debian's, from
tests/tools/install-chromium.sh), its tables in the DOM the browser built, its plots
decoded, its screenshot not blank. Fails without a browser unless MLPE_TEST_NO_BROWSER=1."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync")
# Once the page has loaded, the title becomes what the browser made of it.
PROBE = """<script>addEventListener("load", () => { document.title = JSON.stringify({
  images: document.images.length,
  decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  tables: document.querySelectorAll("table").length,
  rows: document.querySelectorAll("tr").length,
  details: document.querySelectorAll("details:not([open])").length,
  headings: [...document.querySelectorAll("h2")].map(h => h.textContent) }); });</script>"""


def browse(chromium: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed: {done.stderr[-2000:]}"
    return done


@pytest.mark.timeout(600)  # a first run installs the browser
def test_chromium_renders_the_tables_and_decodes_the_plots(chromium, report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report[0].read_text().replace("</body>", PROBE + "</body>"))
    dom = browse(chromium, tmp_path, "--dump-dom", probe.as_uri()).stdout
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title, f"no title in the DOM Chromium dumped: {dom[:500]!r}"
    seen = json.loads(title.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["images"] == seen["decoded"] == 2, seen
    assert seen["tables"] >= 7 and seen["rows"] >= 20 and seen["details"] == 1, seen
    assert "Alerts on the fleet" in seen["headings"] and "GPUs" in seen["headings"], seen
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the advice stays text


@pytest.mark.timeout(600)
def test_chromium_screenshot_of_the_report_is_not_blank(chromium, report, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
           report[0].as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    inked = (pixels.min(axis=2) < 0.9).mean()  # share of pixels that are not near white
    assert inked > 0.05, f"only {inked:.1%} of the screenshot is drawn"
    assert len({tuple(p) for p in pixels[::20, ::20].reshape(-1, 3).round(2)}) > 50  # colour
