"""Small helpers shared by every stage: atomic writes, seeding, provenance."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ncd.errors import LockedError, WriteError


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """A one-line :class:`WriteError` for a failed write of ``path`` (what failed and what to do)."""
    reason = err.strerror or str(err).splitlines()[0]
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
            errno.EROFS: "the file system is read-only; choose a writable results_dir",
            errno.EACCES: "make the folder writable", errno.EPERM: "make the folder writable"}
    e = WriteError(f"cannot write {path}: {reason} (nothing was written; "
                   f"{hint.get(err.errno, 'check the folder and the disk')}, then run again)")
    e.errno, e.strerror, e.filename = err.errno, err.strerror, str(path)
    return e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A step that dies half-way leaves no partial file under the final name, so Snakemake
    and readers never see a truncated output. A failed write (full disk, read-only folder)
    removes the temporary file and raises :class:`ncd.errors.WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)  # mkstemp creates 0600; give the final file the usual permissions
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        os.replace(tmp_path, path)
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


LOCK_NAME = ".ncd.lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``flock`` on ``folder/.ncd.lock``) while the block runs.

    A second process asking for the same folder gets :class:`ncd.errors.LockedError` at once
    instead of two runs overwriting each other's ``last.ckpt`` and outputs. The kernel releases the
    lock when the process ends, however it ends (a crash or SIGKILL leaves the file, not the lock).
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise LockedError(
                    f"{what} is already running in {folder} ({holder} holds {lock}); wait for it to "
                    f"finish or stop it: two runs in one folder would overwrite each other's files") from None
            # the previous holder may have removed the file between our open and flock: lock the current one
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        raise write_error(lock, e) from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}: {what}\n".encode(), 0)
        yield lock
    finally:
        # unlink while still holding the lock, so a waiting opener retries on a fresh file
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def folder_key(folder: str | os.PathLike) -> str:
    """A file-name-safe key unique to a folder's absolute path: its name plus a short hash, so a
    marker about the folder can live under data_dir without writing into the folder."""
    path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip("/")) or "root")[:40]
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def dataset_marker(data_dir: str, dataset: str, data_path: str | None = None, folder: str | None = None) -> str:
    """The READY marker of a dataset: ``<data_dir>/<folder or dataset>/READY``; for a dataset in a
    folder of its own (``data_path``) ``<data_dir>/folders/<dataset>-<folder_key>/READY``, so that
    preparing never writes into the user's folder."""
    if data_path:
        return f"{data_dir}/folders/{dataset}-{folder_key(data_path)}/READY"
    return f"{data_dir}/{folder or dataset}/READY"


MALLOC_TUNING_ENV = "NCD_MALLOC_TUNING"
_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees the same activation-sized tensors over and over. With glibc's
    defaults, many of them are mmapped afresh (or the heap is trimmed and regrown), so every step
    page-faults its memory in again: a digits SimCLR job spent 12 % of its time in the kernel on
    2.6 million minor faults. A fixed mmap threshold of 32 MiB and a 1 GiB trim threshold keep that
    memory in the process (17x fewer faults; the peak RSS of a digits NPID+CLD job went from 1,004 to
    1,015 MB: the memory is kept, not given back).
    Results are bit-identical: only where the memory comes from changes. ``NCD_MALLOC_TUNING=0``
    switches it off. Returns whether the settings were applied (False off glibc, e.g. on macOS)."""
    if os.environ.get(MALLOC_TUNING_ENV, "1") == "0":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, _TRIM_THRESHOLD))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the CPU and every CUDA or MPS device there is)."""
    import torch  # lazily: ncd.utils serves the torch-free config and stage table too

    random.seed(seed)
    np.random.seed(seed % (2**32))
    # torch.manual_seed's generators, each only where its device exists: torch.manual_seed also queues
    # a seed for every absent backend (CUDA, XPU, MTIA) with a captured stack trace, 2 ms a call inside
    # Lightning's deep stack, and the training loop reseeds before every step
    torch.default_generator.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))  # queued until CUDA starts, as torch.manual_seed does
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(int(seed))


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a result."""
    names = ["torch", "torchvision", "lightning", "timm", "numpy", "scipy", "scikit-learn",
             "faiss-cpu", "snakemake"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def device_description() -> str:
    """The compute device in words: GPU name(s) or the CPU model and core count."""
    import torch  # lazily: ncd.utils serves the torch-free config and stage table too

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return ", ".join(names)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"
