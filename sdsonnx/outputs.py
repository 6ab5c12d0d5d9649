"""Atomic output folders: `run`, `export` and `bench` build into a hidden work area beside the output and rename
it into place when complete, so an output folder that exists is always whole (docs/RELIABILITY.md).

For an output `DIR/NAME` three hidden siblings may exist (docs/ARTIFACTS.md):
  DIR/.NAME.sdsonnx-lock   fcntl lock (holds the writer's pid) while a process writes NAME; removed when done
  DIR/.NAME.sdsonnx-work   the work area being filled; renamed to NAME on success; left as it is on an exception,
                           a signal or a kill (a later `run --resume` continues from it; a new run replaces it)
  DIR/.NAME.sdsonnx-old    with --force, the previous NAME moved aside just before the new one is renamed in
                           (deleted right after; between the two renames NAME is briefly absent, never half-written)
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputError(InputError):
    """An output path that cannot be written (a file, a read-only place, a full disk): exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that `finally` blocks and context managers run."""


def siblings(path: Path) -> tuple[Path, Path, Path]:
    """(lock, work, old): the hidden siblings of output `path`."""
    return tuple(path.parent / f".{path.name}.sdsonnx-{kind}" for kind in ("lock", "work", "old"))


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _not_writable(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write the output there ({exc.strerror or exc}): choose a writable output "
                       f"folder")


def _make_parent(path: Path) -> None:
    """Create the output's parent folder; a file in the way or a read-only place is an OutputError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{path}: a parent of the output path is a file: choose another output") from None
    except OSError as exc:
        if exc.errno in NOT_WRITABLE:
            raise _not_writable(path, exc) from None
        raise


def _lock(path: Path, lock_path: Path) -> int:
    """Take the exclusive lock of output `path`; returns its fd. Another holder is an OutputExistsError."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in NOT_WRITABLE:
                raise _not_writable(path, exc) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"{path} is being written by another sdsonnx process (pid {holder}, lock "
                                    f"{lock_path}): wait for it to finish or choose another output") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file between our open and flock: take the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the output path is a file, not a folder: remove it or choose another output")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists: pass --force to replace it, or choose another output")


def _commit(work: Path, path: Path, old: Path) -> None:
    """Rename `work` to `path`; an existing `path` is moved aside to `old` first and deleted after."""
    if old.exists():
        shutil.rmtree(old)
    replacing = path.exists()
    if replacing:
        os.rename(path, old)
    os.rename(work, path)  # between the two renames `path` is absent (a kill here leaves the old result at `old`)
    _fsync_dir(path.parent)
    if replacing:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | Path, force: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a fresh work folder that becomes `path` when the block completes.

    Refuses (before anything is written) a `path` that is a file, or exists without `force`, or is locked by
    another process. On any exception, Ctrl-C or SIGTERM inside the block nothing is renamed: `path` keeps its
    previous content (or stays absent) and the work area stays for inspection or a later resume. `resume=True`
    keeps an existing work area instead of starting empty. A full disk while writing is an OutputError.
    """
    path = Path(path).absolute()
    lock_path, work, old = siblings(path)
    _refuse_existing(path, force)
    _make_parent(path)
    fd = _lock(path, lock_path)
    try:
        _refuse_existing(path, force)  # another process may have completed it before we took the lock
        try:
            if work.exists() and not resume:
                shutil.rmtree(work)
            work.mkdir(exist_ok=True)
        except OSError as exc:
            if exc.errno in NOT_WRITABLE:
                raise _not_writable(path, exc) from None
            raise
        try:
            with sigterm_as_exception():
                yield work
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    _commit(work, path, old)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise OutputError(f"{path}: the disk is full (no space left on device) while writing it; nothing "
                                  f"was written there. Free space (the partial work area {work} may be deleted) "
                                  f"and run again") from None
            raise
        log.info("wrote %s", path)
    finally:
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass
        os.close(fd)


KILL_ENV = "SDSONNX_KILL_AT"


def kill_point(name: str) -> None:
    """Fault injection for the kill/resume tests: SIGKILL this process when $SDSONNX_KILL_AT equals `name`
    (points: shard-<i> between a shard's temporary file and its rename, state-<b> between a resume state's
    tensors and its commit). Unset in normal use: a no-op."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
