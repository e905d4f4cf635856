"""Staging: what a killed writer leaves beside its output is removed by the next write to the same place,
and nothing else is: not a live writer's folder, not a folder that merely looks like ours."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sc2deploy.checkpoint import RandomSource, write_checkpoint
from sc2deploy.config import preset
from sc2deploy.errors import UserError
from sc2deploy.staging import remove_stale, staging_folder

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hidden(tmp_path: Path, name: str, content: str = "weights") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.onnx.data").write_text(content)
    return folder


def test_a_killed_writer_is_cleaned_up_by_the_next_write_and_not_while_it_runs(tmp_path):
    out = tmp_path / "artifact"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from sc2deploy.staging import staging_folder
            with staging_folder(Path({str(out)!r}), False) as tmp:
                (tmp / "model.onnx.data").write_bytes(b"x" * 4096)
                print(tmp, flush=True)
                time.sleep(120)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(writer.stdout.readline().strip())
        assert partial.parent == tmp_path and partial.name.startswith(f".artifact.partial-{writer.pid}-")
        assert remove_stale(out) == [] and partial.is_dir()  # its writer still runs
    finally:
        writer.send_signal(signal.SIGKILL)  # no cleanup of its own: the folder stays
        writer.wait()
    assert partial.is_dir()
    with staging_folder(out, False) as tmp:
        assert not partial.exists()
        (tmp / "sc2deploy.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_stale_partial_and_old_folders_of_dead_writers_are_removed(tmp_path):
    pid = dead_pid()
    stale = [hidden(tmp_path, f".ck.partial-{pid}-abc_1234"), hidden(tmp_path, f".ck.old-{pid}-zzzzzzzz")]
    write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_live_writers_folder_is_kept(tmp_path):
    out = tmp_path / "ck"
    ours = hidden(tmp_path, f".ck.partial-{os.getpid()}-abcdefgh")  # this process is alive
    locked = hidden(tmp_path, f".ck.partial-{dead_pid()}-lockedxx")  # PID gone, but its lock is held
    fd = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_stale(out) == []
        assert ours.is_dir() and locked.is_dir()
    finally:
        os.close(fd)
    assert remove_stale(out) == [locked]  # the lock is free now and its PID is gone
    assert ours.is_dir()


def test_folders_that_only_look_like_ours_are_never_touched(tmp_path):
    pid = dead_pid()
    target = hidden(tmp_path, "elsewhere")
    lookalikes = [
        hidden(tmp_path, ".ck.partial-abcdefgh"),  # no PID
        hidden(tmp_path, f".ck.partial-{pid}-abc"),  # not 8 random characters
        hidden(tmp_path, f".ck.partial-{pid}-ABCDEFGH"),  # not mkdtemp's characters
        hidden(tmp_path, f".ck.partial-{pid}-abcdefgh.bak"),
        hidden(tmp_path, f"ck.partial-{pid}-abcdefgh"),  # not hidden
        hidden(tmp_path, f".ck2.partial-{pid}-abcdefgh"),  # another output's
        hidden(tmp_path, f".c.partial-{pid}-abcdefgh"),
        hidden(tmp_path, f".CK.partial-{pid}-abcdefgh"),
        hidden(tmp_path, ".ck.partial-0-abcdefgh"),
        hidden(tmp_path, f".ck.staging-{pid}-abcdefgh"),
        hidden(tmp_path, f".ck.partial-{pid}-abcdefg-"),
    ]
    (tmp_path / f".ck.partial-{pid}-filexxxx").write_text("a file, not a folder")
    (tmp_path / f".ck.old-{pid}-linkxxxx").symlink_to(target)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert remove_stale(tmp_path / "ck") == []
    write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["ck"])
    assert all((p / "model.onnx.data").read_text() == "weights" for p in lookalikes + [target])


def test_names_with_regex_characters_are_matched_literally(tmp_path):
    pid = dead_pid()
    other = hidden(tmp_path, f".aXb.partial-{pid}-abcdefgh")  # "a.b" as a pattern would match it
    mine = hidden(tmp_path, f".a.b.partial-{pid}-abcdefgh")
    assert remove_stale(tmp_path / "a.b") == [mine]
    assert other.is_dir()


def test_a_refused_destination_cleans_nothing_and_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    stale = hidden(tmp_path, f".ck.partial-{dead_pid()}-abcdefgh")
    with pytest.raises(UserError, match="not empty"):
        with staging_folder(out, False):
            pass
    assert stale.is_dir()  # nothing is written, so nothing is cleaned up either
    with pytest.raises(RuntimeError):
        with staging_folder(tmp_path / "new", False) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "ck"]


def test_force_replaces_without_leaving_the_old_output(tmp_path):
    out = tmp_path / "a"
    for n in range(2):
        with staging_folder(out, True) as tmp:
            (tmp / "sc2deploy.json").write_text(str(n))
    assert (out / "sc2deploy.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
