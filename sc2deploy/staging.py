"""Writing an output folder all at once: build it in a hidden temporary folder, rename it into place.

Used by checkpoints, exports and engines. An interrupted write leaves only `.NAME.partial-PID-XXXXXXXX`
(removed on any error we see), never a folder that looks finished. `--force` replaces an earlier
output of the same kind, and only that: a folder lacking that kind's marker files is refused,
so a typo cannot wipe a directory.

A killed writer (SIGKILL, OOM, power) cannot clean up, so the next write to the same NAME does:
it removes `.NAME.partial-PID-XXXXXXXX` and `.NAME.old-PID-XXXXXXXX` folders (the second holds the
output being replaced) whose process PID no longer exists and whose flock nobody holds. A writer
holds an exclusive flock on each folder it makes for as long as it uses it, so a live writer's
folders are never taken, even from another PID namespace. Nothing else is touched: not a name that
differs from that pattern, not a symlink, not a file.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sc2deploy.contract import MANIFEST
from sc2deploy.errors import UserError

_KINDS = ("partial", "old")  # what a writer makes beside NAME: the folder it writes, the output it replaces
_log = logging.getLogger(__name__)


def check_destination(out: Path, force: bool, what: str = "artifact", markers: Sequence[str] = (MANIFEST,)) -> None:
    """Refuse an `out` that exists and is not empty, unless `force` and it holds an earlier `what` (all `markers`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace an earlier {what}, or choose another --out")
    missing = [m for m in markers if not (out / m).is_file()]
    if missing:
        raise UserError(f"{out} is not an sc2deploy {what} (no {missing[0]}); --force replaces only an earlier "
                        f"{what}: remove the folder yourself or choose another --out")


@contextlib.contextmanager
def staging_folder(out: Path, force: bool, what: str = "artifact", markers: Sequence[str] = (MANIFEST,)) -> Iterator[Path]:
    """A temporary folder beside `out`; renamed to `out` when the block ends without an error."""
    out = Path(out)
    check_destination(out, force, what, markers)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    with contextlib.ExitStack() as locks:
        tmp = locks.enter_context(_locked_folder(out, "partial"))
        old = None
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary folder
            yield tmp
            check_destination(out, force, what, markers)  # something may have appeared there meanwhile
            if out.exists():
                old = locks.enter_context(_locked_folder(out, "old"))
                os.replace(out, old / out.name)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out.exists():
                os.replace(old / out.name, out)  # put back what was to be replaced
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale(out: Path) -> list[Path]:
    """Remove the folders that dead writers of `out` left beside it (see the module docstring); returns them."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{'|'.join(_KINDS)})-([1-9][0-9]{{0,9}})-[a-z0-9_]{{8}}")
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        found = pattern.fullmatch(path.name)
        if found is None or path.is_symlink() or not path.is_dir() or _process_exists(int(found[1])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        _log.warning("removed %s, left by an interrupted sc2deploy run (process %s)", path, found[1])
        removed.append(path)
    return removed


@contextlib.contextmanager
def _locked_folder(out: Path, kind: str) -> Iterator[Path]:
    """A new folder `.NAME.KIND-PID-XXXXXXXX` beside `out`, flocked by this process until the block ends."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: the PID alone protects the folder
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's process; or a PID we cannot ask about
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
