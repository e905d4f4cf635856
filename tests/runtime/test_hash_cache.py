"""Opening an artifact again skips rehashing the files unchanged (size, mtime, inode) since they last passed;
`parity` always rehashes; `--no-verify` checks sizes only; the cache file never makes an open fail."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest

from sc2deploy import parity
from sc2deploy.cli import build_parser, main
from sc2deploy.commands.serve import open_model
from sc2deploy.errors import UserError
from sc2deploy.runtime.hash_cache import CACHE_DIR_ENV, SETTLED_NS, HashCache, cache_file
from sc2deploy.runtime.onnxruntime import OrtRuntime

CHANGED = r"model\.onnx\.data does not match the sha256"
WEIGHTS_SHA256 = hashlib.sha256(b"weights").hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache file, in a folder of this test's own."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "verified.json"


@pytest.fixture
def artifact(store, tmp_path):
    """A copy of the tiny ort artifact whose files were last written an hour ago."""
    copy = shutil.copytree(store.artifact(), tmp_path / "artifact")
    an_hour_ago = time.time_ns() - 3600 * 10**9
    for path in copy.iterdir():
        os.utime(path, ns=(an_hour_ago, an_hour_ago))
    return copy


def flip_a_byte(path, keep_mtime: bool) -> None:
    """Change one byte in place: same size and inode; the same mtime too with `keep_mtime` (as os.utime can)."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)[0]
        f.seek(before.st_size // 2)
        f.write(bytes([byte ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_ino == before.st_ino


def test_a_file_that_passed_is_not_rehashed_but_parity_rehashes_it(artifact, cache):
    OrtRuntime(artifact)
    recorded = json.loads(cache.read_text())["files"]
    assert str((artifact / "model.onnx.data").resolve()) in recorded
    flip_a_byte(artifact / "model.onnx.data", keep_mtime=True)
    OrtRuntime(artifact)  # size, mtime and inode as they were when it passed: the cache vouches for it
    with pytest.raises(UserError, match=CHANGED):
        parity.check(artifact)


def test_a_file_changed_since_it_passed_is_rehashed(artifact, cache):
    OrtRuntime(artifact)
    flip_a_byte(artifact / "model.onnx.data", keep_mtime=False)
    with pytest.raises(UserError, match=CHANGED):
        OrtRuntime(artifact)


def test_no_verify_checks_sizes_only(artifact, cache, capsys):
    flip_a_byte(artifact / "model.onnx.data", keep_mtime=False)
    generate = ["generate", "--artifact", str(artifact), "--prompt-ids", "1,2,3", "--max-tokens", "1"]
    serve = ["serve", "--artifact", str(artifact), "--max-batch", "1"]
    assert main(generate + ["--no-verify"]) == 0
    assert open_model(build_parser().parse_args(serve + ["--no-verify"]))[0].name == "ort"
    assert not cache.exists()  # nothing was hashed
    assert main(generate) == 2 and "does not match the sha256" in capsys.readouterr().err
    with pytest.raises(UserError, match=CHANGED):
        open_model(build_parser().parse_args(serve))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "other"}', "\udcff",
                                     '{"format": "sc2deploy-verified-files", "format_version": 1, '
                                     '"files": {"/x": {"sha256": 5}, "/y": "z"}}'])
def test_a_damaged_cache_is_ignored_and_rewritten(artifact, cache, content):
    cache.parent.mkdir()
    cache.write_text(content, errors="surrogateescape")
    OrtRuntime(artifact)
    assert sorted(json.loads(cache.read_text())["files"]) == sorted(str(p.resolve()) for p in artifact.iterdir()
                                                                    if p.name != "sc2deploy.json")


def test_no_cache_where_it_cannot_be_written(artifact, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker / "cache"))  # as unwritable as a read-only home, also for root
    OrtRuntime(artifact)
    flip_a_byte(artifact / "model.onnx.data", keep_mtime=True)
    with pytest.raises(UserError, match=CHANGED):
        OrtRuntime(artifact)


def test_a_wrong_entry_is_checked_not_believed(artifact, cache):
    OrtRuntime(artifact)
    right = json.loads(cache.read_text())["files"]
    data = json.loads(cache.read_text())
    for entry in data["files"].values():
        entry["sha256"] = "0" * 64
    cache.write_text(json.dumps(data))
    OrtRuntime(artifact)
    assert json.loads(cache.read_text())["files"] == right


def test_a_file_written_just_before_it_was_hashed_is_not_recorded(tmp_path, cache):
    """Within a filesystem's timestamp granularity, a second write could keep the mtime of the first."""
    fresh, settled = tmp_path / "fresh", tmp_path / "settled"
    for path in (fresh, settled):
        path.write_bytes(b"weights")
    past = time.time_ns() - 2 * SETTLED_NS
    os.utime(settled, ns=(past, past))
    hashes = HashCache()
    assert hashes.has_sha256(fresh, WEIGHTS_SHA256) and hashes.has_sha256(settled, WEIGHTS_SHA256)
    hashes.save()
    assert list(json.loads(cache.read_text())["files"]) == [str(settled.resolve())]


def test_entries_of_files_gone_are_dropped(tmp_path, cache):
    past = time.time_ns() - 2 * SETTLED_NS
    for name in ("kept", "gone", "new"):
        (tmp_path / name).write_bytes(b"weights")
        os.utime(tmp_path / name, ns=(past, past))
    for names in (("kept", "gone"), ("new",)):
        hashes = HashCache()
        for name in names:
            assert hashes.has_sha256(tmp_path / name, WEIGHTS_SHA256)
        hashes.save()
        (tmp_path / "gone").unlink(missing_ok=True)
    assert sorted(json.loads(cache.read_text())["files"]) == [str((tmp_path / n).resolve()) for n in ("kept", "new")]


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_file() == tmp_path / "home" / ".cache" / "sc2deploy" / "verified.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file() == tmp_path / "xdg" / "sc2deploy" / "verified.json"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "own"))
    assert cache_file() == tmp_path / "own" / "verified.json"
