"""Evaluation: SCAN's Hungarian protocol and head-selection loss, UNO's cluster accuracy,
weighted kNN (DESIGN.md, Contracts).

The names below are imported from their modules on first use: ``ncd.eval.aggregate`` (the aggregate job)
and ``ncd.eval.rows`` (the report) need neither torch, SciPy nor scikit-learn, and importing them must not
pay for those. The Lightning linear probe is ``ncd.eval.linear_probe.linear_probe``, imported where it is
used (it trains)."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "cluster_acc": "ncd.eval.clustering",
    "hungarian_evaluate": "ncd.eval.clustering",
    "scan_head_losses": "ncd.eval.clustering",
    "weighted_knn": "ncd.eval.knn",
    "clustering_metrics": "ncd.eval.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["cluster_acc", "clustering_metrics", "hungarian_evaluate", "scan_head_losses", "weighted_knn"]
