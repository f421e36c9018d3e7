"""Open a rendered report in headless Chromium: every image loads, every table renders, no console
error, no sideways scrolling of the page, at a desktop and at a phone width; full-page screenshots.

Used by tests/workflow/test_workflow.py on the report of a real run, and by hand after ``make run``:

    .venv/bin/python tests/report/report_browser.py reports/index.html     # → reports/screenshot-*.png

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when missing), driven through
Playwright; NCD_CHROMIUM names another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

VIEWPORTS = {"1280": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}

# what the page reports about itself once loaded
_PROBE = """() => {
  const imgs = [...document.images];
  const tables = [...document.querySelectorAll('table')];
  return {
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    tables: tables.length,
    empty_tables: tables.filter(t => t.querySelectorAll('tbody tr').length === 0 || t.getBoundingClientRect().height === 0
                                     || t.getBoundingClientRect().width === 0).map(t => t.className || '(no class)'),
    page_width: document.documentElement.scrollWidth,
    view_width: window.innerWidth,
    first_heading: (document.querySelector('h2') || {}).textContent || '',
  };
}"""


def chromium() -> str:
    """The Chromium binary: NCD_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    for name in (os.environ.get("NCD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium found: install Debian's `chromium` package (apt-get install chromium; "
                       ".ci/run does it) or set NCD_CHROMIUM to a Chromium binary")


def check_report(index: Path, shots: Path | None = None) -> dict[str, Any]:
    """Load ``index`` at each width of :data:`VIEWPORTS`; return, per width, what the page reports
    (:data:`_PROBE`), the console errors, page errors and failed requests, and the screenshot's path
    (``shots/screenshot-<width>.png``, default beside ``index``)."""
    from playwright.sync_api import sync_playwright  # a dev dependency, only for this check

    index = Path(index).resolve()
    shots = Path(shots) if shots is not None else index.parent
    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for name, viewport in VIEWPORTS.items():
                page = browser.new_page(viewport=viewport)
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}: {r.failure}"))
                page.goto(index.as_uri(), wait_until="load")
                facts = page.evaluate(_PROBE)
                shot = shots / f"screenshot-{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                out[name] = {**facts, "errors": errors, "screenshot": str(shot)}
                page.close()
        finally:
            browser.close()
    return out


if __name__ == "__main__":
    result = check_report(Path(sys.argv[1] if len(sys.argv) > 1 else "reports/index.html"))
    print(json.dumps(result, indent=2))
    bad = [n for n, r in result.items() if r["broken"] or r["empty_tables"] or r["errors"]
           or r["page_width"] > r["view_width"]]
    sys.exit(f"the report does not render cleanly at: {', '.join(bad)}" if bad else 0)
