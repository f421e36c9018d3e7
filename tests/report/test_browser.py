"""The browser check itself is real: it sees a broken image, an empty table, a console error and a
page wider than the screen (tests/workflow/test_workflow.py runs it on the report of a real run)."""

from __future__ import annotations

from pathlib import Path

from report_browser import VIEWPORTS, check_report


def test_the_browser_check_sees_what_is_wrong(tmp_path: Path):
    page = tmp_path / "index.html"
    page.write_text("""<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<h2>first</h2><img src="missing.png" alt="gone">
<table class="empty"><thead><tr><th>a</th></tr></thead><tbody></tbody></table>
<table class="full"><tbody><tr><td>1</td></tr></tbody></table>
<div style="width: 2000px">wide</div>
<script>console.error("boom")</script></body></html>""")
    result = check_report(page)
    assert set(result) == set(VIEWPORTS)
    for name, r in result.items():
        assert r["images"] == 1 and r["broken"] == ["missing.png"], r
        assert r["tables"] == 2 and r["empty_tables"] == ["empty"], r
        assert "boom" in r["errors"] and any("missing.png" in e for e in r["errors"]), r
        assert r["page_width"] >= 2000 > r["view_width"] == VIEWPORTS[name]["width"], r
        assert r["first_heading"] == "first"
        assert Path(r["screenshot"]).read_bytes().startswith(b"\x89PNG")
