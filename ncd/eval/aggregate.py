"""Collect the rows of many metrics.json files into the one metrics table (results/metrics.csv)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ncd.errors import NcdError
from ncd.stages import METRICS_COLUMNS
from ncd.utils import write_text_atomic

COLUMNS = METRICS_COLUMNS  # the metrics table's columns (ncd.stages), under the name this module has used


def aggregate(inputs: list[Path], out: Path) -> int:
    """Write every row of ``inputs`` to ``out`` (CSV with :data:`COLUMNS`); return the row count."""
    rows = []
    for p in inputs:
        try:
            blob = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NcdError(f"cannot read metrics file {p}: {e}") from e
        for r in blob.get("rows", []):
            missing = [c for c in COLUMNS if c not in r]
            if missing:
                raise NcdError(f"metrics file {p} has a row without {', '.join(missing)}; "
                               f"expected columns {', '.join(COLUMNS)}")
            rows.append({c: r[c] for c in COLUMNS})
    rows.sort(key=lambda r: tuple(str(r[c]) for c in COLUMNS[:8]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out, buf.getvalue())
    return len(rows)
