"""An interrupted workflow never reports false success: Snakemake is killed with SIGKILL while its jobs
run (they finish as orphans, behind its back), the working directory is unlocked, and the next run
with the default profile (--rerun-incomplete) finishes the whole DAG: results/metrics.csv and the
report exist and equal those of an uninterrupted run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil  # a dependency of Snakemake
import pytest
import yaml
from test_workflow import BIN, ROOT  # same folder: pytest puts it on sys.path

# one cheap experiment (k-means on pixels, one seed): its `cluster` job is the one interrupted, and
# evaluate, aggregate and report are still to come when Snakemake dies
TINY = {
    "seeds": [0],
    "run_experiments": ["kmeans_digits"],
    "runtime": {"accelerator": "cpu", "threads": 1},
    "experiments": {"kmeans_digits": {"method": "kmeans", "dataset": "digits", "cluster": {"n_init": 1}}},
}
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
PROFILE = ["--profile", "workflow/profiles/default"]  # the settings `make run` uses (--rerun-incomplete)
FINAL = ("results/metrics.csv", "reports/index.html", "reports/README.md")


def workdir(base: Path) -> Path:
    """A working directory with this checkout's workflow (working tree, not HEAD) and the tiny config, so
    that Snakemake's metadata and locks (.snakemake/) stay out of the repository."""
    base.mkdir(parents=True)
    shutil.copy(ROOT / "Snakefile", base / "Snakefile")
    shutil.copytree(ROOT / "workflow", base / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (base / "reports").mkdir()
    for name in ("reported.yaml", "protocols.yaml"):
        shutil.copy(ROOT / "reports" / name, base / "reports" / name)
    (base / "config.yaml").write_text(yaml.safe_dump(TINY))
    return base


def snakemake(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def running_ncd(p: psutil.Process) -> bool:
    """Whether ``p`` is a job's `python -m ncd ...` command."""
    try:
        return "ncd" in p.cmdline()
    except psutil.Error:
        return False


def normalized(text: str, base: Path) -> str:
    """The report without what differs between two runs of the same results: paths, times, durations."""
    text = text.replace(str(base), "BASE")
    text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?", "TIME", text)
    return re.sub(r"\b\d+(\.\d+)? (s|min)\b", "DURATION", text)


def killed_then_rerun(base: Path) -> tuple[str, subprocess.CompletedProcess]:
    """Start the tiny workflow, SIGKILL Snakemake once its cluster job runs, let the orphaned job finish,
    unlock; returns the rules that were running and the next run (default profile)."""
    log = (base / "first.log").open("w")
    proc = subprocess.Popen([str(BIN / "snakemake"), *PROFILE], cwd=base, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    incomplete = base / ".snakemake/incomplete"
    deadline = time.monotonic() + 180
    try:
        # wait until the cluster job runs (its outputs are marked incomplete), then kill Snakemake alone
        while time.monotonic() < deadline:
            assert proc.poll() is None, (base / "first.log").read_text()[-3000:]
            marked = incomplete.is_dir() and any(p.is_file() for p in incomplete.rglob("*"))
            jobs = [c for c in psutil.Process(proc.pid).children(recursive=True) if running_ncd(c)]
            if marked and jobs and (base / "results/logs/cluster").is_dir():
                break
            time.sleep(0.05)
        else:
            pytest.fail("no job started within 180 s")
        orphans = psutil.Process(proc.pid).children(recursive=True)  # the jobs' shells and their commands
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        log.close()
    _, left = psutil.wait_procs(orphans, timeout=max(1.0, deadline - time.monotonic()))
    assert not left, f"the orphaned jobs did not finish: {left}"
    running = sorted(p.name for p in (base / "results/logs").iterdir())
    assert not any((base / f).exists() for f in FINAL), "the kill came too late: the final targets exist"
    unlock = snakemake(base, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    return " ".join(running), snakemake(base, *PROFILE)


@pytest.mark.timeout(600)
def test_kill_9_then_unlock_then_rerun_finishes_the_whole_dag(tmp_path):
    # the uninterrupted run, meanwhile (the interrupted one mostly waits on one job at a time)
    clean = workdir(tmp_path / "clean")
    with (clean / "run.log").open("w") as log:
        reference = subprocess.Popen([str(BIN / "snakemake"), *PROFILE], cwd=clean, env=ENV, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        killed = workdir(tmp_path / "killed")
        running, rerun = killed_then_rerun(killed)
        assert reference.wait(timeout=300) == 0, (clean / "run.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "Forced execution" in out, f"no job was marked incomplete ({running}): the test did not interrupt one"
    for f in FINAL:
        assert (killed / f).is_file(), f"{f} is missing after a successful rerun:\n{out[-3000:]}"
    assert (killed / "results/metrics.csv").read_text() == (clean / "results/metrics.csv").read_text()
    for f in ("reports/README.md", "reports/index.html"):
        assert normalized((killed / f).read_text(), killed) == normalized((clean / f).read_text(), clean), f
