"""Atomic outputs (directories, and single files such as a GGUF): build in a temporary
sibling, rename into place at the end.

A crash or Ctrl-C leaves the target untouched (absent, or the user's old copy) and only
a clearly named `.NAME.lmkiln-tmp-*` sibling behind, never a half-written directory that
looks complete. An existing target is refused unless `force`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lmkiln.errors import InputError, OutputExistsError
from lmkiln.formats.space import disk_full_guard


def check_output(target: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    target = Path(target).absolute()
    for src in inputs:
        src = Path(src).absolute()
        if target == src or src in target.parents or target in src.parents:
            raise InputError(f"{target}: the output must not be, contain or sit inside the input {src}")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force (force=True in Python) to replace it, or choose another -o")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target}: exists and is not a directory; refusing to replace a file")
    if not target.parent.exists():
        raise InputError(f"{target.parent}: parent directory of the output does not exist")
    return target


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold `target`'s writer lock: a second lmkiln process writing the same output (or its
    resume state) fails at once in one line, instead of the two runs trampling each other's
    temporary files or the later one replacing the earlier one's output without --force.

    An flock on `.NAME.lmkiln-lock` beside the output (released by the kernel if the process
    dies), removed again when the writer is done."""
    target = Path(target).absolute()
    lock = target.parent / f".{target.name}.lmkiln-lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{target}: another lmkiln process is writing this output right now; "
                         "wait for it to finish, or choose another -o") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False, inputs: tuple[Path, ...] = (), tmp: Path | None = None,
               needed: int | None = None, then: str = "re-run", lock: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `target`.

    `tmp` names a fixed temporary directory to (re)use, for commands that resume; it is
    kept on failure. Otherwise a fresh one is made and removed on failure. A full disk
    fails as one DiskFullError (formats/space.py) saying `needed` bytes and `then`.
    `lock=False`: the caller already holds output_lock(target).
    """
    target = check_output(target, force, inputs)
    with output_lock(target) if lock else contextlib.nullcontext():
        yield from _atomic_dir(target, force, tmp, needed, then)


def _atomic_dir(target: Path, force: bool, tmp: Path | None, needed: int | None, then: str) -> Iterator[Path]:
    keep_on_failure = tmp is not None
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.lmkiln-tmp-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any mkdir
    else:
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        with disk_full_guard(target.parent, needed, then):
            yield tmp
            _fsync_tree(tmp)  # the rename must never publish a directory whose files are still only in cache
    except BaseException:
        if not keep_on_failure:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        if not force:  # appeared while we worked (not through lmkiln, which holds the lock): never replace it silently
            raise OutputExistsError(f"{target}: appeared while this run was writing; its output is kept in {tmp} "
                                    "(rename it yourself, or re-run with --force)")
        old = target.parent / f".{target.name}.lmkiln-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(target: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """`check_output` for a single-file output."""
    target = Path(target).absolute()
    for src in inputs:
        src = Path(src).absolute()
        if target == src or src in target.parents:
            raise InputError(f"{target}: the output must not be or sit inside the input {src}")
    if target.is_dir():
        raise OutputExistsError(f"{target}: is a directory; give a file name for the output (e.g. model.gguf)")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force (force=True in Python) to replace it, or choose another -o")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent}: parent directory of the output does not exist")
    return target


@contextlib.contextmanager
def atomic_file(target: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed to `target`."""
    target = check_output_file(target, force, inputs)
    with output_lock(target):
        yield from _atomic_file(target, force)


def _atomic_file(target: Path, force: bool) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.lmkiln-tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_guard(target.parent):
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output should look like any new file
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if target.exists() and not force:
        tmp.unlink(missing_ok=True)
        raise OutputExistsError(f"{target}: appeared while this run was writing; re-run with --force to replace it")
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory below root (cheap for files already synced)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))
