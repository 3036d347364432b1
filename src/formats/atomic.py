"""Atomic outputs (directories, and single files such as a GGUF): build in a temporary
sibling, rename into place at the end.

A crash or Ctrl-C leaves the target untouched (absent, or the user's old copy) and only
a clearly named `.NAME.lmkiln-tmp-*` sibling behind, never a half-written directory that
looks complete. An existing target is refused unless `force`. A run killed outright (SIGKILL,
power loss) can leave such a sibling; the next writer of the same output, holding its lock,
sweeps it away.

Paths are compared resolved (`..` and symlinks followed), so no spelling of the input can be
an output; the output's own last component is kept as given: a symlink there is replaced as a
link (with `force`), never followed into the directory it names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from lmkiln.errors import InputError, OutputExistsError
from lmkiln.formats.space import disk_full_guard


def _real(target: Path) -> Path:
    """`target` absolute, its directories resolved (`..`, symlinks), its last component as given."""
    target = Path(target).absolute()
    return target.resolve() if target.name in ("", "..") else target.parent.resolve() / target.name


def _check_inputs(target: Path, inputs: tuple[Path, ...], contain: bool, what: str) -> None:
    """Refuse an output that is, sits inside or (`contain`) holds an input, however either is spelled:
    both as written (parents resolved) and with a symlinked last component followed."""
    for src in inputs:
        src = Path(src).resolve()
        for t in {target, target.resolve()}:
            if t == src or src in t.parents or (contain and t in src.parents):
                raise InputError(f"{target}: {what} {src}")


def _not_writable(where: Path, option: str) -> str:
    try:
        why = "read-only file system" if os.statvfs(where).f_flag & os.ST_RDONLY else "permission denied"
    except OSError:
        why = "permission denied"
    return f"{where}: not writable ({why}); choose another {option}"


def _what(option: str) -> str:
    return "the output" if option == "-o" else option


def _check_parent(target: Path, option: str) -> None:
    if not target.parent.is_dir():
        is_file = target.parent.exists()
        raise InputError(f"{target.parent}: parent directory of {_what(option)} "
                         + ("is a file; choose a path inside a directory" if is_file else "does not exist"))
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(_not_writable(target.parent, option))


@contextlib.contextmanager
def _writable(where: Path, option: str) -> Iterator[None]:
    """Creating our own files in `where` (lock, temporary sibling) fails with EACCES or EROFS as
    one InputError naming the directory: os.access can pass where ACLs, a remount or a
    root-squashed share still refuse."""
    try:
        yield
    except OSError as e:
        # ENOENT in a directory that is there: a pseudo-filesystem (/proc) that takes no new files
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) and not (e.errno == errno.ENOENT and where.is_dir()):
            raise
        raise InputError(_not_writable(where, option)) from None


# The longest name lmkiln gives a sibling of an output: "." + NAME + ".lmkiln-probe-" + the 8 random
# characters mkstemp appends (the ".lmkiln-tmp-", ".lmkiln-partial" and ".lmkiln-old-<pid>" ones are shorter).
SIBLING_EXTRA = 1 + len(".lmkiln-probe-") + 8


def _check_name(target: Path, option: str) -> None:
    """An output name too long for its temporaries failed with ENAMETOOLONG as an internal error."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX") if target.parent.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    n = len(os.fsencode(target.name))
    if n + SIBLING_EXTRA > limit:
        raise InputError(f"{target.name[:40]}...: the name of {_what(option)} is {n} bytes; at most {limit - SIBLING_EXTRA} "
                         f"here (this filesystem's names end at {limit}, and lmkiln writes temporaries named after it): "
                         "choose a shorter name")


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()  # a dangling symlink is there too


def _check_cwd(target: Path, option: str) -> None:
    """Replacing the directory the user stands in (`-o .`, `-o ..`, or `-o ""` from an unset variable,
    which is `.` to a path) would delete it, and every relative path after it would fail."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory is gone already
        return
    for t in {target, target.resolve()}:
        if t == cwd or t in cwd.parents:
            raise InputError(f"{option} {target}: is {'the current directory' if t == cwd else 'above the current directory'}; "
                             f"refusing to write there (an empty {option} means the current directory): choose a new path")


def check_output(target: Path, force: bool, inputs: tuple[Path, ...] = (), option: str = "-o") -> Path:
    target = _real(target)
    _check_cwd(target, option)
    _check_name(target, option)
    _check_inputs(target, inputs, True, "the output must not be, contain or sit inside the input")
    if _exists(target) and not target.is_dir():  # said first: --force would not help
        raise OutputExistsError(f"{target}: exists and is not a directory; refusing to replace a file: choose another {option}")
    if _exists(target) and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force (force=True in Python) to replace it, or choose another {option}")
    if _exists(target) and not target.is_symlink() and not _replaceable(target):
        raise OutputExistsError(f"{target}: holds files that are not a model or export (no {', '.join(OUTPUT_MARKERS[:3])}, ...); "
                                f"refusing to delete them even with --force: remove it yourself or choose another {option}")
    _check_parent(target, option)
    return target


# What a directory --force may replace holds one of these (an engine, an HF or AWQ output, an
# ONNX export, a Triton repository), or nothing: `-o ~/work --force` must not delete a user's files.
OUTPUT_MARKERS = ("manifest.json", "config.json", "model.onnx", "genai_config.json", "lmkiln_export.json", "config.pbtxt")


def _replaceable(d: Path) -> bool:
    try:
        names = {p.name for p in d.iterdir()}
    except OSError:
        return True  # unreadable: the replace itself will say what is wrong
    if not names or names & set(OUTPUT_MARKERS) or any(n.endswith(".safetensors") for n in names):  # (weights whose manifest is gone)
        return True
    # a Triton repository: model folders, each with its config.pbtxt
    return any((d / n / "config.pbtxt").is_file() for n in names)


@contextlib.contextmanager
def output_lock(target: Path, option: str = "-o") -> Iterator[None]:
    """Hold `target`'s writer lock: a second lmkiln process writing the same output (or its
    resume state) fails at once in one line, instead of the two runs trampling each other's
    temporary files or the later one replacing the earlier one's output without --force.

    An flock on `.NAME.lmkiln-lock` beside the output (released by the kernel if the process
    dies), removed again when the writer is done."""
    target = _real(target)
    lock = target.parent / f".{target.name}.lmkiln-lock"
    while True:
        with _writable(target.parent, option):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{target}: another lmkiln process is writing this output right now; "
                             f"wait for it to finish, or choose another {option}") from None
        try:  # the lock file we hold is the one named `lock`, not one its last holder just removed
            if os.path.samestat(os.fstat(fd), os.stat(lock)):  # (sweeping relies on one holder at a time)
                break
        except FileNotFoundError:
            pass
        os.close(fd)
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


def _sweep_stale(target: Path) -> None:
    """Remove `.NAME.lmkiln-tmp-*` siblings of `target` left by a killed run. Only called with
    target's lock held, and every writer holds it while its temporary exists, so none of them
    is in use (one kept by an "appeared while this run was writing" refusal goes too: the re-run
    that message asks for replaces it). `.NAME.lmkiln-old-*` is never swept: a run killed
    between its two renames leaves the user's previous output there. Best effort: a sibling
    that cannot be removed is left, never a reason to fail the run."""
    prefix = f".{target.name}.lmkiln-tmp-"
    for p in target.parent.iterdir():
        if p.name.startswith(prefix):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _atomic_dir(target: Path, force: bool, tmp: Path | None, needed: int | None, then: str) -> Iterator[Path]:
    keep_on_failure = tmp is not None
    _sweep_stale(target)
    if tmp is None:
        with _writable(target.parent, "-o"):
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
    if _exists(target):
        if not force:  # appeared while we worked (not through lmkiln, which holds the lock): never replace it silently
            raise OutputExistsError(f"{target}: appeared while this run was writing; its output is kept in {tmp} "
                                    "(rename it yourself, or re-run with --force)")
        old = target.parent / f".{target.name}.lmkiln-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_symlink():  # the output was a link: replace the link, keep what it pointed to
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def check_output_file(target: Path, force: bool, inputs: tuple[Path, ...] = (), option: str = "-o",
                      outputs: tuple[Path, ...] = ()) -> Path:
    """`check_output` for a single-file output; `option` names it in messages (-o, --report, --plot);
    `outputs`: the run's other outputs, which it must not be or sit inside either."""
    target = _real(target)
    _check_name(target, option)
    _check_inputs(target, inputs, False, f"{_what(option)} must not be or sit inside the input")
    _check_inputs(target, tuple(o for o in outputs if o is not None), False,
                  f"{_what(option)} must not be the same file as (or sit inside) this run's other output")
    if target.is_dir():
        raise OutputExistsError(f"{target}: is a directory; give a file name for {option} (e.g. {_example(option)})")
    kind = _special(target)
    if kind:  # --force would replace a device or a FIFO by a regular file
        raise OutputExistsError(f"{target}: is a {kind}, not a regular file; lmkiln writes {_what(option)} to a temporary file "
                                f"and renames it into place, which would replace it: give a file path for {option}")
    if _exists(target) and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force (force=True in Python) to replace it, or choose another {option}")
    _check_parent(target, option)
    # Create (and remove) a file there now: a --report is written after the run, and access() can
    # pass where creating fails (root on /sys or /proc, ACLs, a read-only remount).
    with _writable(target.parent, option):
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.lmkiln-probe-", dir=target.parent)
        os.close(fd)
        os.unlink(probe)
    return target


def _special(p: Path) -> str | None:
    """What a non-regular file at `p` is (a symlink there is replaced as a link, never followed)."""
    try:
        mode = os.lstat(p).st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))
    return next((what for test, what in kinds if test(mode)), None)


def _example(option: str) -> str:
    return {"--report": "report.json", "--plot": "plot.png"}.get(option, "model.gguf")


@contextlib.contextmanager
def atomic_file(target: Path, force: bool = False, inputs: tuple[Path, ...] = (), option: str = "-o") -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed to `target`."""
    target = check_output_file(target, force, inputs, option)
    with output_lock(target, option):
        yield from _atomic_file(target, force, option)


def write_json(target: Path, obj, force: bool = False, inputs: tuple[Path, ...] = (), option: str = "--report") -> Path:
    """Write `obj` as indented JSON to `target` through atomic_file (the commands' --report files)."""
    with atomic_file(target, force, inputs, option) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    return _real(target)


def _atomic_file(target: Path, force: bool, option: str = "-o") -> Iterator[Path]:
    _sweep_stale(target)
    with _writable(target.parent, option):
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
    if _exists(target) and not force:
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
