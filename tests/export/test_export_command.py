"""`sc2deploy export` from the command line: results, and bad input refused with a message (no traceback)."""
from __future__ import annotations

import json

import pytest

from sc2deploy.cli import main
from sc2deploy.export.manifest import MANIFEST


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_random_weights_with_notice_and_json(tmp_path, capsys):
    code, out, err = run(capsys, "--size", "tiny", "--target", "trt", "--out", str(tmp_path / "a"), "--json",
                         "--seed", "3")
    assert code == 0, err
    assert "random weights" in err and "seed 3" in err
    summary = json.loads(out)
    assert summary["source"] == {"kind": "random", "seed": 3, "preset": "tiny"}
    assert (tmp_path / "a" / MANIFEST).is_file()


def test_non_empty_folder_needs_force_and_force_replaces_only_an_export(store, tmp_path, capsys):
    folder, _ = store.checkpoint()
    out = tmp_path / "a"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "--checkpoint", str(folder), "--out", str(out))
    assert code == 2 and "not empty; pass --force" in err and "Traceback" not in err
    code, _, err = run(capsys, "--checkpoint", str(folder), "--out", str(out), "--force")
    assert code == 2 and "not an sc2deploy artifact" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run(capsys, "--checkpoint", str(folder), "--out", str(out))[0] == 0
    before = (out / MANIFEST).read_text()
    code, _, err = run(capsys, "--checkpoint", str(folder), "--out", str(out), "--force", "--dtype", "fp16")
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "fp16" != json.loads(before)["dtype"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folders left


@pytest.mark.parametrize("argv, message", [
    (["--target", "onnx"], "unknown target 'onnx'; choose one of ort, trt"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--dtype", "bf16"], "no CPU kernel for bf16 GroupQueryAttention"),
    ([], "give --size SIZE"),
])
def test_bad_target_or_dtype(tmp_path, capsys, argv, message):
    size = [] if not argv else ["--size", "tiny"]
    code, _, err = run(capsys, *size, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_checkpoint_contradicting_size(store, tmp_path, capsys):
    folder, _ = store.checkpoint()
    code, _, err = run(capsys, "--checkpoint", str(folder), "--size", "3b", "--out", str(tmp_path / "a"))
    assert code == 2 and "contradicts the requested size" in err
    assert not (tmp_path / "a").exists()


def test_help_reads_like_a_man_page(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for words in ("--target", "SlidingWindowGQA", "GroupQueryAttention", "sc2deploy.json", "examples:", "exit status"):
        assert words in text
