"""The DVC hand-off: a producer runs a tiny configuration and pushes results/ to a folder remote;
a fresh clone pulls it and Snakemake then trains nothing, renders the report, and still reruns a
step whose parameters change. A missing remote fails clearly and writes nothing."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from test_workflow import (  # same folder: pytest puts it on sys.path
    BIN,
    ROOT,
    job_counts,
)
from test_workflow import TINY as WORKFLOW_TINY

TINY = {
    "seeds": [0],
    "runtime": {"accelerator": "cpu", "threads": 1},
    "experiments": {
        "scan_digits": copy.deepcopy(WORKFLOW_TINY["experiments"]["scan_digits"]),
    },
}
TRAINING = ("pretrain", "mine", "pretext_kmeans", "scan", "selflabel", "evaluate", "prepare_dataset")
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
       "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def run(*args, cwd, check=True, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def snakemake(*args, cwd) -> subprocess.CompletedProcess:
    return run(BIN / "snakemake", "--cores", "2", *args, cwd=cwd, check=False)


def artifacts(action, cwd, *extra, check=True):
    return run(sys.executable, "-m", "ncd.artifacts", action, *extra, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    """A clone of this repository that ran the tiny configuration and pushed results/ to a folder remote."""
    base = tmp_path_factory.mktemp("dvc")
    a = base / "producer"
    run("git", "clone", "-q", ROOT, a, cwd=base)
    (a / "config.yaml").write_text(yaml.safe_dump(TINY))
    r = snakemake(cwd=a)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    artifacts("remote", a, base / "remote")
    out = artifacts("push", a)
    assert "pushed results/" in out.stdout
    run("git", "add", "config.yaml", "dvc.lock", ".dvc/config", cwd=a)
    run("git", "commit", "-q", "-m", "tiny results", cwd=a)
    return base, a


@pytest.mark.timeout(900)
def test_pull_on_a_fresh_clone_trains_nothing_and_renders_the_report(producer):
    base, a = producer
    b = base / "colleague"
    run("git", "clone", "-q", a, b, cwd=base)
    assert not (b / "results").exists()
    artifacts("pull", b)
    assert (b / "results/scan_digits/seed0/selflabel/model.ckpt").is_file()
    assert (b / "results/metrics.csv").read_text() == (a / "results/metrics.csv").read_text()

    dry = snakemake("-n", cwd=b)
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout + dry.stderr)
    assert not [rule for rule in TRAINING + ("aggregate",) if rule in counts], counts
    assert counts.get("report") == 1

    done = snakemake(cwd=b)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (b / "reports/index.html").is_file() and "scan_digits" in (b / "reports/README.md").read_text()
    assert not (b / "data").exists()  # no dataset was fetched for a report
    again = snakemake("-n", cwd=b)
    assert "Nothing to be done" in again.stdout + again.stderr

    # the hand-off does not freeze the pipeline: a changed parameter reruns its training step
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["experiments"]["scan_digits"]["selflabel"]["epochs"] = 2
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    changed = job_counts((r := snakemake("-n", cwd=b)).stdout + r.stderr)
    assert changed.get("selflabel") == 1 and changed.get("prepare_dataset") == 1, changed
    # and only that step (its slice changed) and its evaluation, on a clone without Snakemake's metadata
    assert changed.get("evaluate") == 1, changed
    assert not [rule for rule in ("pretrain", "mine", "pretext_kmeans", "scan") if rule in changed], changed


@pytest.mark.timeout(300)
def test_pull_from_a_missing_remote_fails_clearly_and_writes_nothing(producer):
    base, a = producer
    c = base / "no-remote"
    run("git", "clone", "-q", a, c, cwd=base)
    artifacts("remote", c, base / "moved-away")
    r = artifacts("pull", c, check=False)
    assert r.returncode == 2
    assert "DVC remote 'storage' is unreachable" in r.stderr and "moved-away" in r.stderr
    assert not (c / "results").exists()

    run(BIN / "dvc", "remote", "remove", "storage", cwd=c)
    r = artifacts("pull", c, check=False)
    assert r.returncode == 2 and "no DVC remote is set" in r.stderr
    assert not (c / "results").exists()


# --- resume-only state stays out of what DVC shares -------------------------------------------------
RESUME_ONLY_FILES = ("e/seed0/scan/last.ckpt", "e/seed0/scan/last.ckpt.config", "e/seed0/scan/.model.ckpt.a1b2.tmp",
                     "e/seed0/run.lock")
SHARED_FILES = ("metrics.csv", "e/seed0/scan/model.ckpt", "e/seed0/scan/.scan.config")


def dvc_repo(path, lock=None):
    """A repository with this checkout's dvc.yaml, .dvcignore and DVC config (the working tree, not HEAD)
    and the stage's dependencies; ``lock``: a dvc.lock to pull from. No Snakemake run: the results tree
    is written by hand."""
    path.mkdir(parents=True)
    run("git", "init", "-q", cwd=path)
    for name in ("dvc.yaml", ".dvcignore", "Snakefile", "config.yaml", ".dvc/config", ".dvc/.gitignore"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    for name in ("workflow", "ncd"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    if lock is not None:
        shutil.copy(lock / "dvc.lock", path / "dvc.lock")
        shutil.copy(lock / ".dvc/config", path / ".dvc/config")
    return path


def results_tree(root):
    res = root / "results"
    for rel in SHARED_FILES + RESUME_ONLY_FILES:
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        # a crafted checkpoint would run code when unpickled: its bytes must never reach the remote
        (res / rel).write_text(f"CRAFTED {rel}\n" if rel in RESUME_ONLY_FILES else f"shared {rel}\n")


def artifacts_at(action, repo, *extra, check=True):
    # run from this checkout, so that the working tree's ncd is imported (not the copy the stage depends on)
    return run(sys.executable, "-m", "ncd.artifacts", action, *extra, "--root", repo, cwd=ROOT, check=check)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.timeout(300)
def test_resume_only_state_is_neither_pushed_nor_pulled(tmp_path):
    a = dvc_repo(tmp_path / "producer")
    results_tree(a)
    artifacts_at("remote", a, tmp_path / "remote")
    artifacts_at("push", a)
    pushed = [p.read_bytes() for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    assert pushed and not [b for b in pushed if b"CRAFTED" in b]
    lock = yaml.safe_load((a / "dvc.lock").read_text())
    assert [o["nfiles"] for o in lock["stages"]["workflow"]["outs"]] == [len(SHARED_FILES)]

    b = dvc_repo(tmp_path / "colleague", lock=a)
    own = b / "results/e/seed0/scan/last.ckpt"  # the colleague's own resume state is left alone
    own.parent.mkdir(parents=True)
    own.write_text("mine\n")
    artifacts_at("pull", b)
    assert files_under(b / "results") == sorted(SHARED_FILES + ("e/seed0/scan/last.ckpt",))
    assert own.read_text() == "mine\n"
    for rel in SHARED_FILES:
        assert (b / "results" / rel).read_text() == f"shared {rel}\n"


@pytest.mark.timeout(300)
def test_resume_only_state_is_refused_when_dvcignore_would_let_it_through(tmp_path):
    a = dvc_repo(tmp_path / "producer")
    results_tree(a)
    artifacts_at("remote", a, tmp_path / "remote")
    (a / ".dvcignore").write_text(".stamps/\n")  # an edited (or an older) .dvcignore
    r = artifacts_at("push", a, check=False)
    assert r.returncode == 2 and "results/e/seed0/scan/last.ckpt" in r.stderr and "would be pushed" in r.stderr, r.stderr
    assert not (a / "dvc.lock").exists() and not any((tmp_path / "remote").rglob("*"))

    # a dvc.lock that lists a last.ckpt (pushed by hand, or by an older version): the pull checks out nothing
    run(BIN / "dvc", "commit", "--force", "workflow", cwd=a)
    run(BIN / "dvc", "push", "workflow", cwd=a)
    b = dvc_repo(tmp_path / "colleague", lock=a)
    r = artifacts_at("pull", b, check=False)
    assert r.returncode == 2 and "results/e/seed0/scan/last.ckpt" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "expected none" in r.stderr
    assert not (b / "results").exists()
