"""The evaluate stage: one artifact in, one metrics.json (rows of the metrics table) out.

Each evaluated stage names its evaluator in the stage table (``ncd.stages``); an evaluator takes
``(ctx, blob, device)`` and returns ``(rows, confusion)`` with rows ``(split, head, metric, value)``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ncd.checkpoint import load_model
from ncd.errors import NcdError
from ncd.methods.common import RunContext, inference_device
from ncd.models.backbones import build_backbone
from ncd.stages import STAGES, load
from ncd.utils import (
    device_description,
    git_commit,
    package_versions,
    write_json_atomic,
)

log = logging.getLogger("ncd")


def backbone_summary(arch: dict[str, Any] | None) -> dict[str, Any] | None:
    """The backbone an artifact was trained with: its name and parameter count (for the report's
    table across methods); None when the artifact has no network (k-means on the pixels)."""
    if not arch or arch.get("backbone") in (None, "", "pixels"):
        return None
    net, dim = build_backbone(str(arch["backbone"]), int(arch.get("in_channels", 3)),
                              **(arch.get("backbone_kwargs") or {}))
    return {"name": str(arch["backbone"]), "kwargs": arch.get("backbone_kwargs") or {},
            "params": int(sum(p.numel() for p in net.parameters())), "feature_dim": int(dim)}


def evaluate(ctx: RunContext, ckpt: Path, out: Path) -> list[dict[str, Any]]:
    """Evaluate the artifact ``ckpt`` of stage ``ctx.stage``; write ``out`` (metrics.json)."""
    t0 = time.time()
    stage = STAGES[ctx.stage]
    if not stage.evaluate:
        raise NcdError(f"stage '{ctx.stage}' is not evaluated; expected one of: "
                       + ", ".join(s.name for s in STAGES.values() if s.evaluate))
    blob = load_model(ckpt)
    blob["path"] = str(ckpt)
    rows, confusion = load(stage.evaluate)(ctx, blob, inference_device(ctx.runtime))
    records = [{"experiment": ctx.experiment, "method": stage.method, "stage": ctx.stage, "dataset": ctx.cfg["dataset"],
                "split": s, "seed": ctx.seed, "head": h, "metric": m, "value": v} for s, h, m, v in rows]
    for r in records:
        if r["head"] == "best":
            log.info("%s %s %s seed %d %s: %s = %.4f", ctx.experiment, ctx.stage, r["split"], ctx.seed,
                     r["head"], r["metric"], r["value"])
    meta = blob["meta"]
    result = {
        "rows": records,
        "confusion": {"split": "test", **confusion} if confusion else None,
        "provenance": {
            "config_hash": meta.get("config_hash"), "git_commit": git_commit(), "packages": package_versions(),
            "device": device_description(), "wall_time_s": meta.get("wall_time_s"),
            "eval_time_s": time.time() - t0,
            "backbone": backbone_summary(blob.get("arch")),
        },
        "meta": meta,
    }
    write_json_atomic(out, result)
    return records


__all__ = ["evaluate"]
