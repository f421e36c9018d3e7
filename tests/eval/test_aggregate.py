"""The metrics table: metrics.json rows collected into one CSV with the columns of ncd.stages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ncd.errors import NcdError
from ncd.eval.aggregate import COLUMNS, aggregate
from ncd.stages import METRICS_COLUMNS


def _row(**kw) -> dict:
    return {"experiment": "scan_c10", "method": "scan", "stage": "scan", "dataset": "cifar10", "split": "test",
            "seed": 0, "head": "best", "metric": "acc", "value": 0.8, **kw}


def test_columns_are_the_stage_tables():
    assert tuple(COLUMNS) == METRICS_COLUMNS


def test_aggregate_writes_sorted_rows(tmp_path: Path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [_row(stage="selflabel", extra="dropped"), _row(metric="nmi", value=0.7)]}))
    b.write_text(json.dumps({"rows": [_row(stage="pretext_kmeans", value=0.6)], "confusion": {}}))
    out = tmp_path / "metrics.csv"
    assert aggregate([a, b], out) == 3
    with out.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == METRICS_COLUMNS
        rows = list(reader)
    assert [(r["stage"], r["metric"], r["value"]) for r in rows] == [
        ("pretext_kmeans", "acc", "0.6"), ("scan", "nmi", "0.7"), ("selflabel", "acc", "0.8")]


def test_aggregate_row_without_a_column(tmp_path: Path):
    p = tmp_path / "m.json"
    row = _row()
    del row["head"]
    p.write_text(json.dumps({"rows": [row]}))
    with pytest.raises(NcdError, match=r"m\.json has a row without head; expected columns experiment, method, "):
        aggregate([p], tmp_path / "metrics.csv")
    assert not (tmp_path / "metrics.csv").exists()
