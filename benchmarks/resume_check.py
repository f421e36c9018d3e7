"""Exact resume after a stop at a random moment, for every resumable training stage (issue 16).

    python benchmarks/resume_check.py                          # every stage, SIGKILL and SIGUSR1
    python benchmarks/resume_check.py --stages pretrain scan --signals KILL --trials 2 --seed 1

Each resumable stage of the stage table runs on the embedded default (digits), shrunk to a few epochs and
with ``runtime.checkpoint_every_n_steps: 1`` (last.ckpt after every batch, so a stop lands mid-epoch):

1. once uninterrupted;
2. once stopped from outside at a random moment (uniform over the training time left after the first
   save): ``KILL`` = SIGKILL, a node failure; ``USR1`` = SIGUSR1, SLURM's time-limit warning, which
   finishes the batch, saves and exits with status 75;
3. rerun to the end, resuming from the last.ckpt the stopped run left.

It prints one line per stage and signal: where the run was stopped (epoch and batch of ``last.ckpt``)
and whether the rerun's ``model.ckpt`` (every tensor) and its evaluation rows equal the uninterrupted
run's bit for bit. The tests (``tests/test_stages.py``) stop each stage at a fixed batch; this draws
the moment. Exit status 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncd.config import load_config, stage_config  # noqa: E402
from ncd.errors import Preempted  # noqa: E402
from ncd.stages import STAGES, artifact  # noqa: E402

EXPERIMENT = {"scan": "scan_digits", "uno": "uno_digits", "sela": "sela_digits", "cld": "cld_digits",
              "twostage": "twostage_digits"}
#: the embedded default shrunk to 3 epochs a stage (Super-AND: 2 rounds of 2): about 5-20 s of training each
SHRINK: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 3, "batch_size": 128},
    "mine": {"topk": 5, "topk_val": 3},
    "pretext_kmeans": {"n_init": 1},
    "scan": {"epochs": 3, "batch_size": 128, "num_heads": 2},
    "selflabel": {"epochs": 3, "batch_size": 128, "confidence_threshold": 0.5,
                  "ema": {"enabled": True, "alpha": 0.9, "mode": "official"}},
    "pretrain_supervised": {"epochs": 3},
    "discover": {"epochs": 3, "num_heads": 2, "hidden_dim": 32, "proj_dim": 16},
    "sela": {"epochs": 3, "nopts": 3, "batch_size": 128, "scheduler": {"name": "constant"},
             "linear_probe": {"epochs": 3, "batch_size": 256, "lr": 0.1, "milestones": [2]}},
    "cld": {"epochs": 3, "batch_size": 128, "knn_every": 1},
    "cld_probe": {"epochs": 3, "batch_size": 128, "lr": 0.1, "milestones": [2]},
    "superand": {"rounds": 2, "epochs": 2, "batch_size": 128},
    "twostage": {"epochs": 3, "batch_size": 128, "lr_schedule": {"start": 2, "every": 1}},
}
SIGNALS = {"KILL": signal.SIGKILL, "USR1": signal.SIGUSR1}


def shrunk_config() -> dict[str, Any]:
    cfg = load_config([ROOT / "config.yaml"])
    for stage, over in SHRINK.items():
        exp = cfg["experiments"][EXPERIMENT[STAGES[stage].method]]
        exp[stage] = {**exp.get(stage, {}), **over}
    for exp in cfg["experiments"].values():
        exp["runtime"] = {**exp.get("runtime", {}), "accelerator": "cpu", "threads": 1, "checkpoint_every_n_steps": 1}
    return cfg


def stage_args(cfg: dict[str, Any], work: Path, stage: str, out: Path, seed: int, evaluate: bool = False) -> list[str]:
    exp = EXPERIMENT[STAGES[stage].method]
    slice_file = out.parent / (".eval.json" if evaluate else ".slice.json")
    slice_file.parent.mkdir(parents=True, exist_ok=True)
    slice_file.write_text(json.dumps(stage_config(cfg, exp, stage, evaluate)))
    args = ["--experiment", exp, "--seed", str(seed), "--config", f"@{slice_file}",
            "--data-root", str(work / "digits"), "--out", str(out), "--threads", "1"]
    if not evaluate:
        for name, up in STAGES[stage].inputs_for(cfg["experiments"][exp]).items():
            args += [f"--{name.replace('_', '-')}", str(work / "up" / artifact(up))]
    return args


def ncd(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ncd", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"error: python -m ncd {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def ensure_upstream(cfg: dict[str, Any], work: Path, stage: str, seed: int) -> None:
    """The stages ``stage`` reads, run once (uninterrupted) under ``work/up``."""
    exp = cfg["experiments"][EXPERIMENT[STAGES[stage].method]]
    for up in STAGES[stage].inputs_for(exp).values():
        target = work / "up" / artifact(up)
        if not target.is_file():
            ensure_upstream(cfg, work, up, seed)
            ncd(up, *stage_args(cfg, work, up, target, seed))


def position(last: Path) -> str:
    """Where a last.ckpt stands: ``epoch e, after batch b`` (1-based, of the epoch it is in) and the step."""
    from ncd.methods.training import RESUME_SAFE_GLOBALS

    with torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
        blob = torch.load(last, map_location="cpu", weights_only=True)
    # "processed", not "completed": a mid-epoch save runs in on_train_batch_end, before Lightning counts
    # the batch completed
    progress = blob["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    return f"epoch {int(blob['epoch']) + 1}, after batch {int(progress)} (step {int(blob['global_step'])})"


def stopped_run(args: list[str], stage: str, out: Path, sig: str, budget: float, rng: random.Random,
                tries: int = 6) -> str:
    """Run ``stage`` and send ``sig`` at a random moment after its first save; returns where its
    last.ckpt stands. A stop that comes too late (training over: ``model.ckpt``
    written or ``last.ckpt`` gone) is drawn again, from scratch, in a window of 80 % of the training
    time that run took after its first save: a loaded machine makes the first guess long."""
    last, stderr = out.parent / "last.ckpt", out.parent / "stopped.stderr"
    for _ in range(tries):
        for f in out.parent.glob("*"):
            if f.is_file() and f.name != ".slice.json":  # a fresh start: all but the config slice
                f.unlink()
        with stderr.open("w") as err:  # a file, not a pipe: a full pipe would stall the run's progress bar
            p = subprocess.Popen([sys.executable, "-m", "ncd", stage, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=err)
            while not last.exists() and p.poll() is None:
                time.sleep(0.02)
            first_save = time.monotonic()
            deadline = first_save + rng.uniform(0.0, budget)
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if p.poll() is None:
                p.send_signal(SIGNALS[sig])
            p.wait()
        if out.exists() or not last.exists():  # training was over before the stop
            if p.returncode not in (0, -SIGNALS[sig]):
                raise SystemExit(f"error: {stage} failed ({p.returncode}):\n{stderr.read_text()[-3000:]}")
            budget = 0.8 * (time.monotonic() - first_save)
            continue
        want = -signal.SIGKILL if sig == "KILL" else Preempted.exit_code
        if p.returncode != want:
            raise SystemExit(f"error: {stage} stopped by SIG{sig} exited {p.returncode}, expected {want}:\n"
                             f"{stderr.read_text()[-3000:]}")
        return position(last)
    raise SystemExit(f"error: {stage} kept finishing before a signal could reach it ({tries} tries)")


def same_weights(a: Path, b: Path) -> tuple[bool, str]:
    sa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    if sorted(sa) != sorted(sb):
        return False, "different tensor names"
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    return not differ, f"{len(sa) - len(differ)}/{len(sa)} tensors equal"


def rows(cfg: dict[str, Any], work: Path, stage: str, ckpt: Path, seed: int) -> list[dict] | None:
    if not STAGES[stage].evaluate:
        return None
    out = ckpt.parent / "metrics.json"
    ncd("evaluate", *stage_args(cfg, work, stage, out, seed, evaluate=True), "--ckpt", str(ckpt), "--stage", stage)
    return json.loads(out.read_text())["rows"]


def main() -> int:
    resumable = [s for s, st in STAGES.items() if st.resumable]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=resumable, choices=resumable, metavar="STAGE",
                   help=f"default: every resumable stage ({', '.join(resumable)})")
    p.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS), help="default: KILL USR1")
    p.add_argument("--trials", type=int, default=1, help="stops per stage and signal (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the training seed and the draw of the moments (default 0)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "resume_check", help="default: results/resume_check")
    a = p.parse_args()
    rng = random.Random(a.seed)
    cfg = shrunk_config()
    work = a.out.resolve()
    if not (work / "digits" / "READY").is_file():
        ncd("prepare", "--dataset", "digits", "--root", str(work / "digits"))
    print(f"{'stage':<20} {'signal':<6} {'stopped at (last.ckpt)':<40} {'weights':<22} metrics")
    failed = 0
    for stage in a.stages:
        ensure_upstream(cfg, work, stage, a.seed)
        straight = work / "straight" / artifact(stage)
        t0 = time.monotonic()
        ncd(stage, *stage_args(cfg, work, stage, straight, a.seed))
        wall = time.monotonic() - t0
        want_rows = rows(cfg, work, stage, straight, a.seed)
        for sig in a.signals:
            for trial in range(a.trials):
                out = work / f"{sig.lower()}{trial}" / artifact(stage)
                args = stage_args(cfg, work, stage, out, a.seed)
                # the window after the first save: the run minus its start-up (about 6 s of imports)
                where = stopped_run(args, stage, out, sig, max(0.5, wall - 6.0), rng)
                r = ncd(stage, *args)
                ok_w, what = same_weights(out, straight)
                got_rows = rows(cfg, work, stage, out, a.seed)
                ok_m = got_rows == want_rows
                resumed = "resuming stage" in r.stderr
                failed += not (ok_w and ok_m and resumed)
                metrics = "n/a (not evaluated)" if want_rows is None else ("identical" if ok_m else "DIFFER")
                print(f"{stage:<20} {sig:<6} {where:<40} {('identical' if ok_w else 'DIFFER') + ' (' + what + ')':<22} "
                      f"{metrics}{'' if resumed else '  (did not resume)'}", flush=True)
    print(f"resume_check: {failed} differ" if failed else "resume_check: every stopped run ended identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
