"""Writing an output folder all at once: build it in a hidden temporary folder, rename it into place.

Used by checkpoints, exports and engines. An interrupted write leaves only `.NAME.partial-*`
(removed on any error we see), never a folder that looks finished. `--force` replaces an earlier
output of the same kind, and only that: a folder lacking that kind's marker files is refused,
so a typo cannot wipe a directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sc2deploy.errors import UserError

MANIFEST = "sc2deploy.json"  # marks an export artifact or an engine folder; parity and serve look for it


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary folder
        yield tmp
        check_destination(out, force, what, markers)  # something may have appeared there meanwhile
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


def read_manifest(folder: str | Path, what: str, fmt: str, max_version: int, remedy: str) -> dict:
    """`folder`/sc2deploy.json of a `what` (artifact, engine folder) in format `fmt`, or a UserError ending in `remedy`."""
    import json

    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist; {remedy}")
    if not path.is_file():
        raise UserError(f"{folder} is not an sc2deploy {what} (no {MANIFEST}; an interrupted write lacks it); {remedy}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {remedy}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != fmt:
        raise UserError(f"{path} is not an sc2deploy {what} manifest (format {found!r}); {remedy}")
    if int(manifest.get("format_version", 0)) > max_version:
        raise UserError(f"{path} has format version {manifest['format_version']}, newer than this sc2deploy reads "
                        f"({max_version}); upgrade sc2deploy")
    return manifest
