"""Share the workflow's results through DVC: ``python -m ncd.artifacts push|pull|remote`` (``make push``,
``make pull``, ``make remote URL=...``).

``push`` records the current ``results/`` in ``dvc.lock`` (``dvc commit``) and uploads it to the default
remote; ``pull`` downloads and checks it out on another clone, after which ``snakemake`` only renders
the report (the hand-off is in workflow/rules/handoff.smk). Both check the remote first, so a missing or
unreachable one ends with one clear line and exit status 2, before anything is written.

Resume-only state (``last.ckpt``, its ``last.ckpt.config`` sidecar, half-written ``*.tmp`` and
``*.lock`` files) is never shared: .dvcignore keeps it out of what ``dvc commit`` records, ``push``
refuses to run where .dvcignore would not, and ``pull`` refuses a dvc.lock that lists such a file (a
checkpoint from a remote would be unpickled on resume) before anything is checked out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from ncd.errors import NcdError

STAGE = "workflow"  # the dvc.yaml stage whose output is results/
RESULTS = "results"  # its output folder
# file names of resume-only state under results/ (keep in step with .dvcignore): a training step's
# last.ckpt (Lightning's last-v1.ckpt, ...) and its config sidecar, atomic_path's temporary files, locks
RESUME_ONLY = ("last*.ckpt", "last*.ckpt.*", "*.tmp", "*.lock")


def resume_only(path: str | Path) -> bool:
    """Whether ``path`` (any folder) names resume-only state that DVC must never share."""
    return any(fnmatch.fnmatchcase(Path(path).name, pattern) for pattern in RESUME_ONLY)


def _dvc() -> list[str]:
    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(exe).exists():
        raise NcdError("the dvc command is not installed; expected it next to this Python (pip install dvc)")
    return [exe]


def _run(args: list[str], root: Path, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(_dvc() + args, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        detail = " ".join((r.stderr or r.stdout).split())[-600:]
        raise NcdError(f"{what} failed: {detail}")
    return r


def default_remote(root: Path) -> tuple[str, str]:
    """The default remote's name and URL, or NcdError when none is set."""
    # `dvc config core.remote` fails when unset (`dvc remote default` prints a sentence instead)
    r = subprocess.run(_dvc() + ["config", "core.remote"], cwd=root, capture_output=True, text=True)
    name = r.stdout.strip() if r.returncode == 0 else ""
    if not name:
        raise NcdError("no DVC remote is set; expected one, e.g. `make remote URL=/shared/ncd-dvc` "
                       "(a folder, ssh://host/path or s3://bucket/path)")
    # `dvc config`, not `dvc remote list`: the latter wraps a long URL onto a line of its own
    r = subprocess.run(_dvc() + ["config", f"remote.{name}.url"], cwd=root, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return name, r.stdout.strip()
    raise NcdError(f"the default DVC remote {name!r} is not defined in .dvc/config; expected `dvc remote list` to show it")


def check_remote(root: Path, for_push: bool) -> str:
    """Fail early, naming the remote, when a local-folder remote is missing (pull) or not writable (push)."""
    name, url = default_remote(root)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else url)
        path = path if path.is_absolute() else (root / ".dvc" / path).resolve()
        if for_push:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise NcdError(f"DVC remote {name!r} is unreachable: folder {path} does not exist; expected the folder "
                           "a colleague pushed to (change it with `make remote URL=...`)")
    return f"{name} ({url})"


def _some(paths: Iterable[str], n: int = 3) -> str:
    """The first ``n`` of ``paths`` (last.ckpt and its kin first), and how many more."""
    paths = sorted(paths, key=lambda p: (not Path(p).name.startswith("last"), p))
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def check_ignored(root: Path) -> None:
    """NcdError naming the first resume-only file under results/ that .dvcignore does not exclude."""
    found = sorted(str(p.relative_to(root)) for p in (root / RESULTS).rglob("*") if resume_only(p) and p.is_file())
    if not found:
        return
    # `dvc check-ignore` prints the paths .dvcignore excludes (exit 1 when none is)
    r = subprocess.run(_dvc() + ["check-ignore", *found], cwd=root, capture_output=True, text=True)
    ignored = {line.strip() for line in r.stdout.splitlines()}
    shared = [p for p in found if p not in ignored]
    if shared:
        raise NcdError(f"{_some(shared)} would be pushed; expected .dvcignore to exclude resume-only state "
                       f"({', '.join(RESUME_ONLY)}) under {RESULTS}/")


def check_lock(root: Path) -> None:
    """NcdError when the fetched dvc.lock lists resume-only state under results/ (nothing is checked out)."""
    r = _run(["ls", "--json", "--recursive", ".", RESULTS], root, "dvc ls")
    listed = [entry["path"] for entry in json.loads(r.stdout or "[]")]
    bad = [p for p in listed if resume_only(p)]
    if bad:
        raise NcdError(f"dvc.lock lists resume-only state ({_some(f'{RESULTS}/{p}' for p in bad)}); expected none: "
                       "it stays on the machine that trains (a remote's last.ckpt would be loaded on resume); "
                       "ask for a push made with this version's .dvcignore")


def push(root: Path) -> None:
    remote = check_remote(root, for_push=True)
    if not (root / "results").is_dir():
        raise NcdError(f"nothing to push: {root / 'results'} does not exist; expected a finished run (make run)")
    check_ignored(root)
    _run(["commit", "--force", STAGE], root, "dvc commit")
    _run(["push", STAGE], root, f"dvc push to {remote}")
    print(f"pushed results/ to {remote}; now commit dvc.lock: git add dvc.lock && git commit -m 'results'")


def pull(root: Path) -> None:
    remote = check_remote(root, for_push=False)
    if not (root / "dvc.lock").is_file():
        raise NcdError("dvc.lock is missing; expected the commit in which a colleague ran `make push`")
    # fetch first: a failed download leaves results/ untouched (the cache only keeps verified files)
    _run(["fetch", STAGE], root, f"dvc fetch from {remote}")
    check_lock(root)
    _run(["checkout", STAGE], root, "dvc checkout")
    print(f"pulled results/ from {remote}; `make run` now renders the report without training")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncd.artifacts", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["push", "pull", "remote"])
    p.add_argument("url", nargs="?", help="remote: a folder, ssh://host/path or s3://bucket/path")
    p.add_argument("--root", default=".", help="the repository (default: here)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if args.action == "push":
            push(root)
        elif args.action == "pull":
            pull(root)
        else:
            if not args.url:
                raise NcdError("remote needs a URL; expected e.g. `make remote URL=/shared/ncd-dvc`")
            _run(["remote", "add", "--default", "--force", "storage", args.url], root, "dvc remote add")
            print(f"default DVC remote 'storage' = {args.url} (in .dvc/config: commit it; credentials go to "
                  "`dvc remote modify --local storage ...`, which stays out of git)")
    except NcdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
