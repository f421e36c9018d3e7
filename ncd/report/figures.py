"""The report's figures: a confusion matrix and the training losses of every (experiment, stage).

Figures are made in memory (PNG bytes) and written only by :func:`write_figures`, once the whole
report has been computed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ncd.errors import NcdError
from ncd.utils import atomic_path

FIGURES = "figures"  # the folder under the report's output folder
_PREFIXES = ("confusion_", "loss_")  # the figures this module owns there


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no pyplot global state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def confusion_figure(confusion: dict, title: str) -> bytes:
    """PNG of a confusion matrix (rows true, columns predicted) with counts where readable."""
    m = np.asarray(confusion["matrix"], dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise NcdError(f"{title}: confusion matrix must be a non-empty 2-D list, got shape {m.shape}")
    classes = [str(c) for c in (confusion.get("classes") or [])]
    size = min(12.0, 2.5 + 0.45 * max(m.shape))
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if max(m.shape) <= 20:  # beyond that the numbers are unreadable
        thresh = m.max() / 2 if m.max() > 0 else 0.5
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > thresh else "black")
        if len(classes) == m.shape[0]:
            ax.set_yticks(range(m.shape[0]), classes)
        if len(classes) == m.shape[1]:
            ax.set_xticks(range(m.shape[1]), classes, rotation=45, ha="right")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    split, head = confusion.get("split", "?"), confusion.get("head", "?")
    ax.set_title(f"{title} ({split} split, head {head})")
    return _png(fig)


def loss_columns(history: pd.DataFrame) -> list[str]:
    """The numeric loss columns of a history table (names containing 'loss')."""
    return [c for c in history.columns if "loss" in c.lower() and pd.api.types.is_numeric_dtype(history[c])]


def loss_figure(histories: dict[int, pd.DataFrame], title: str) -> bytes | None:
    """PNG of every seed's loss columns against epoch (colour = column, line style = seed)."""
    cols = sorted({c for h in histories.values() for c in loss_columns(h)})
    if not cols:
        return None
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for si, (seed, h) in enumerate(sorted(histories.items())):
        x = h["epoch"] if "epoch" in h.columns else pd.Series(range(len(h)), index=h.index)
        for ci, c in enumerate(cols):
            if c not in h.columns:
                continue
            ok = h[c].notna()  # loggers write train and val rows separately
            ax.plot(x[ok], h[c][ok], color=f"C{ci % 10}", linestyle=styles[si % len(styles)],
                    marker="." if ok.sum() < 3 else None, label=f"{c} (seed {seed})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(cols) * len(histories) > 8 else 1)
    return _png(fig)


def _stage_figures(exp: str, stage: str, group: list[dict], figures: dict[str, bytes]) -> dict[str, Any]:
    """The figures of one (experiment, stage) into ``figures``; its entry for the report's figure list."""
    entry: dict[str, Any] = {"experiment": exp, "stage": stage, "confusion": None, "loss": None}
    first = next((r for r in group if (r["metrics"] or {}).get("confusion")), None)
    if first is not None:  # the first seed that has one
        rel = f"{FIGURES}/confusion_{_safe(exp)}_{_safe(stage)}.png"
        figures[rel] = confusion_figure(first["metrics"]["confusion"], f"{exp} / {stage}, seed {first['seed']}")
        entry["confusion"] = rel
    histories = {r["seed"]: r["history"] for r in group if r["history"] is not None}
    if histories:
        png = loss_figure(histories, f"{exp} / {stage}: training losses")
        if png is not None:
            rel = f"{FIGURES}/loss_{_safe(exp)}_{_safe(stage)}.png"
            figures[rel] = png
            entry["loss"] = rel
    return entry


def build_figures(runs: list[dict]) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Figures of the runs (each with ``metrics`` and ``history`` read), per (experiment, stage).

    Returns relative path → PNG, and the list of (experiment, stage) entries that have a figure,
    in the order of ``runs``.
    """
    figures: dict[str, bytes] = {}
    groups: list[dict[str, Any]] = []
    for exp, stage in dict.fromkeys((r["experiment"], r["stage"]) for r in runs):
        group = [r for r in runs if (r["experiment"], r["stage"]) == (exp, stage)]
        entry = _stage_figures(exp, stage, group, figures)
        if entry["confusion"] or entry["loss"]:
            groups.append(entry)
    return figures, groups


def write_figures(out_dir: Path, figures: dict[str, bytes]) -> None:
    """Write ``figures`` under ``out_dir`` (each atomically) and remove this module's figures that are
    no longer made (those of experiments that are gone would otherwise linger beside the new report)."""
    out_dir = Path(out_dir)
    (out_dir / FIGURES).mkdir(parents=True, exist_ok=True)  # the workflow declares the folder, even empty
    for rel, png in figures.items():
        with atomic_path(out_dir / rel) as tmp:
            tmp.write_bytes(png)
    folder = out_dir / FIGURES
    for old in folder.glob("*.png") if folder.is_dir() else []:
        if f"{FIGURES}/{old.name}" not in figures and old.name.startswith(_PREFIXES):
            old.unlink()
