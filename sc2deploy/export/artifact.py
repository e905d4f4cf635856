"""Writing an artifact folder all at once: build it in a hidden temporary folder, rename it into place.

An interrupted export leaves only `.NAME.partial-*` (removed on any error we see), never a
folder that looks like a finished artifact. `--force` replaces an earlier export, and only
that: a folder holding anything but an artifact is refused, so a typo cannot wipe a directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sc2deploy.errors import UserError
from sc2deploy.export.manifest import MANIFEST


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace an earlier export, or choose another --out")
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} is not an sc2deploy artifact (no {MANIFEST}); --force replaces only an earlier "
                        "export: remove the folder yourself or choose another --out")


@contextlib.contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out`; renamed to `out` when the block ends without an error."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary folder
        yield tmp
        check_destination(out, force)  # something may have appeared there meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
