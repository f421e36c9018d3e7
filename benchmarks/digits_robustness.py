"""How robust the embedded default is: every method of config.yaml on digits over seeds 0-4, with 1 and with 2
intra-op threads (two summation orders of the CPU), against the floors issue 16 sets.

    python benchmarks/digits_robustness.py                      # runs what is missing, then prints the table
    python benchmarks/digits_robustness.py --summarize-only     # the table from the metrics already there
    python benchmarks/digits_robustness.py --threads 2 --seeds 3 4 --set uno_digits.discover.epochs=100

Each thread count is one Snakemake run of the real workflow (default profile) into its own results folder,
``<out>/t<threads>`` (its config beside it), up to that folder's metrics.csv; finished runs are reused. A run
with 1 thread is the embedded default itself (``runtime.threads: 1``), so its seeds 0-2 equal `make run`'s.
The table gives, per floor, min / median / max over the seeds and the seeds below the floor.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: (label, experiment, stage, split, metric, floor): the head is always the stage's label-free ``best``
FLOORS = (
    ("SCAN + self-label test ACC", "scan_digits", "selflabel", "test", "acc", 0.93),
    ("UNO train-novel ACC", "uno_digits", "discover", "train-novel", "acc", 0.93),
    ("SeLa test ACC", "sela_digits", "sela", "test", "acc", 0.90),
    ("NPID + CLD kNN top-1", "cld_digits", "cld", "test", "knn_top1", 0.93),
    ("two-stage train ACC", "twostage_digits", "twostage", "train", "acc", 0.85),
)


def _set(cfg: dict, assignment: str) -> None:
    """``exp.block.key=value`` (value read as YAML) into the experiments of ``cfg``."""
    path, _, value = assignment.partition("=")
    keys = path.split(".")
    if not value or len(keys) < 2:
        raise SystemExit(f"error: --set {assignment!r}: expected EXPERIMENT.KEY[.KEY...]=VALUE")
    node = cfg.setdefault("experiments", {}).setdefault(keys[0], {})
    for k in keys[1:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(value)


def run(out: Path, threads: int, seeds: list[int], sets: list[str], cores: int) -> Path:
    """One Snakemake run of the floors' experiments with ``threads`` threads per job; returns its metrics.csv."""
    folder = (out / f"t{threads}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"results_dir": str(folder), "reports_dir": str(folder / "reports"), "seeds": seeds,
           "runtime": {"threads": threads}, "run_experiments": sorted({f[1] for f in FLOORS})}
    for s in sets:
        _set(cfg, s)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    target = folder / "metrics.csv"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(bindir / "snakemake"), str(target), "--profile", "workflow/profiles/default", "--cores", str(cores),
           "--configfile", str(config)]
    print(f"digits_robustness: {threads} thread(s), seeds {seeds}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with (folder / "snakemake.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"error: snakemake exited {rc}; see {folder / 'snakemake.log'}")
    print(f"digits_robustness: {threads} thread(s) done in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


def table(paths: dict[int, Path], seeds: list[int]) -> list[str]:
    """Per floor and thread count: min / median / max over ``seeds``, the seeds below the floor, every value."""
    lines = [f"{'floor':36s} {'threads':>7s} {'min':>6s} {'median':>6s} {'max':>6s}  below  per seed"]
    best: dict[int, list[dict[str, str]]] = {}
    for threads, path in paths.items():
        with path.open() as f:
            best[threads] = [r for r in csv.DictReader(f) if r["head"] == "best" and int(r["seed"]) in seeds]
    for label, exp, stage, split, metric, floor in FLOORS:
        for threads, path in sorted(paths.items()):
            v = {int(r["seed"]): float(r["value"]) for r in best[threads]
                 if (r["experiment"], r["stage"], r["split"], r["metric"]) == (exp, stage, split, metric)}
            if not v:
                lines.append(f"{label + f' (>= {floor})':36s} {threads:>7d}  no rows in {path}")
                continue
            vals = sorted(v.values())
            below = ",".join(str(s) for s in sorted(v) if v[s] < floor) or "-"
            lines.append(f"{label + f' (>= {floor})':36s} {threads:>7d} {vals[0]:6.3f} {statistics.median(vals):6.3f} "
                         f"{vals[-1]:6.3f}  {below:5s}  " + " ".join(f"{s}:{v[s]:.3f}" for s in sorted(v)))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/digits_robustness.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads per job (default: 1 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: 0 1 2 3 4")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "robustness", help="default: results/robustness")
    p.add_argument("--cores", type=int, default=2, help="Snakemake's --cores (default 2)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="EXP.KEY=VALUE",
                   help="override a config value of one experiment (repeatable), e.g. uno_digits.discover.epochs=100")
    p.add_argument("--summarize-only", action="store_true", help="print the table from existing metrics.csv files")
    args = p.parse_args(argv)
    bad = [t for t in args.threads if t < 1]
    if bad:
        p.error(f"--threads must be at least 1, got {bad[0]}")
    paths = {}
    for threads in args.threads:
        if args.summarize_only:
            paths[threads] = args.out / f"t{threads}" / "metrics.csv"
            if not paths[threads].is_file():
                p.error(f"--summarize-only: {paths[threads]} does not exist; run without --summarize-only first")
        else:
            paths[threads] = run(args.out, threads, args.seeds, args.sets, args.cores)
    print("\n".join(table(paths, args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
