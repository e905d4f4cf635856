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
    assert main(["checkpoint", "--size", "tiny", "--out", str(folder), "--weights-seed", "3"]) == 0
    return folder


def test_info_json(capsys):
    code, out, _ = run_cli(["info", "--size", "15b", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["kv_bytes_per_token"]["bf16"] == 80 * 1024
    cache = info["cache_bytes_full_context"]
    assert cache["without_window"]["bf16"] == 4 * cache["with_window"]["bf16"]


def test_generate_json_from_checkpoint_matches_size_preset(tiny_checkpoint, capsys):
    common = ["generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--json"]
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
                            "--fim-suffix", "\n", "--max-tokens", "4", "--json"], capsys)
    tok = Tokenizer.load()
    assert code == 0
    assert json.loads(out)["prompt_ids"] == [1] + tok.encode("def f(x):\n    return ") + [3] + tok.encode("\n") + [2]


BAD_INPUT = {
    "unknown size": (["generate", "--size", "20b", "--prompt", "x"], "unknown size '20b'"),
    "empty prompt": (["generate", "--size", "tiny", "--prompt", ""], "prompt is empty"),
    "zero tokens": (["generate", "--size", "tiny", "--prompt", "x", "--max-tokens", "0"], "at least 1"),
    "negative tokens": (["generate", "--size", "tiny", "--prompt", "x", "--max-tokens", "-3"], "at least 1"),
    "zero tokens, old name": (["generate", "--size", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
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

    code, out, _ = run_cli(["generate", "--checkpoint", tiny_checkpoint, "--prompt", "x", "--max-tokens", "2",
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


# ---------------------------------------------------------------- one name per flag across commands
def test_weights_seed_is_one_flag_and_the_old_checkpoint_seed_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    from sc2deploy.checkpoint import CheckpointSource

    for command in (["checkpoint", "--size", "tiny", "--out", str(tmp_path / "c")],
                    ["export", "--size", "tiny", "--out", str(tmp_path / "e")]):
        code, out, err = run_cli(command + ["--seed", "3"], capsys)
        assert code == 2 and not out and err.count("\n") == 1
        assert "--seed is now --weights-seed" in err and "give --weights-seed 3" in err
        assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()
    for command in ("checkpoint", "export", "generate", "serve"):
        help_text = subprocess.run([sys.executable, "-m", "sc2deploy.cli", command, "--help"], capture_output=True,
                                   text=True).stdout
        assert "--weights-seed" in help_text, command
        # --seed, where it exists, is the sampling seed (generate; complete): never the weights
        assert ("--seed" in help_text.replace("--weights-seed", "")) == (command == "generate"), command
    # --weights-seed 3 is the weights the fixture wrote with it: generate from the preset and the seed matches
    code, out, _ = run_cli(["generate", "--size", "tiny", "--weights-seed", "3", "--prompt-ids", "1,2,3",
                            "--max-tokens", "4", "--json"], capsys)
    code2, out2, _ = run_cli(["generate", "--checkpoint", tiny_checkpoint, "--prompt-ids", "1,2,3", "--max-tokens",
                              "4", "--json"], capsys)
    assert code == code2 == 0 and json.loads(out)["output_ids"] == json.loads(out2)["output_ids"]
    assert CheckpointSource(tiny_checkpoint).config.num_hidden_layers == 2


def test_max_tokens_and_its_old_name(capsys):
    common = ["generate", "--size", "tiny", "--prompt-ids", "1,2,3", "--json"]
    code, out, _ = run_cli(common + ["--max-tokens", "5"], capsys)
    new = json.loads(out)
    code2, out, _ = run_cli(common + ["--max-new-tokens", "5"], capsys)
    assert code == code2 == 0 and new["output_ids"] == json.loads(out)["output_ids"]
    assert len(new["output_ids"]) == 5 and new["finish_reason"] == "length"
    help_text = subprocess.run([sys.executable, "-m", "sc2deploy.cli", "generate", "--help"], capture_output=True,
                               text=True).stdout
    assert "--max-tokens" in help_text and "--max-new-tokens" not in help_text


# ---------------------------------------------------------------- errors that point the right way
def test_generate_infers_the_backend_from_artifact_as_serve_does(store, capsys):
    from sc2deploy.cli import build_parser
    from sc2deploy.commands.common import infer_backend

    artifact = store.artifact()
    code, out, err = run_cli(["generate", "--artifact", artifact, "--prompt-ids", "1,2,3", "--max-tokens", "3",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["backend"] == "ort" and len(json.loads(out)["output_ids"]) == 3
    for command in ("generate", "serve"):
        parse = build_parser().parse_args
        assert infer_backend(parse([command, "--artifact", "a"])) == "ort"
        assert infer_backend(parse([command, "--engine", "e"])) == "trt"
        assert infer_backend(parse([command, "--size", "tiny"])) == "eager"
        assert infer_backend(parse([command, "--artifact", "a", "--backend", "eager"])) == "eager"


def test_generate_names_the_folder_that_is_missing_or_of_the_wrong_kind(store, tiny_checkpoint, tmp_path, capsys):
    artifact = store.artifact()
    cases = [
        (["--artifact", tmp_path / "nope"], f"--artifact {tmp_path / 'nope'}: no such folder; give the folder made by "
                                            "`sc2deploy export --target ort`"),
        (["--backend", "ort"], "the ort backend needs --artifact DIR"),
        (["--checkpoint", artifact], f"--checkpoint {artifact}: this is an export artifact (has sc2deploy.json); "
                                     f"use --artifact {artifact}"),
        (["--artifact", tiny_checkpoint], f"--artifact {tiny_checkpoint}: this is a Hugging Face checkpoint, not an "
                                          f"export; use --checkpoint {tiny_checkpoint}"),
        (["--artifact", artifact, "--dtype", "fp16"], f"--dtype fp16: the artifact {artifact} is fp32 (fixed when it "
                                                      "was made; --dtype applies to the eager and cuda backends); "
                                                      "re-export with `sc2deploy export --dtype fp16`"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["generate", *args, "--prompt", "x", "--max-tokens", "2"], capsys)
        assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, (message, err)
    code, out, _ = run_cli(["generate", "--artifact", artifact, "--dtype", "fp32", "--prompt-ids", "1,2",
                            "--max-tokens", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["dtype"] == "fp32"
    code, _, err = run_cli(["export", "--checkpoint", artifact, "--out", tmp_path / "again"], capsys)
    assert code == 2 and f"--checkpoint {artifact}: this is an export artifact (has sc2deploy.json)" in err


# ---------------------------------------------------------------- long work is not silent when piped
def test_progress_is_logged_when_stderr_is_not_a_terminal(capsys):
    import time

    from sc2deploy.commands.progress import LogBar, StageLog, progress_bar

    with progress_bar(3 * 2**30, "export: writing weights") as bar:
        assert isinstance(bar, LogBar)  # capsys: stderr is not a terminal
        bar.interval = 0.0
        bar.update(2**30)
        bar.update(2**30)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("export: writing weights: 1.0 GiB / 3.0 GiB (33%)")
    assert lines[1].startswith("export: writing weights: 2.0 GiB / 3.0 GiB (67%)") and len(lines) == 3
    with StageLog(interval=0.2) as stage:
        stage("parity: loading the artifact ...")
        time.sleep(0.75)
        stage.end()
        time.sleep(0.3)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "parity: loading the artifact ..."
    assert 2 <= len(lines) <= 5 and all(line.startswith("parity: loading the artifact ... (") for line in lines[1:])
    with StageLog(interval=0.2) as stage:
        stage("generate: loading ...", show=False)  # quiet unless it lasts
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- complete: help, exit statuses, JSON names
def test_complete_help_fim_example_sends_newlines():
    """The FIM example of `complete --help`, run by bash as a user pastes it, passes real newlines."""
    import re
    import shutil

    help_text = subprocess.run([sys.executable, "-m", "sc2deploy.cli", "complete", "--help"], capture_output=True,
                               text=True).stdout
    example = re.search(r"^  (sc2deploy complete [^\n]*--suffix[^\n]*\\\n[^\n]*)$", help_text, re.M)
    assert example, help_text
    command = example.group(1).split("#")[0].replace("sc2deploy complete", "printf '%s\\0'", 1)
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    args = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout.split("\0")
    suffix, prompt = args[args.index("--suffix") + 1], args[-2]
    assert suffix == "    return b\n" and prompt == "def fib(n):\n    a, b = 0, 1\n"
    assert "\\n" not in suffix + prompt


@pytest.fixture(scope="module")
def keyed_server():
    """A real completion server on 127.0.0.1 (tiny preset, eager) that wants the API key "k"."""
    pytest.importorskip("grpc_health")
    from sc2deploy.checkpoint import RandomSource
    from sc2deploy.config import preset
    from sc2deploy.runtime import open_runtime
    from sc2deploy.serving.server import CompletionServer, ServerOptions
    from sc2deploy.tokenizer import Tokenizer

    source = RandomSource(preset("tiny"), 0)
    runtime = open_runtime("eager", source=source, max_batch=2, capacity=source.config.cache_positions())
    server = CompletionServer(runtime, Tokenizer.load(), ServerOptions(host="127.0.0.1", port=0, api_keys=["k"]))
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=1.0)


def test_complete_exit_statuses(keyed_server, tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("SC2DEPLOY_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("k\n")
    keyed = ["complete", "--server", keyed_server, "--api-key-file", key]
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    cases = [
        (keyed + ["--max-tokens", "5000", "x"], 2, f"the server at {keyed_server} answered INVALID_ARGUMENT: "),
        (["complete", "--server", keyed_server, "x"], 2, "UNAUTHENTICATED"),
        (["complete", "--server", closed, "--timeout", "5", "x"], 2, f"cannot reach a server at {closed} "
                                                                     "(UNAVAILABLE: "),
        (keyed + ["--timeout", "0.000001", "x"], 1, "DEADLINE_EXCEEDED"),
    ]
    for args, status, message in cases:
        code, out, err = run_cli(args, capsys)
        assert code == status and message in err, (args, code, err)
        assert err.count("\n") == 1 and "Traceback" not in err and not out
    _, _, err = run_cli(["complete", "--server", keyed_server, "x"], capsys)
    assert "--api-key-file FILE or SC2DEPLOY_API_KEY" in err
    _, _, err = run_cli(["complete", "--server", closed, "--timeout", "5", "x"], capsys)
    assert "is `sc2deploy serve` running there? check --server HOST:PORT" in err


def test_complete_and_generate_name_finish_reasons_alike(keyed_server, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("k\n")
    keyed = ["complete", "--server", keyed_server, "--api-key-file", key, "--max-tokens", "3", "--json"]
    code, out, _ = run_cli(keyed + ["def f():"], capsys)
    served = json.loads(out)
    code2, out, _ = run_cli(["generate", "--size", "tiny", "--prompt", "def f():", "--max-tokens", "3", "--json"],
                            capsys)
    generated = json.loads(out)
    assert code == code2 == 0 and served["finish_reason"] == generated["finish_reason"] == "length"
    code, out, _ = run_cli(keyed + ["--stream", "def f():"], capsys)
    chunks = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and chunks[-1]["finish_reason"] == "length"
    assert all("finish_reason" not in c for c in chunks[:-1])


# ---------------------------------------------------------------- --json where a program reads the result
def test_checkpoint_json_describes_what_was_written(tmp_path, capsys):
    from sc2deploy.config import preset

    out = tmp_path / "ck"
    code, stdout, _ = run_cli(["checkpoint", "--size", "tiny", "--out", out, "--weights-seed", "5", "--dtype", "fp16",
                               "--json"], capsys)
    written = json.loads(stdout)
    assert code == 0
    assert {k: written[k] for k in ("folder", "size", "dtype", "seed")} == {"folder": str(out), "size": "tiny",
                                                                           "dtype": "fp16", "seed": 5}
    assert written["files"] == {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(written["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert written["bytes"] == sum(written["files"].values())
    assert written["parameters"] == preset("tiny").num_parameters == written["weight_bytes"] // 2
    assert sum(t.numel() for t in load_file(out / "model.safetensors").values()) == written["parameters"]


@pytest.mark.parametrize("command", ["info", "checkpoint", "generate", "export", "parity", "serve", "complete",
                                     "build", "selftest"])
def test_every_command_whose_result_a_program_reads_takes_json(command):
    from sc2deploy.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert "--json" in sub._option_string_actions, command


# ---------------------------------------------------------------- serve options from SC2DEPLOY_* variables
def serve_args(argv, env, monkeypatch):
    from sc2deploy.cli import build_parser

    for name in [n for n in os.environ if n.startswith("SC2DEPLOY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["serve", *argv])


def test_serve_takes_every_option_from_the_environment_and_the_command_line_wins(monkeypatch):
    env = {"SC2DEPLOY_MAX_BATCH": "16", "SC2DEPLOY_API_KEY_FILE": "/run/keys", "SC2DEPLOY_GRACE": "2.5",
           "SC2DEPLOY_LOG_FORMAT": "json", "SC2DEPLOY_JSON": "true", "SC2DEPLOY_PORT": "0", "SC2DEPLOY_SIZE": "tiny",
           "SC2DEPLOY_WEIGHTS_SEED": "7", "SC2DEPLOY_CONTEXT": ""}
    args = serve_args([], env, monkeypatch)
    assert (args.max_batch, args.api_key_file, args.grace, args.log_format, args.json, args.port, args.size,
            args.weights_seed, args.context) == (16, "/run/keys", 2.5, "json", True, 0, "tiny", 7, None)
    args = serve_args(["--max-batch", "4", "--log-format", "text", "--port", "9"], env, monkeypatch)
    assert (args.max_batch, args.log_format, args.port, args.grace) == (4, "text", 9, 2.5)
    assert serve_args([], {"SC2DEPLOY_JSON": "0"}, monkeypatch).json is False
    assert serve_args([], {}, monkeypatch).max_batch == 8  # the default without a variable
    # every option of serve has its variable, named in --help
    from sc2deploy.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    help_text = " ".join(sub.format_help().split())
    for action in sub._actions:
        flags = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        if flags:
            assert f"[env SC2DEPLOY_{flags[0][2:].upper().replace('-', '_')}]" in help_text, flags[0]
    assert "SC2DEPLOY_MAX_BATCH=16" in help_text


@pytest.mark.parametrize("name, value, message", [
    ("SC2DEPLOY_MAX_BATCH", "abc", "SC2DEPLOY_MAX_BATCH='abc' is not a valid --max-batch ('abc' is not an integer)"),
    ("SC2DEPLOY_MAX_BATCH", "0", "SC2DEPLOY_MAX_BATCH='0' is not a valid --max-batch (must be at least 1, got 0)"),
    ("SC2DEPLOY_GRACE", "soon", "SC2DEPLOY_GRACE='soon' is not a valid --grace (not a valid float)"),
    ("SC2DEPLOY_LOG_LEVEL", "loud", "SC2DEPLOY_LOG_LEVEL='loud' is not a valid --log-level; choose one of debug"),
    ("SC2DEPLOY_JSON", "maybe", "SC2DEPLOY_JSON='maybe' is not a switch value for --json"),
])
def test_a_bad_variable_is_a_one_line_error_naming_it(name, value, message, monkeypatch, capsys):
    for other in [n for n in os.environ if n.startswith("SC2DEPLOY_")]:
        monkeypatch.delenv(other)
    monkeypatch.setenv(name, value)
    code, out, err = run_cli(["serve", "--size", "tiny"], capsys)
    assert code == 2 and not out and err.count("\n") == 1, err
    assert err.startswith(f"sc2deploy serve: error: {message}") and f"unset {name}" in err, err
    # a value on the command line wins, so the variable's bad value does not matter then
    flag = "--" + name[len("SC2DEPLOY_"):].lower().replace("_", "-")
    argv = [flag] if name == "SC2DEPLOY_JSON" else [flag, {"SC2DEPLOY_GRACE": "1", "SC2DEPLOY_LOG_LEVEL": "info"}
                                                         .get(name, "2")]
    assert serve_args(argv, {name: value}, monkeypatch) is not None
    # other commands do not read SC2DEPLOY_* variables
    monkeypatch.setenv("SC2DEPLOY_SIZE", "20b")
    code, out, _ = run_cli(["info", "--size", "tiny", "--json"], capsys)
    assert code == 0 and json.loads(out)["name"] == "tiny"
