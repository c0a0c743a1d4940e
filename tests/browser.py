"""Headless Chromium for the tests: open a page as a user would, measure it, take a screenshot.

Only the Debian ``chromium`` package is needed (``.ci/run`` installs it when missing): the page
is loaded with a small measuring script appended to a copy of it, and ``--dump-dom`` prints what
the script found once the page (and every image) has loaded. The machine has no network: the
flags turn off everything that would reach out.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]

#: Appended to a copy of the page: after `load`, what a reader would see, as JSON in a <pre>.
_PROBE = """
<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, complete: i.complete}));
  const result = {images, scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
                  sections: [...document.querySelectorAll('section[id]')].map(s => s.id),
                  section_text: Object.fromEntries([...document.querySelectorAll('section[id]')]
                                                    .map(s => [s.id, s.innerText])),
                  section_rows: Object.fromEntries([...document.querySelectorAll('section[id]')]
                                                    .map(s => [s.id, s.querySelectorAll('tbody tr').length])),
                  text: document.body.innerText};
  const pre = document.createElement('pre'); pre.id = 'bonemet-probe';
  pre.textContent = JSON.stringify(result); document.body.appendChild(pre);
});
</script>
"""


def chromium_binary() -> str:
    """The Chromium executable; the test is skipped when there is none (CI installs it: .ci/run)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run does it as root)")


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="bonemet-chromium-") as profile:
        proc = subprocess.run([chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def measure_page(html: Path, *, width: int = 1400, height: int = 900, timeout: float = 120) -> dict:
    """Open ``html`` (a copy with the probe appended) at ``width`` px and return what the probe saw:
    images (alt, naturalWidth), scrollWidth, innerWidth, section ids, each section's visible text
    (``section_text``) and table rows (``section_rows``), and the page's visible text."""
    with tempfile.TemporaryDirectory(prefix="bonemet-page-") as tmp:
        probe = Path(tmp) / "page.html"
        text = html.read_text(encoding="utf-8")
        probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        dom = _run([f"--window-size={width},{height}", "--virtual-time-budget=10000", "--dump-dom",
                    probe.as_uri()], timeout)
    found = re.search(r'<pre id="bonemet-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not finish loading in Chromium: {dom[-500:]}"
    import html as html_lib

    return json.loads(html_lib.unescape(found.group(1)))


def screenshot(url: str, path: Path, *, width: int, height: int, wait_ms: int = 10000, timeout: float = 120) -> Path:
    """A PNG of ``url`` (a file URI or a loopback address) at ``width`` x ``height``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url], timeout)
    assert path.is_file() and path.stat().st_size > 1000, f"no screenshot written to {path}"
    return path


#: The report's sections, in the study's order.
SECTION_IDS = ["summary", "cohort", "examples", "segmentation", "radiomics", "classifiers", "registry", "replication",
               "provenance"]
#: Markdown a reader must never see as literal characters: bold, table rules, headings, code, links.
MARKDOWN = [re.compile(p, re.M) for p in (r"\*\*\w", r"^\s*\|?\s*-{3,}\s*\|", r"^#{1,6} ", r"`[^`\n]+`",
                                          r"\[[^\]\n]+\]\([^)\n]+\)")]


def check_report_in_browser(page: Path, out_dir: Path, sections: list[str] = SECTION_IDS) -> dict:
    """Open the report in headless Chromium at 1400 px: every image decoded, every section there in
    order, no literal Markdown, no horizontal scrolling; a screenshot of its top in ``out_dir``."""
    seen = measure_page(page, width=1400)
    assert seen["images"], "the report shows no image"
    broken = [i["alt"] for i in seen["images"] if not i["w"]]
    assert not broken, f"images that did not decode: {broken}"
    assert [s for s in seen["sections"] if s in sections] == sections, seen["sections"]
    for pattern in MARKDOWN:
        found = pattern.search(seen["text"])
        assert found is None, f"literal Markdown in the page: {found.group(0)!r}"
    assert seen["scrollWidth"] <= seen["innerWidth"], f"page {seen['scrollWidth']} px wide in a 1400 px window"
    shot = screenshot(page.as_uri(), out_dir / f"{page.stem}.png", width=1400, height=1800)
    print(f"report screenshot: {shot}")
    return seen
