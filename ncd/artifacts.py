"""Share the workflow's results through DVC: ``python -m ncd.artifacts push|pull|remote`` (``make push``,
``make pull``, ``make remote URL=...``).

``push`` records the current ``results/`` in ``dvc.lock`` (``dvc commit``) and uploads it to the default
remote; ``pull`` downloads and checks it out on another clone, after which ``snakemake`` only renders
the report (the hand-off is in workflow/rules/common.smk). Both check the remote first, so a missing or
unreachable one ends with one clear line and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from ncd.errors import NcdError

STAGE = "workflow"  # the dvc.yaml stage whose output is results/


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
    for line in _run(["remote", "list"], root, "dvc remote list").stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return name, parts[1]
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


def push(root: Path) -> None:
    remote = check_remote(root, for_push=True)
    if not (root / "results").is_dir():
        raise NcdError(f"nothing to push: {root / 'results'} does not exist; expected a finished run (make run)")
    _run(["commit", "--force", STAGE], root, "dvc commit")
    _run(["push", STAGE], root, f"dvc push to {remote}")
    print(f"pushed results/ to {remote}; now commit dvc.lock: git add dvc.lock && git commit -m 'results'")


def pull(root: Path) -> None:
    remote = check_remote(root, for_push=False)
    if not (root / "dvc.lock").is_file():
        raise NcdError("dvc.lock is missing; expected the commit in which a colleague ran `make push`")
    # fetch first: a failed download leaves results/ untouched (the cache only keeps verified files)
    _run(["fetch", STAGE], root, f"dvc fetch from {remote}")
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
