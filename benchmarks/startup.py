"""Start-up cost of the ``python -m ncd`` jobs of the embedded default (config.yaml): for each command the
workflow runs (prepare, every enabled stage, evaluate of every evaluated stage, aggregate, report), the
wall time of a fresh interpreter that imports what that job imports before it does any work, and the heavy
libraries that came with it. Optionally the wall time of one real ``evaluate`` job on digits.

    .venv/bin/python benchmarks/startup.py                       # imports only (median of 3 runs each)
    .venv/bin/python benchmarks/startup.py --job                 # + a real evaluate job (SCAN head on digits)
    .venv/bin/python benchmarks/startup.py --job --ckpt results/.../scan_digits/seed0/scan/model.ckpt

Columns: ``job`` (the sub-command; ``evaluate:<stage>`` for the evaluation of a stage's artifact), the
modules imported (``ncd.cli`` and ``ncd.config`` always, then the job's own: the stage's ``run`` module, or
``ncd.methods.evaluate`` and the stage's evaluator module), the median seconds, and which of the heavy
libraries (lightning, faiss, matplotlib, pandas, sklearn, scipy, torchvision) were imported. The evaluate
job runs exactly the workflow's command (workflow/rules/evaluate.smk) with the experiment's evaluate slice
of config.yaml, writing its metrics.json to a temporary folder; ``--job`` without ``--ckpt`` looks for the
newest ``<experiment>/seed0/<stage>/model.ckpt`` under results/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "faiss", "matplotlib", "pandas", "sklearn", "scipy", "torchvision")
# ends as ``python -m ncd`` does (ncd/__main__.py): gc.freeze() spares the shutdown a collection of the heap
PROBE = ("import gc, json, sys; {imports}; "
         "print(json.dumps([m for m in {heavy!r} if m in sys.modules])); gc.freeze()")


def module_of(entry: str) -> str:
    return entry.partition(":")[0]


def jobs() -> list[tuple[str, list[str]]]:
    """(job, modules it imports) for every command the embedded default runs, in pipeline order."""
    from ncd.config import load_config, resolve_experiment
    from ncd.stages import stages_of

    config = load_config([ROOT / "config.yaml"])
    base = ["ncd.cli"]
    out: list[tuple[str, list[str]]] = [("prepare", base + ["ncd.data"])]
    seen: set[str] = set()
    evals: list[tuple[str, list[str]]] = []
    for name in config["experiments"]:
        exp = resolve_experiment(config, name)
        for st in stages_of(exp["method"], exp):
            if st.name in seen:
                continue
            seen.add(st.name)
            out.append((st.name, base + ["ncd.config", module_of(st.run)]))
            if st.evaluate:
                evals.append((f"evaluate:{st.name}",
                              base + ["ncd.config", "ncd.methods.evaluate", module_of(st.evaluate)]))
    return out + evals + [("aggregate", base + ["ncd.eval.aggregate"]), ("report", base + ["ncd.report"])]


def time_imports(modules: list[str], repeats: int) -> tuple[float, list[str]]:
    code = PROBE.format(imports="; ".join(f"import {m}" for m in modules), heavy=HEAVY)
    times, heavy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
        if res.returncode:
            raise SystemExit(f"importing {modules} failed:\n{res.stderr}")
        heavy = json.loads(res.stdout.strip().splitlines()[-1])
    return statistics.median(times), heavy


def find_ckpt(experiment: str, stage: str) -> Path | None:
    found = sorted((ROOT / "results").glob(f"**/{experiment}/seed0/{stage}/model.ckpt"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def evaluate_job(experiment: str, stage: str, ckpt: Path, repeats: int, threads: int) -> tuple[float, str]:
    """Median wall seconds of the workflow's evaluate command on ``ckpt``; the command, for the record."""
    from ncd.config import load_config, stage_config

    config = load_config([ROOT / "config.yaml"])
    exp = config["experiments"][experiment]
    cfg = json.dumps(stage_config(config, experiment, stage, evaluate=True), sort_keys=True)
    times = []
    with tempfile.TemporaryDirectory(prefix="ncd-startup-") as tmp:
        # a private copy: a sweep may be rewriting the original while this runs
        local = Path(tmp) / "model.ckpt"
        shutil.copyfile(ckpt, local)
        out = Path(tmp) / stage / "metrics.json"
        cmd = [sys.executable, "-m", "ncd", "evaluate", "--experiment", experiment, "--seed", "0",
               "--config", cfg, "--data-root", str(ROOT / config["data_dir"] / exp["dataset"]),
               "--ckpt", str(local), "--stage", stage, "--out", str(out), "--log", str(Path(tmp) / "eval.log"),
               "--threads", str(threads)]
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - t0)
            if res.returncode:
                raise SystemExit(f"evaluate job failed ({res.returncode}):\n{res.stderr[-3000:]}")
        rows = json.loads(out.read_text())["rows"]
    acc = next((r["value"] for r in rows if r["split"] == "test" and r["head"] == "best" and r["metric"] == "acc"), None)
    shown = " ".join(shlex.quote(c) if c != cfg else "'<slice>'" for c in cmd[1:])
    return statistics.median(times), f"python {shown}" + (f"  (test acc {acc:.4f})" if acc is not None else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per job; the median is printed")
    p.add_argument("--only", nargs="*", help="only these jobs (e.g. evaluate:scan mine)")
    p.add_argument("--job", action="store_true", help="also time a real evaluate job on digits")
    p.add_argument("--experiment", default="scan_digits")
    p.add_argument("--stage", default="scan")
    p.add_argument("--ckpt", type=Path, help="the artifact the evaluate job reads (default: found under results/)")
    p.add_argument("--threads", type=int, default=1, help="--threads of the evaluate job (config.yaml's runtime)")
    a = p.parse_args()
    print(f"python {sys.version.split()[0]}, {a.repeats} runs per job (median)")
    print(f"{'job':26s} {'seconds':>8s}  heavy libraries imported")
    for job, modules in jobs():
        if a.only and job not in a.only:
            continue
        seconds, heavy = time_imports(modules, a.repeats)
        print(f"{job:26s} {seconds:8.2f}  {', '.join(heavy) or '-'}", flush=True)
    if a.job:
        ckpt = a.ckpt or find_ckpt(a.experiment, a.stage)
        if ckpt is None:
            print(f"evaluate job: no {a.experiment}/seed0/{a.stage}/model.ckpt under results/; pass --ckpt")
            return
        seconds, cmd = evaluate_job(a.experiment, a.stage, ckpt, a.repeats, a.threads)
        print(f"evaluate job ({a.experiment} {a.stage}, {ckpt}): {seconds:.2f} s (median of {a.repeats})")
        print(f"  {cmd}")


if __name__ == "__main__":
    main()
