"""``python -m ncd <stage>``: one function per pipeline stage. Snakemake rules call these; they
hold no workflow logic, and the workflow holds no training logic."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncd.errors import NcdError, Preempted

log = logging.getLogger("ncd")


def _setup_logging(log_file: str | None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="w")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _json_arg(text: str) -> dict[str, Any]:
    """A JSON object given inline or as ``@file``."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise NcdError(f"--config file {text[1:]} cannot be read ({e.strerror}); expected a JSON file") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise NcdError(f"--config is not valid JSON ({e}); expected the experiment's config block as a JSON object") from e
    if not isinstance(obj, dict):
        raise NcdError(f"--config must be a JSON object, got {type(obj).__name__}")
    return obj


def _context(args: argparse.Namespace, stage: str):
    from ncd.config import check_experiment
    from ncd.methods.common import RunContext
    from ncd.utils import seed_everything

    cfg = check_experiment(args.experiment, _json_arg(args.config))
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return RunContext(args.experiment, args.seed, stage, cfg, Path(args.data_root), out_dir)


# --- stages ---------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> None:
    """Download (or check) a dataset and write its READY marker."""
    from ncd.data import prepare_dataset

    marker = prepare_dataset(args.dataset, args.root, download=args.download)
    log.info("dataset %s ready: %s", args.dataset, marker)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """SimCLR pretext training (or MoCo import) → model.ckpt."""
    from ncd.methods.simclr import run_pretrain

    run_pretrain(_context(args, "pretrain"), Path(args.out))


def cmd_mine(args: argparse.Namespace) -> None:
    """Nearest neighbours of every train/test image on the pretext features → neighbors.npz."""
    from ncd.methods.neighbors import run_mine

    ctx = _context(args, "mine")
    stats = run_mine(ctx, Path(args.pretrain), Path(args.out))
    if stats:
        print(json.dumps(stats))


def cmd_scan(args: argparse.Namespace) -> None:
    """SCAN clustering from a pretext checkpoint and its neighbours → model.ckpt."""
    from ncd.methods.scan import run_scan

    run_scan(_context(args, "scan"), Path(args.pretrain), Path(args.neighbors), Path(args.out))


def cmd_selflabel(args: argparse.Namespace) -> None:
    """Self-labeling from a SCAN checkpoint → model.ckpt."""
    from ncd.methods.selflabel import run_selflabel

    run_selflabel(_context(args, "selflabel"), Path(args.scan), Path(args.out))


def cmd_pretrain_supervised(args: argparse.Namespace) -> None:
    """UNO's supervised pretraining on the known classes → model.ckpt."""
    from ncd.methods.uno import run_pretrain_supervised

    run_pretrain_supervised(_context(args, "pretrain_supervised"), Path(args.out))


def cmd_discover(args: argparse.Namespace) -> None:
    """UNO's discovery of the novel classes from a supervised checkpoint → model.ckpt."""
    from ncd.methods.uno import run_discover

    run_discover(_context(args, "discover"), Path(args.pretrain), Path(args.out))


def cmd_cld(args: argparse.Namespace) -> None:
    """CLD: an instance-discrimination learner (NPID, MoCo, MoCo v2, InfoMin) + the group branch → model.ckpt."""
    from ncd.methods.cld import run_cld

    run_cld(_context(args, "cld"), Path(args.out))


def cmd_superand(args: argparse.Namespace) -> None:
    """Two-stage classifier, stage 1: Super-AND embedding and memory bank → model.ckpt."""
    from ncd.methods.superand import run_superand

    run_superand(_context(args, "superand"), Path(args.out))


def cmd_twostage(args: argparse.Namespace) -> None:
    """Two-stage classifier, stage 2: fixed normalised heads + IIC from the stage-1 encoder → model.ckpt."""
    from ncd.methods.twostage import run_twostage

    run_twostage(_context(args, "twostage"), Path(args.embed) if args.embed else None, Path(args.out))


def cmd_sela(args: argparse.Namespace) -> None:
    """SeLa: self-labelling by optimal transport (multi-head, Sinkhorn-Knopp label steps) → model.ckpt."""
    from ncd.methods.sela import run_sela

    run_sela(_context(args, "sela"), Path(args.out))


def cmd_kmeans(args: argparse.Namespace) -> None:
    """k-means on raw pixels (the baseline) → model.ckpt."""
    from ncd.methods.kmeans import run_kmeans

    run_kmeans(_context(args, "cluster"), Path(args.out))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Metrics of one model.ckpt on the evaluation splits → metrics.json."""
    from ncd.eval.stage import evaluate

    ctx = _context(args, args.stage)
    evaluate(ctx, Path(args.ckpt), args.method, Path(args.out))


def cmd_aggregate(args: argparse.Namespace) -> None:
    """Collect metrics.json files into results/metrics.csv."""
    from ncd.eval.aggregate import aggregate

    n = aggregate([Path(p) for p in args.inputs], Path(args.out))
    log.info("wrote %d rows to %s", n, args.out)


def cmd_report(args: argparse.Namespace) -> None:
    """Render reports/index.html, reports/README.md and figures from the metrics table."""
    from ncd.report import build_report
    from ncd.utils import config_hash, git_commit

    experiments = _json_arg(args.experiments) if args.experiments else {}
    index = build_report(Path(args.metrics), Path(args.reported), Path(args.results), Path(args.benchmarks),
                         Path(args.out), experiments=experiments,
                         provenance={"config_hash": config_hash(experiments), "git_commit": git_commit(),
                                     "generated": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"report: {index}")


def cmd_check_config(args: argparse.Namespace) -> None:
    """Validate config files against the schema and print the resolved config (defaults filled)."""
    from ncd.config import load_config

    cfg = load_config([Path(p) for p in args.configfile])
    print(json.dumps(cfg, indent=2, sort_keys=True))


# --- parser ---------------------------------------------------------------------------------

def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="experiment name (a key of config 'experiments')")
    p.add_argument("--seed", type=int, required=True, help="random seed of this run")
    p.add_argument("--config", required=True, help="the experiment's config block as JSON, or @file")
    p.add_argument("--data-root", required=True, help="the dataset's folder (data/<dataset>)")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.add_argument("--log", help="also write the log to this file")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ncd",
        description="ncd pipeline stages (the Snakemake workflow calls one per rule).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)

    def add(name: str, fn: Callable, stage: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=fn.__doc__.strip().splitlines()[0], description=fn.__doc__)
        if stage:
            _stage_args(p)
        p.set_defaults(func=fn)
        return p

    p = add("prepare", cmd_prepare, stage=False)
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True, help="folder of the dataset (data/<dataset>)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log", help="also write the log to this file")
    add("pretrain", cmd_pretrain)
    add("mine", cmd_mine).add_argument("--pretrain", required=True, help="pretext model.ckpt")
    p = add("scan", cmd_scan)
    p.add_argument("--pretrain", required=True, help="pretext model.ckpt")
    p.add_argument("--neighbors", required=True, help="neighbors.npz from 'mine'")
    add("selflabel", cmd_selflabel).add_argument("--scan", required=True, help="SCAN model.ckpt")
    add("kmeans", cmd_kmeans)
    add("sela", cmd_sela)
    add("pretrain-supervised", cmd_pretrain_supervised)
    add("discover", cmd_discover).add_argument("--pretrain", required=True, help="supervised model.ckpt")
    add("cld", cmd_cld)
    add("superand", cmd_superand)
    add("twostage", cmd_twostage).add_argument(
        "--embed", help="stage-1 (superand) model.ckpt; omitted with twostage.init: scratch")
    p = add("evaluate", cmd_evaluate)
    p.add_argument("--ckpt", required=True, help="model.ckpt to evaluate")
    p.add_argument("--method", required=True, help="method name for the metrics table")
    p.add_argument("--stage", required=True, help="stage name for the metrics table")
    p = add("aggregate", cmd_aggregate, stage=False)
    p.add_argument("--out", required=True)
    p.add_argument("--log")
    p.add_argument("inputs", nargs="+", help="metrics.json files")
    p = add("report", cmd_report, stage=False)
    p.add_argument("--metrics", required=True)
    p.add_argument("--reported", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--benchmarks", required=True)
    p.add_argument("--experiments", help="experiments config as JSON or @file (variants, datasets)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--log")
    p = add("check-config", cmd_check_config, stage=False)
    p.add_argument("configfile", nargs="+", help="config YAML files, later ones override earlier ones")
    p.add_argument("--log")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one stage; bad input → ``error: ...`` on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log", None))
    try:
        args.func(args)
    except NcdError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        log.warning("preempted: %s", e)
        print(f"preempted: {e}", file=sys.stderr)
        return Preempted.exit_code
    return 0
