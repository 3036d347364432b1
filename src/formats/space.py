"""Disk-full faults as one clear error.

Writers fail in several ways when the disk fills: an OSError with ENOSPC or EDQUOT from
our own writers and safetensors, and from torch.save's zip writer a RuntimeError such as
"unexpected pos 704 vs 598" or "file write failed", and from numpy's tofile (the gguf
package's writer) an OSError with no errno, "7680 requested and 0 written". `disk_full_guard` turns each into a
DiskFullError naming the place, the free space and what to do; an output directory removed
or renamed under a running writer is one InputError; anything else passes.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import shutil
from pathlib import Path
from typing import Iterator

from lmkiln.errors import DiskFullError, InputError

# torch.save's messages for a short write; only taken as a full disk when the disk is nearly full
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# numpy's ndarray.tofile (the gguf package's writer) on a short write: an OSError without an errno
SHORT_WRITES = ("requested and",)
NEARLY_FULL = 64 << 20


def free_bytes(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _size(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@contextlib.contextmanager
def disk_full_guard(where: Path, needed: int | None = None, then: str = "re-run") -> Iterator[None]:
    """Writes to `where` inside this block fail as DiskFullError when the disk is full;
    `needed`: what the whole output takes, if known; `then`: what to do after freeing space."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not Path(where).is_dir():  # (torch.save: RuntimeError "Parent directory ... does not exist")
            raise InputError(f"{where}: the output's directory disappeared during the run (removed or renamed); "
                             f"the partial output went with it: re-run") from None
        _disk_full(e, where, needed, then)
        raise


def _disk_full(e: Exception, where: Path, needed: int | None, then: str) -> None:
    """Raise DiskFullError if `e` is a writer's way of saying the disk is full, or that a file there
    may grow no larger (EFBIG)."""
    short = any(m in str(e) for m in (SHORT_WRITES if isinstance(e, OSError) else TORCH_WRITE_FAILURES)) \
        and (not isinstance(e, OSError) or e.errno is None)
    if isinstance(e, OSError) and e.errno == errno.EFBIG or short and _file_size_limit() is not None:
        raise DiskFullError(_too_large(where, then)) from None
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or short and free_bytes(where) < NEARLY_FULL:
        raise DiskFullError(_message(where, needed, then)) from None


def _file_size_limit() -> int | None:
    """This process's limit on a file's size (`ulimit -f`), None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _too_large(where: Path, then: str) -> str:
    limit = _file_size_limit()
    why = (f"this process may write files of at most {_size(limit)} (`ulimit -f`): raise the limit" if limit is not None
           else "the filesystem's largest file is smaller (FAT32 stops at 4 GiB): write to another filesystem")
    return f"{where}: a file of the output grew past the largest file allowed there; {why} and {then}"


def check_free(where: Path, needed: int, option: str = "-o") -> None:
    """Refuse up front, in one line, an output of `needed` bytes that the disk at `where` cannot hold
    (before minutes of work end in a full disk)."""
    free = free_bytes(where)
    if needed > free:
        raise DiskFullError(f"{where}: {_size(free)} free, the output needs about {_size(needed)}; free space or choose "
                            f"another {option}")


def _message(where: Path, needed: int | None, then: str) -> str:
    need = f"; the output needs about {_size(needed)}" if needed else ""
    return f"{where}: the disk is full ({_size(free_bytes(where))} free{need}); free space and {then}"
