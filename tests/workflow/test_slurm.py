"""The slurm profile against a real SLURM: a one-node cluster started on this machine
(tests/slurm/cluster.sh: Debian's Slurm 22.05, munge, slurmdbd on MariaDB, one fake GPU).

The workflow runs a tiny configuration through ``--profile workflow/profiles/slurm`` with the
container off (``--config container=none``: there is no Apptainer here) and the first status check
after 1 s; sacct then shows that every training step was a SLURM job with the CPUs, memory, time
limit and GPU the config asked for, and the results equal those of a local run.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import ROOT, snakemake  # same folder: pytest puts it on sys.path
from test_workflow import TINY as WORKFLOW_TINY

CLUSTER = ROOT / "tests/slurm/cluster.sh"
TRAINING = ("pretrain", "mine", "pretext_kmeans", "scan", "selflabel", "evaluate")

TINY = {
    "seeds": [0],
    "run_experiments": ["scan_digits"],
    # gpu: the jobs ask for the (fake) GPU; the CPU still computes, deterministically
    "runtime": {"accelerator": "cpu", "threads": 1, "gpu": True, "deterministic": True, "mem_mb": 700, "time_min": 10},
    "experiments": {
        "scan_digits": copy.deepcopy(WORKFLOW_TINY["experiments"]["scan_digits"]),
    },
}


@pytest.fixture(scope="module")
def slurm_cluster():
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, f"tests/slurm/cluster.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=300)


def _config(tmp: Path, name: str) -> list[str]:
    return ["--config", "container=none", f"results_dir={tmp}/{name}/results", f"data_dir={tmp}/data",
            f"reports_dir={tmp}/{name}/reports"]


def _metrics(path: Path) -> dict[tuple, str]:
    return {tuple(r[k] for k in ("experiment", "stage", "split", "seed", "head", "metric")): r["value"]
            for r in csv.DictReader(path.open())}


def _jobs_by_rule(logdir: Path) -> dict[str, list[str]]:
    """SLURM job ids per rule, from the executor's log files (<logdir>/rule_<name>/<wildcards>/<jobid>.log)."""
    jobs: dict[str, list[str]] = {}
    for log in logdir.rglob("*.log"):
        rule = next(p[len("rule_"):] for p in log.relative_to(logdir).parts if p.startswith("rule_"))
        jobs.setdefault(rule, []).append(log.stem)
    return jobs


@pytest.mark.timeout(900)
def test_training_steps_run_as_slurm_jobs_with_their_resources(slurm_cluster, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    logdir = tmp_path / "slurm_logs"
    r = snakemake("--profile", "workflow/profiles/slurm", "--configfile", str(cfg), *_config(tmp_path, "slurm"),
                  "--slurm-init-seconds-before-status-checks", "1", "--slurm-logdir", str(logdir),
                  "--jobs", "2", "--verbose", timeout=800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]

    jobs = _jobs_by_rule(logdir)
    assert sorted(jobs) == sorted(TRAINING), jobs  # prepare_dataset, aggregate and report stayed local
    assert len(jobs["evaluate"]) == 4  # pretrain (kNN), pretext_kmeans, scan, selflabel
    ids = [j for rule in TRAINING for j in jobs[rule]]
    acct = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "-j", ",".join(ids),
                           "--format=JobIDRaw,State,AllocCPUS,ReqMem,AllocTRES,Timelimit,Account,Partition"],
                          capture_output=True, text=True, timeout=60)
    assert acct.returncode == 0, acct.stderr
    rows = {f[0]: f for f in (line.split("|") for line in acct.stdout.splitlines())}
    assert sorted(rows) == sorted(ids), acct.stdout
    for jobid, state, cpus, mem, tres, limit, account, partition in rows.values():
        assert state == "COMPLETED", (jobid, state)
        assert cpus == "1"  # runtime.threads -> cpus_per_task
        assert mem == "700M"  # runtime.mem_mb on the first attempt
        assert limit == "00:10:00"  # runtime.time_min
        assert "gres/gpu=1" in tres, tres  # runtime.gpu -> --gpus=1 (slurm.gpu_request: gpu)
        assert (account, partition) == ("default", "debug")  # the user's default account and partition

    sbatch = [line.split("sbatch call: ", 1)[1] for line in out.splitlines() if "sbatch call: " in line]
    pretrain = next(s for s in sbatch if "rule_pretrain" in s)
    print("sbatch line of the pretrain job:", pretrain)
    for option in ("--cpus-per-task=1", "--mem 700", "-t 10", "--gpus=1", "--ntasks-per-gpu=1", "--signal=USR1@300"):
        assert option in pretrain, (option, pretrain)
    # the training process was started with the rule's threads inside the job
    log = (tmp_path / "slurm/results/logs/pretrain/scan_digits_seed0.log").read_text()
    assert log.strip()

    local = snakemake("--cores", "2", "--configfile", str(cfg), *_config(tmp_path, "local"), timeout=600)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    on_slurm = _metrics(tmp_path / "slurm/results/metrics.csv")
    assert on_slurm == _metrics(tmp_path / "local/results/metrics.csv")
    assert any(k[1] == "selflabel" and k[5] == "acc" for k in on_slurm)
    assert (tmp_path / "slurm/reports/index.html").is_file()


@pytest.mark.timeout(600)
def test_time_limit_signal_saves_and_the_retry_resumes_on_slurm(slurm_cluster, tmp_path):
    """SLURM's --signal=USR1 reaches the training process through srun, Snakemake and the shell;
    the step saves last.ckpt and exits 75, and the profile's retry (attempt 2) resumes from it."""
    cfg = json.loads(json.dumps(TINY))
    cfg["experiments"]["scan_digits"]["pretrain"].update(epochs=30, batch_size=64)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    target = tmp_path / "slurm/results/scan_digits/seed0/pretrain/model.ckpt"
    last = target.with_name("last.ckpt")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(bindir / "snakemake"), "--profile", "workflow/profiles/slurm",
                             "--configfile", str(path), *_config(tmp_path, "slurm"), "--slurm-logdir", str(tmp_path / "logs"),
                             "--slurm-init-seconds-before-status-checks", "1", "--jobs", "1", str(target)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not last.exists() and proc.poll() is None:
            time.sleep(0.5)
        assert last.exists(), "the pretrain job wrote no last.ckpt"
        jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.split("\n")
        jobid = next(line.split()[0] for line in jobs if "rule_pretrain" in line)
        # what SLURM does signal_seconds before the time limit: the job steps, not the batch shell
        subprocess.run(["scancel", "--signal=USR1", jobid], check=True)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert target.is_file()
    # attempt 1: the SLURM log holds the step's stderr; Snakemake replaced the rule log at the retry
    first = next((tmp_path / "logs").rglob(f"{jobid}.log")).read_text()
    assert "preempted: stopped by SIGUSR1" in first
    retry = [f for f in (tmp_path / "logs").rglob("*.log") if "rule_pretrain" in str(f) and f.stem != jobid]
    assert len(retry) == 1, "no second pretrain job"
    log = (tmp_path / "slurm/results/logs/pretrain/scan_digits_seed0.log").read_text()
    assert "resuming stage pretrain" in log and "epoch 1/30 " not in log  # attempt 2 went on from last.ckpt
    acct = {}
    for job in (jobid, retry[0].stem):
        acct[job] = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "-j", job, "--format=State,ReqMem"],
                                   capture_output=True, text=True).stdout.strip()
    assert acct == {jobid: "FAILED|700M", retry[0].stem: "COMPLETED|1400M"}, acct  # the retry asks for 2x memory
