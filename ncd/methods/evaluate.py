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
from ncd.stages import STAGES, load
from ncd.utils import (
    device_description,
    git_commit,
    package_versions,
    write_json_atomic,
)

log = logging.getLogger("ncd")


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
        },
        "meta": meta,
    }
    write_json_atomic(out, result)
    return records


__all__ = ["evaluate"]
