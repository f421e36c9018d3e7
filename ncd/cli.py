"""``python -m ncd <stage>``: one sub-command per entry of the stage table (:mod:`ncd.stages`), plus
prepare, evaluate, aggregate, report and check-config. Snakemake rules call these; they hold no
workflow logic, and the workflow holds no training logic."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncd.errors import NcdError, Preempted
from ncd.stages import STAGES, load
from ncd.utils import config_hash, git_commit, keep_freed_memory, run_lock, seed_everything

if TYPE_CHECKING:
    from ncd.methods.common import RunContext

# Each command imports what it needs when it runs (torch, Lightning, the report's plotting): every
# workflow job is one process, and `prepare` or `aggregate` need not pay seconds for training imports.

log = logging.getLogger("ncd")


def _process_rank() -> int:
    """This process's rank in a multi-device run, from the variables Lightning's launcher or SLURM's
    srun set (the keys Lightning reads, in its order); 0 for a single process."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _setup_logging(log_file: str | None) -> None:
    rank = _process_rank()
    where = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s: {where}%(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        # the other ranks of a DDP run log beside the rule's log: opening it too would truncate it
        fh = logging.FileHandler(log_file if rank == 0 else f"{log_file}.rank{rank}", mode="w")
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


def _context(args: argparse.Namespace, stage: str, evaluate: bool = False) -> RunContext:
    """The run context of a stage command: its checked config slice, output folder, seed, threads."""
    import torch

    from ncd.config import check_stage_config
    from ncd.methods.common import RunContext

    cfg = check_stage_config(args.experiment, stage, _json_arg(args.config), evaluate=evaluate)
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return RunContext(args.experiment, args.seed, stage, cfg, Path(args.data_root), out_dir)


# --- stages ---------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> None:
    """Download (or check) a dataset and write its READY marker."""
    from ncd.data import prepare_dataset

    marker = prepare_dataset(args.dataset, args.root, download=args.download, marker=args.marker)
    log.info("dataset %s ready: %s", args.dataset, marker)


def _locked(args: argparse.Namespace, what: str) -> contextlib.AbstractContextManager:
    """The output folder's run lock (:func:`ncd.utils.run_lock`), taken by rank 0 only: the other
    ranks of a multi-device run are the same run."""
    if _process_rank():
        return contextlib.nullcontext()
    return run_lock(Path(args.out).parent, what)


def check_artifact(path: Path) -> None:
    """Read an upstream artifact once before the stage starts, so a truncated or foreign file is one
    clear error naming it (not a BadZipFile or a torch traceback minutes into the stage). A missing
    file is left to the stage, whose message says what it expected there."""
    if not path.is_file():
        return
    from ncd.checkpoint import load_model

    if path.suffix == ".npz":
        from ncd.methods.neighbors import load_neighbors

        load_neighbors(path)
    elif path.suffix == ".ckpt":
        load_model(path)


def cmd_stage(args: argparse.Namespace) -> None:
    """Run one stage of the stage table: ``fn(ctx, *upstream artifacts, out)``."""
    stage = STAGES[args.stage_name]
    with _locked(args, f"stage '{stage.name}' of experiment '{args.experiment}' seed {args.seed}"):
        ctx = _context(args, stage.name)
        inputs = [Path(v) if v else None for v in (getattr(args, name) for name in stage.inputs)]
        missing = [n for n, v in zip(stage.inputs, inputs) if v is None and n in stage.inputs_for(ctx.cfg)]
        if missing:
            raise NcdError(f"stage '{stage.name}' needs --{missing[0].replace('_', '-')} (the "
                           f"{stage.inputs[missing[0]]} stage's artifact)")
        for path in inputs:
            if path is not None:
                check_artifact(path)
        stats = load(stage.run)(ctx, *inputs, Path(args.out))
    if stats:
        print(json.dumps(stats))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Metrics of one stage's artifact on the evaluation splits → metrics.json."""
    from ncd.methods.evaluate import evaluate

    if args.stage not in STAGES or not STAGES[args.stage].evaluate:
        raise NcdError(f"--stage {args.stage!r} is not an evaluated stage; expected one of: "
                       + ", ".join(s.name for s in STAGES.values() if s.evaluate))
    with _locked(args, f"evaluation of stage '{args.stage}' of experiment '{args.experiment}' seed {args.seed}"):
        evaluate(_context(args, args.stage, evaluate=True), Path(args.ckpt), Path(args.out))


def cmd_aggregate(args: argparse.Namespace) -> None:
    """Collect metrics.json files into results/metrics.csv."""
    from ncd.eval.aggregate import aggregate

    n = aggregate([Path(p) for p in args.inputs], Path(args.out))
    log.info("wrote %d rows to %s", n, args.out)


def cmd_report(args: argparse.Namespace) -> None:
    """Render reports/index.html, reports/README.md and figures from the metrics table."""
    from ncd.report import build_report

    experiments = _json_arg(args.experiments) if args.experiments else {}
    index = build_report(Path(args.metrics), Path(args.reported), Path(args.results), Path(args.benchmarks),
                         Path(args.out), experiments=experiments,
                         provenance={"config_hash": config_hash(experiments), "git_commit": git_commit(),
                                     "generated": time.strftime("%Y-%m-%d %H:%M:%S")},
                         protocols=Path(args.protocols) if args.protocols else None)
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
    p.add_argument("--marker", help="where to write the READY marker (default: <root>/READY)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log", help="also write the log to this file")
    for st in STAGES.values():
        p = sub.add_parser(st.cli, help=st.doc, description=f"{st.doc} (method {st.method}) → {st.output}",
                           aliases=[st.cli.replace("_", "-")] if "_" in st.cli else [])
        _stage_args(p)
        for name, upstream in st.inputs.items():
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"the {upstream} stage's {STAGES[upstream].output}")
        p.set_defaults(func=cmd_stage, stage_name=st.name)
    p = add("evaluate", cmd_evaluate)
    p.add_argument("--ckpt", required=True, help="model.ckpt to evaluate")
    p.add_argument("--stage", required=True, help="the stage that wrote it (ncd.stages); names the metrics rows")
    p = add("aggregate", cmd_aggregate, stage=False)
    p.add_argument("--out", required=True)
    p.add_argument("--log")
    p.add_argument("inputs", nargs="+", help="metrics.json files")
    p = add("report", cmd_report, stage=False)
    p.add_argument("--metrics", required=True)
    p.add_argument("--reported", required=True)
    p.add_argument("--protocols", help="protocol texts per paper (default: protocols.yaml beside --reported)")
    p.add_argument("--results", required=True)
    p.add_argument("--benchmarks", required=True)
    p.add_argument("--experiments", help="experiments config as JSON or @file (variants, datasets)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--log")
    p = add("check-config", cmd_check_config, stage=False)
    p.add_argument("configfile", nargs="+", help="config YAML files, later ones override earlier ones")
    p.add_argument("--log")
    return parser


# errors of the file system, not of the code: they end a run with one line, like bad input
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def _fail(message: str) -> int:
    message = " ".join(message.split("\n"))
    log.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one stage; bad input → ``error: ...`` on stderr and exit status 2."""
    keep_freed_memory()  # before the stage allocates anything big (ncd.utils.keep_freed_memory: why)
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log", None))
    try:
        args.func(args)
    except NcdError as e:
        return _fail(str(e))
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"cannot write{where}: {e.strerror or e} (a full disk, a quota or a read-only folder; "
                     "nothing partial is kept under the final name: fix it and run again)")
    except RuntimeError as e:
        if "PytorchStreamWriter failed writing" not in str(e) and "file write failed" not in str(e):
            raise
        return _fail(f"writing a checkpoint failed ({str(e).splitlines()[0]}): is the disk full or the "
                     "folder read-only? Fix it and run again")
    except Preempted as e:
        log.warning("preempted: %s", e)
        print(f"preempted: {e}", file=sys.stderr)
        return Preempted.exit_code
    return 0
