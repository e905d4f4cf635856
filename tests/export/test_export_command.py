"""`sc2deploy export` from the command line: results, and bad input refused with a message (no traceback)."""
from __future__ import annotations

import json

import pytest

from sc2deploy.cli import main
from sc2deploy.config import Config
from sc2deploy.errors import UserError
from sc2deploy.contract import MANIFEST


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_random_weights_with_notice_and_json(tmp_path, capsys):
    code, out, err = run(capsys, "--size", "tiny", "--target", "trt", "--out", str(tmp_path / "a"), "--json",
                         "--weights-seed", "3")
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


@pytest.mark.parametrize("case, change, message", [
    ("garbage tokenizer", lambda folder: (folder / "tokenizer.json").write_text("garbage"),
     "cannot read tokenizer file"),
    ("not a StarCoder2 tokenizer", lambda folder: (folder / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})),
     "is not a StarCoder2 tokenizer"),
    ("sliding_window -1", lambda folder: edit_config(folder, sliding_window=-1), "sliding_window is -1"),
    ("max_position_embeddings 0", lambda folder: edit_config(folder, max_position_embeddings=0),
     "max_position_embeddings is 0"),
])
def test_export_refuses_what_loading_refuses_and_leaves_nothing(store, tmp_path, capsys, case, change, message):
    """What `generate --checkpoint` refuses (config values, tokenizer.json) fails the export, not the artifact's
    first use: exit 2, one line, no artifact and no partial folder."""
    import shutil

    from sc2deploy.tokenizer import Tokenizer

    folder = tmp_path / "ck"
    shutil.copytree(store.checkpoint()[0], folder)
    change(folder)
    with pytest.raises(UserError, match=message):  # the same refusal as the artifact's users would give
        Tokenizer.load(folder) if "tokenizer" in case else Config.load(folder)
    code, out, err = run(capsys, "--checkpoint", str(folder), "--out", str(tmp_path / "a"))
    assert code == 2 and out == "" and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
