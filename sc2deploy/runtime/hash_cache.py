"""The sha256 of the files a runtime has hashed, kept by file identity, so that opening a large artifact again
does not reread every byte (32 GB for 15b fp16: minutes).

An entry records (path, size, mtime_ns, inode, sha256); a file whose size, mtime and inode are unchanged is taken
to hold the same bytes. That trusts the mtime: a file rewritten in place with its size kept and its mtime set back
(os.utime) passes, which is why `sc2deploy parity` rehashes every time (`trusted=False`). The cache is a JSON file
(`cache_file()`), replaced atomically; a damaged one is ignored and rewritten, and where it cannot be written
(a read-only home) there is silently no cache.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sc2deploy.contract import sha256_file

CACHE_DIR_ENV = "SC2DEPLOY_CACHE_DIR"
CACHE_NAME = "verified.json"
FORMAT = ("sc2deploy-verified-files", 1)
# A file changed within its filesystem's timestamp granularity after we stat it keeps its mtime (git's "racily
# clean" entries): only files last written this long before hashing began are recorded.
SETTLED_NS = 2_000_000_000


def cache_file() -> Path | None:
    """$SC2DEPLOY_CACHE_DIR/verified.json, else $XDG_CACHE_HOME/sc2deploy/verified.json, else
    ~/.cache/sc2deploy/verified.json (None: no home to put it in)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]) / CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "sc2deploy" / CACHE_NAME
    try:
        return Path.home() / ".cache" / "sc2deploy" / CACHE_NAME
    except RuntimeError:
        return None


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


class HashCache:
    """Whether files hold the bytes of a given sha256: vouched for by the cache file where a file is unchanged since
    it was hashed to that sha256 (if `trusted`), else read, and the sha256 recorded.

    The cache only ever spares reading a file: an entry that disagrees is not believed but checked. `save()` writes
    what was recorded; call it once the checking is done.
    """

    def __init__(self, trusted: bool = True):
        self.path = cache_file()
        self.trusted = trusted
        self._known: dict[str, dict[str, Any]] | None = None  # read on first use
        self._recorded: dict[str, dict[str, Any]] = {}

    def has_sha256(self, file: Path, sha256: str) -> bool:
        began = time.time_ns()
        before = file.stat()
        key = str(file.resolve())
        if self.trusted and self._entries().get(key) == {**_identity(before), "sha256": sha256}:
            return True
        digest = sha256_file(file)
        if _identity(file.stat()) == _identity(before) and before.st_mtime_ns < began - SETTLED_NS:
            self._recorded[key] = {**_identity(before), "sha256": digest}
        return digest == sha256

    def save(self) -> None:
        if not self._recorded or self.path is None:
            return
        entries = {**self._read(), **self._recorded}  # another process may have written since we read
        entries = {name: entry for name, entry in entries.items() if os.path.exists(name)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{CACHE_NAME}.")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as f:
                    json.dump({"format": FORMAT[0], "format_version": FORMAT[1], "files": entries}, f)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            pass  # no cache where it cannot be written

    def _entries(self) -> dict[str, dict[str, Any]]:
        if self._known is None:
            self._known = self._read()
        return self._known

    def _read(self) -> dict[str, dict[str, Any]]:
        """The cache file's well-formed entries; nothing from a missing, unreadable or damaged file."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or (data.get("format"), data.get("format_version")) != FORMAT:
            return {}
        files = data.get("files")
        return {name: entry for name, entry in files.items() if _well_formed(entry)} if isinstance(files, dict) else {}


def _well_formed(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and all(type(entry.get(k)) is int for k in ("bytes", "mtime_ns", "inode")))
