"""Rows of the metrics table from per-head results (every evaluator's shared last step)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Row = tuple[str, str, str, float]   # (split, head, metric, value)

# A metric chosen as the best over training epochs by its value on the test split (what the
# official SeLa CIFAR, CLD CIFAR and MoCo linear-probe loops report) carries this suffix, beside the
# final model's value under the plain name; the report shows both, each labelled.
SELECTED_ON_TEST = "_selected_on_test"


def selected_on_test(metric: str) -> str:
    """The name of ``metric``'s best-over-epochs value (selected on the test split)."""
    return metric + SELECTED_ON_TEST


def base_metric(metric: str) -> str:
    """``metric`` without the :data:`SELECTED_ON_TEST` suffix."""
    return metric[: -len(SELECTED_ON_TEST)] if metric.endswith(SELECTED_ON_TEST) else metric


def head_rows(split: str, results: Sequence[Mapping[str, Any]], metrics: Iterable[str], best: int,
              avg: bool = False) -> list[Row]:
    """One row per head and metric, the same values again under head ``best`` (the head the
    method's own rule selects), and with ``avg`` their mean over heads."""
    metrics = tuple(metrics)
    rows = [(split, str(h), m, float(res[m])) for h, res in enumerate(results) for m in metrics]
    if 0 <= best < len(results):
        rows += [(split, "best", m, float(results[best][m])) for m in metrics]
    if avg:
        rows += [(split, "avg", m, float(np.mean([float(r[m]) for r in results]))) for m in metrics]
    return rows


def confusion_of(result: Mapping[str, Any], head: int | str, **extra: Any) -> dict[str, Any]:
    """The confusion block of metrics.json from a :func:`ncd.eval.hungarian_evaluate` result."""
    return {**extra, "head": head, "matrix": np.asarray(result["confusion"]).tolist()}


__all__ = ["Row", "SELECTED_ON_TEST", "base_metric", "confusion_of", "head_rows", "selected_on_test"]
