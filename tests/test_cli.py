"""The CLI of the reference model: useful output, and bad input gives a clear message and exit 2, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from sc2deploy.cli import main


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["checkpoint", "--size", "tiny", "--out", str(folder), "--seed", "3"]) == 0
    return folder


def test_info_json(capsys):
    code, out, _ = run_cli(["info", "--size", "15b", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["kv_bytes_per_token"]["bf16"] == 80 * 1024
    cache = info["cache_bytes_full_context"]
    assert cache["without_window"]["bf16"] == 4 * cache["with_window"]["bf16"]


def test_generate_json_from_checkpoint_matches_size_preset(tiny_checkpoint, capsys):
    common = ["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--json"]
    code, out, _ = run_cli(common + ["--checkpoint", tiny_checkpoint], capsys)
    from_checkpoint = json.loads(out)
    assert code == 0
    assert {"prompt_ids", "output_ids", "text", "finish_reason", "prefill_ms", "decode_tokens_per_s"} <= set(from_checkpoint)
    code, out, err = run_cli(common + ["--size", "tiny", "--weights-seed", "3"], capsys)
    assert code == 0 and "random weights" in err
    assert json.loads(out)["output_ids"] == from_checkpoint["output_ids"]


def test_generate_fim_prompt_ids(tiny_checkpoint, capsys):
    from sc2deploy.tokenizer import Tokenizer

    code, out, _ = run_cli(["generate", "--checkpoint", tiny_checkpoint, "--fim-prefix", "def f(x):\n    return ",
                            "--fim-suffix", "\n", "--max-new-tokens", "4", "--json"], capsys)
    tok = Tokenizer.load()
    assert code == 0
    assert json.loads(out)["prompt_ids"] == [1] + tok.encode("def f(x):\n    return ") + [3] + tok.encode("\n") + [2]


BAD_INPUT = {
    "unknown size": (["generate", "--size", "20b", "--prompt", "x"], "unknown size '20b'"),
    "empty prompt": (["generate", "--size", "tiny", "--prompt", ""], "prompt is empty"),
    "zero tokens": (["generate", "--size", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
    "negative tokens": (["generate", "--size", "tiny", "--prompt", "x", "--max-new-tokens", "-3"], "at least 1"),
    "prompt over context": (["generate", "--size", "tiny", "--prompt-ids", ",".join(["5"] * 1030)], "context of 1024"),
    "bad ids": (["generate", "--size", "tiny", "--prompt-ids", "1,x"], "comma-separated integers"),
    "two prompts": (["generate", "--size", "tiny", "--prompt", "x", "--prompt-ids", "1"], "exactly one"),
    "missing checkpoint": (["generate", "--checkpoint", "/nonexistent/ck", "--prompt", "x"], "does not exist"),
    "unknown backend": (["generate", "--size", "tiny", "--prompt", "x", "--backend", "tpu"], "unknown backend"),
    "checkpoint unknown size": (["checkpoint", "--size", "huge", "--out", "/tmp/never"], "unknown size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_a_clear_error(case, capsys):
    args, message = BAD_INPUT[case]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_corrupt_and_misshaped_checkpoints(tiny_checkpoint, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:, :10].contiguous()
    save_file(tensors, broken / "model.safetensors")
    code, _, err = run_cli(["generate", "--checkpoint", broken, "--prompt", "x"], capsys)
    assert code == 2 and "model.layers.0.self_attn.k_proj.weight" in err and "shape" in err

    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-1000])
    code, _, err = run_cli(["generate", "--checkpoint", broken, "--prompt", "x"], capsys)
    assert code == 2 and "truncated" in err

    (broken / "config.json").write_text("{")
    code, _, err = run_cli(["generate", "--checkpoint", broken, "--prompt", "x"], capsys)
    assert code == 2 and "config.json" in err


def test_device_cpu(tiny_checkpoint, capsys):
    from sc2deploy.cli import build_parser
    from sc2deploy.commands.serve import open_model

    code, out, _ = run_cli(["generate", "--checkpoint", tiny_checkpoint, "--prompt", "x", "--max-new-tokens", "2",
                            "--device", "cpu", "--json"], capsys)
    assert code == 0 and json.loads(out)["output_ids"]
    code, out, _ = run_cli(["parity", tiny_checkpoint, "--backend", "eager", "--device", "cpu", "--decode-steps", "2",
                            "--json"], capsys)
    assert code == 0 and json.loads(out)["passed"]
    runtime = open_model(build_parser().parse_args(["serve", "--size", "tiny", "--device", "cpu", "--max-batch", "1"]))[0]
    assert runtime.device.type == "cpu"


DEVICE_COMMANDS = {"generate": ["generate", "--size", "tiny", "--prompt", "x"],
                   "parity": ["parity", "{checkpoint}", "--backend", "eager"],
                   "serve": ["serve", "--size", "tiny", "--port", "0"]}


@pytest.mark.parametrize("device", ["cuda", "foo"])
@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_unusable_device_is_a_one_line_error(command, device, tiny_checkpoint, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if command == "serve":
        pytest.importorskip("grpc_health")
    args = [a.format(checkpoint=tiny_checkpoint) for a in DEVICE_COMMANDS[command]]
    code, out, err = run_cli(args + ["--device", device], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"sc2deploy {command}: error: ") and err.count("\n") == 1 and "--device" in err, err


def test_console_script_invalid_utf8_and_help():
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    exe = [sys.executable, "-m", "sc2deploy.cli"]
    result = subprocess.run([*map(os.fsencode, exe), b"generate", b"--size", b"tiny", b"--prompt", b"caf\xe9"],
                            capture_output=True, env=env)
    assert result.returncode == 2
    assert b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    for command in ("info", "checkpoint", "generate"):
        help_text = subprocess.run([*exe, command, "--help"], capture_output=True, text=True, env=env)
        assert help_text.returncode == 0 and "usage: sc2deploy " + command in help_text.stdout
