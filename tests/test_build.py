"""`sc2deploy build` without TensorRT: settings, profiles, the graph handed to the parser, the engine
manifest and its load-time checks, the CLI's answer on a machine without TensorRT, and mypy over
the TensorRT code with the tensorrt-stubs type stubs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sc2deploy.build import (DECODE, PREFILL, Artifact, BuildSettings, check_destination, engine_manifest, open_artifact,
                             prepare_graph, prepare_model_bytes, profiles, resolve_settings, write_engine_folder)
from sc2deploy.contract import (ARTIFACT, ATTENTION_MASK, ENGINE, ENGINE_FILE, INPUT_IDS, MANIFEST, Manifest,
                                check_engine_manifest, engine_limits, graph_io, past_name, read_manifest, write_manifest)
from sc2deploy.cli import main
from sc2deploy.config import preset
from sc2deploy.errors import UserError
from sc2deploy.plugins.trt_env import tensorrt_available, version_tuple

REPO = Path(__file__).resolve().parents[1]
NO_TRT = pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here: the no-TensorRT path cannot run")


# ---------------------------------------------------------------- settings
def test_size_presets_pick_the_limits():
    s15 = resolve_settings(preset("15b"), "bf16")
    assert (s15.max_batch, s15.max_input_len, s15.max_seq_len, s15.plugin) == (8, 4096, 16384, "aot")
    assert s15.capacity(preset("15b")) == 4096  # the window, not the 16,384-token context
    assert resolve_settings(preset("3b"), "fp16").max_batch == 16
    tiny = resolve_settings(preset("tiny"), "fp32")
    assert (tiny.max_batch, tiny.max_input_len, tiny.max_seq_len) == (4, 64, 1024)
    assert resolve_settings(preset("tiny"), "fp32", max_seq_len=20).capacity(preset("tiny")) == 20
    odd = preset("tiny").replace(hidden_size=128)  # no preset: defaults from the context
    assert resolve_settings(odd, "fp16").max_seq_len == 1024


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="bf16"), "exported in fp16"),
    (dict(dtype="int8"), "unknown --dtype"),
    (dict(max_seq_len=2048), "exceeds the model's context of 1024"),
    (dict(max_input_len=128, max_seq_len=64), "--max-input-len 128 exceeds --max-seq-len 64"),
    (dict(plugin="cuda"), "unknown --plugin"),
    (dict(optimization_level=9), "0..5"),
])
def test_inconsistent_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_settings(preset("tiny"), "fp16", **kwargs)


# ---------------------------------------------------------------- profiles
@pytest.mark.parametrize("size", ["tiny", "15b"])
def test_profiles_cover_every_input_and_order_min_opt_max(size):
    config = preset(size)
    settings = resolve_settings(config, "bf16")
    prefill, decode = profiles(config, settings)
    assert (prefill.name, decode.name) == (PREFILL, DECODE)
    inputs, _ = graph_io(config.num_hidden_layers, "trt")
    c, b = settings.capacity(config), settings.max_batch
    for profile in (prefill, decode):
        assert sorted(profile.shapes) == sorted(inputs)
        for name, (lo, opt, hi) in profile.shapes.items():
            assert all(x <= y <= z for x, y, z in zip(lo, opt, hi)), (profile.name, name)
        assert profile.shapes[past_name(0, "key")][2] == (b, config.num_key_value_heads, c, config.head_dim)
        assert {s[2] for lo_opt_hi in profile.shapes.values() for s in lo_opt_hi if len(s) == 4} == {c}
    assert prefill.shapes[INPUT_IDS][2] == (b, settings.max_input_len)
    assert prefill.shapes[ATTENTION_MASK][2] == (b, settings.max_seq_len)  # chunked prompts see the whole past
    assert decode.shapes[INPUT_IDS] == ((1, 1), (b, 1), (b, 1))
    assert decode.shapes[ATTENTION_MASK][2] == (b, settings.max_seq_len)


# ---------------------------------------------------------------- the graph the parser gets
def fake_graph(layers=2, op=None, **overrides):
    """`layers` RopeCache -> SlidingWindowGQA pairs, wired as the export wires them; `overrides` change the
    attributes of the nodes of `op` (None: of both)."""
    from onnx import TensorProto, helper

    from sc2deploy.plugins.trt_rules import ATTENTION, ROPE

    base = {ROPE.name: dict(num_heads=4, kv_num_heads=2, head_size=16, rope_theta=10000.0),
            ATTENTION.name: dict(num_heads=4, kv_num_heads=2, head_size=16, local_window_size=32, scale=0.25)}
    nodes = []
    for i in range(layers):
        for spec in (ROPE, ATTENTION):
            attrs = dict(base[spec.name], plugin_namespace="sc2deploy", plugin_version="1")
            if op in (None, spec.name):
                attrs.update(overrides)
            attrs = {k: v for k, v in attrs.items() if v is not None}
            inputs = [f"{spec.name}{i}.{n}" for n in spec.inputs]
            if spec is ATTENTION:
                inputs[:2] = [f"{ROPE.name}{i}.q_rot", f"{ROPE.name}{i}.k_rot"]
            nodes.append(helper.make_node(spec.name, inputs, [f"{spec.name}{i}.{n}" for n in spec.outputs],
                                          name=f"layer{i}/{spec.name}", domain="trt.plugins", **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q0", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"o{layers - 1}", TensorProto.FLOAT, [1])])
    return helper.make_model(graph)


@pytest.mark.parametrize("plugin, aot", [("aot", 1), ("jit", 0)])
def test_prepare_graph_marks_plugin_nodes(plugin, aot):
    from onnx import helper

    model = fake_graph()
    assert prepare_graph(model, preset("tiny"), plugin) == 4  # two layers, two plugins each
    assert prepare_graph(model, preset("tiny"), plugin) == 4  # idempotent: one "aot" attribute
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["aot"] == aot and [a.name for a in node.attribute].count("aot") == 1


@pytest.mark.parametrize("graph, message", [
    (dict(layers=3), "3 RopeCache nodes for 2 layers"),
    (dict(op="SlidingWindowGQA", scale=None), "'layer0/SlidingWindowGQA' lacks attribute(s) ['scale']"),
    (dict(op="RopeCache", kv_num_heads=None), "'layer0/RopeCache' lacks attribute(s) ['kv_num_heads']"),
    (dict(plugin_namespace="other"), "other::RopeCache"),
    (dict(op="SlidingWindowGQA", num_heads=8), "'num_heads': 8"),
    (dict(op="RopeCache", num_heads=8), "'num_heads': 8"),
    (dict(local_window_size=16), "local_window_size"),
])
def test_prepare_graph_refuses_foreign_nodes(graph, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prepare_graph(fake_graph(**graph), preset("tiny"), "aot")


def test_prepare_graph_refuses_the_one_node_graph_of_older_exports():
    """Before RopeCache, one SlidingWindowGQA node took the contract's nine inputs and gave three outputs."""
    model = fake_graph()
    for node in [n for n in model.graph.node if n.op_type == "RopeCache"]:
        model.graph.node.remove(node)
    with pytest.raises(UserError, match="0 RopeCache nodes for 2 layers.*re-export"):
        prepare_graph(model, preset("tiny"), "aot")
    model = fake_graph()
    old = next(n for n in model.graph.node if n.op_type == "SlidingWindowGQA")
    old.input.extend(["cos_cache", "sin_cache"])
    old.output.extend(["present_key", "present_value"])
    with pytest.raises(UserError, match="has 9 inputs and 3 outputs; the plugin takes 7 and gives 1.*re-export"):
        prepare_graph(model, preset("tiny"), "aot")


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    """A real `export --target trt` artifact of the tiny preset (random weights)."""
    pytest.importorskip("onnxscript")
    out = tmp_path_factory.mktemp("export") / "tiny-trt"
    assert main(["export", "--size", "tiny", "--target", "trt", "--dtype", "fp16", "--out", str(out)]) == 0
    return out


def test_real_artifact_is_what_build_expects(trt_artifact):
    import onnx

    artifact = open_artifact(trt_artifact)
    assert (artifact.dtype, artifact.config) == ("fp16", preset("tiny"))
    data, count = prepare_model_bytes(artifact.model_path, artifact.config, "aot")
    assert count == 2 * preset("tiny").num_hidden_layers
    model = onnx.load_from_string(data)
    inputs, outputs = graph_io(artifact.config.num_hidden_layers, "trt")
    assert [v.name for v in model.graph.input] == inputs and [v.name for v in model.graph.output] == outputs
    # The parser passes the attributes each plugin registered, by name: they must be on its nodes.
    from sc2deploy.plugins.trt_rules import SPECS

    for spec in SPECS.values():
        nodes = [n for n in model.graph.node if n.op_type == spec.name]
        assert len(nodes) == preset("tiny").num_hidden_layers
        for node in nodes:
            names = {a.name for a in node.attribute}
            assert set(spec.attribute_names) | {"plugin_namespace", "plugin_version", "aot"} <= names
            assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
    # Weights stay in the artifact's external-data file (the parser is given the model's path).
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == "model.onnx.data" for t in external for e in t.external_data
                            if e.key == "location")
    assert len(data) < 1 << 20


def test_ort_artifact_is_refused(tmp_path):
    folder = tmp_path / "ort"
    folder.mkdir()
    (folder / "sc2deploy.json").write_text(json.dumps({"format": "sc2deploy-onnx-artifact", "format_version": 1,
                                                       "target": "ort", "files": {}, "config": {}, "dtype": "fp32"}))
    with pytest.raises(UserError, match="--target trt"):
        open_artifact(folder)


# ---------------------------------------------------------------- engine manifest
def manifest_for(tmp_path, **build) -> Manifest:
    config = preset("tiny")
    settings = resolve_settings(config, "fp16", **build)
    exported = Manifest(ARTIFACT, config.to_hf_dict(), "fp16", {"model.onnx": {"sha256": "ab"}},
                        {"target": "trt", "source": {"kind": "random", "seed": 3}})
    artifact = Artifact(tmp_path, exported, config, "fp16", tmp_path / "model.onnx")
    return engine_manifest(artifact=artifact, settings=settings, tensorrt_version="10.13.0.35",
                           gpu={"name": "NVIDIA H200", "compute_capability": "9.0"}, plugin_hash="f" * 64,
                           build_seconds=12.34, engine_bytes=10, engine_sha256="00")


def here(**overrides):
    values = dict(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0",
                  plugin_hash="f" * 64)
    values.update(overrides)
    return values


def test_manifest_records_what_the_engine_depends_on(tmp_path):
    m = manifest_for(tmp_path, max_batch=2, plugin="jit")
    assert m.details["tensorrt_version"] == "10.13.0.35"
    assert m.details["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert m.plugin == {"namespace": "sc2deploy", "version": "1", "names": ["RopeCache", "SlidingWindowGQA"],
                           "mode": "jit", "hash": "f" * 64}
    build = m.details["build"]
    assert build["max_batch"] == 2 and build["capacity"] == 32 and build["strongly_typed"]
    assert [p["name"] for p in m.details["profiles"]] == [PREFILL, DECODE]
    assert m.source == {"kind": "random", "seed": 3} and m.config["num_hidden_layers"] == 2  # for `parity`
    assert engine_limits(m) == (2, 64, 1024, 32)
    assert check_engine_manifest(m, **here()) == []


def test_other_tensorrt_version_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        check_engine_manifest(manifest_for(tmp_path), **here(tensorrt_version="10.14.1.48"))
    assert "built with TensorRT 10.13.0.35" in str(e.value) and "10.14.1.48 is installed" in str(e.value)
    assert "sc2deploy build" in str(e.value)


def test_other_gpu_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        check_engine_manifest(manifest_for(tmp_path), **here(gpu_name="NVIDIA A100-SXM4-80GB",
                                                              compute_capability="8.0"))
    message = str(e.value)
    assert "NVIDIA H200 (compute capability 9.0)" in message and "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message


def test_same_architecture_other_gpu_and_plugin_changes(tmp_path):
    warnings = check_engine_manifest(manifest_for(tmp_path), **here(gpu_name="NVIDIA H100 80GB HBM3"))
    assert len(warnings) == 1 and "tuned on NVIDIA H200" in warnings[0]
    assert "embedded" in check_engine_manifest(manifest_for(tmp_path), **here(plugin_hash="0" * 64))[0]
    with pytest.raises(UserError, match="plugin code changed"):
        check_engine_manifest(manifest_for(tmp_path, plugin="jit"), **here(plugin_hash="0" * 64))


def test_engine_folder_round_trip_and_refusals(tmp_path):
    out = tmp_path / "engine"
    (tmp_path / "tokenizer.json").write_text("{}")
    def with_plan(n, sha):
        m = manifest_for(tmp_path)
        m.details["engine"] = {"file": ENGINE_FILE, "bytes": n, "sha256": sha}
        return m

    written = write_engine_folder(out, b"PLAN", with_plan, {"tokenizer.json": tmp_path / "tokenizer.json"}, force=False)
    assert (out / ENGINE_FILE).read_bytes() == b"PLAN" and written.engine["bytes"] == 4
    assert json.loads((out / "config.json").read_text())["model_type"] == "starcoder2"
    assert read_manifest(out, ENGINE).engine["sha256"] == written.engine["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine.partial")]
    with pytest.raises(UserError, match="--force"):
        check_destination(out, force=False)
    check_destination(out, force=True)
    with pytest.raises(UserError, match="not an sc2deploy engine folder"):
        check_destination(tmp_path, force=True)  # --force never wipes a folder that is not an engine


@pytest.mark.parametrize("content, message", [
    (None, "no sc2deploy.json"),
    ({"format": "sc2deploy-onnx-artifact"}, "build an engine from it"),
    ({"format": "sc2deploy-tensorrt-engine", "format_version": 99}, "upgrade sc2deploy"),
    ({"format": "sc2deploy-tensorrt-engine", "format_version": 1}, "lacks 'tensorrt_version'"),
])
def test_bad_engine_folders(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST).write_text(json.dumps(content))
    with pytest.raises(UserError, match=re.escape(message)):
        read_manifest(tmp_path, ENGINE)


def test_version_tuple():
    assert version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert version_tuple("11.1.0rc1") == (11, 1, 0)
    assert version_tuple("10.9") >= (10, 9) > version_tuple("10.8.0.43")


# ---------------------------------------------------------------- without TensorRT: exit 2, what to install
def fake_engine_folder(tmp_path) -> Path:
    folder = tmp_path / "engine"
    folder.mkdir()
    manifest = manifest_for(tmp_path)
    manifest.details["engine"] = {"file": ENGINE_FILE, "bytes": 4, "sha256": "x"}
    write_manifest(folder, manifest)
    (folder / "config.json").write_text(json.dumps(manifest.config))
    (folder / ENGINE_FILE).write_bytes(b"PLAN")
    shutil.copyfile(REPO / "sc2deploy" / "data" / "tokenizer.json", folder / "tokenizer.json")
    return folder


@NO_TRT
@pytest.mark.parametrize("command", ["build", "generate", "parity", "serve", "selftest"])
def test_trt_commands_without_tensorrt_exit_2_and_say_what_to_install(command, tmp_path, capsys):
    engine = fake_engine_folder(tmp_path)
    args = {
        "build": ["build", str(tmp_path / "artifact"), "--out", str(tmp_path / "out")],
        "generate": ["generate", "--backend", "trt", "--engine", str(engine), "--prompt", "def f():"],
        "parity": ["parity", str(engine), "--backend", "trt"],
        "serve": ["serve", "--backend", "trt", "--engine", str(engine), "--port", "0"],
        "selftest": ["selftest", "--gpu"],
    }[command]
    if command == "serve":
        pytest.importorskip("grpc_health")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "Dockerfile.gpu" in err and ("TensorRT" in err or "GPU" in err), err
    assert err.strip().startswith(f"sc2deploy {command}: error:")


def test_build_help_reads_like_a_man_page(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    for flag in ("--dtype", "--max-batch", "--max-input-len", "--max-seq-len", "--plugin", "15b: batch 8"):
        assert flag in out


# ---------------------------------------------------------------- mypy with tensorrt-stubs
TYPED = ["sc2deploy/plugins/trt_plugin.py", "sc2deploy/build.py", "sc2deploy/runtime/tensorrt.py",
         "sc2deploy/plugins/trt_kernels.py", "sc2deploy/plugins/trt_rules.py", "sc2deploy/plugins/trt_env.py",
         "sc2deploy/commands/build.py", "sc2deploy/commands/selftest.py"]
MYPY_CONFIG = """[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
[mypy-tensorrt.*]
ignore_errors = True
[mypy-tensorrt_bindings.*]
ignore_errors = True
"""


def _split_params(text: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + ([current] if current.strip() else [])


def _fix_stub_line(line: str) -> str:
    """tensorrt-stubs 10.13 has two kinds of syntax errors: a parameter named `in`, and a parameter without a
    default after one with a default. Rename the first and give the second `= ...`."""
    m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$", line)
    if not m:
        return line
    fixed, seen_default = [], False
    for param in (p.strip() for p in _split_params(m.group(2))):
        param = re.sub(r"^in:", "in_:", param)
        if param.startswith("*"):
            fixed.append(param)
            continue
        if "=" in param:
            seen_default = True
        elif seen_default:
            param += " = ..."
        fixed.append(param)
    return m.group(1) + ", ".join(fixed) + m.group(3)


def typecheck_tensorrt_code(work: Path) -> subprocess.CompletedProcess:
    """mypy over the TensorRT code against a syntax-repaired copy of the installed tensorrt-stubs.

    The stubs install as a plain `tensorrt/` folder without py.typed, so mypy would silently treat
    tensorrt as untyped; on MYPYPATH (repaired) they type-check every TensorRT call we make. They have
    no stubs for tensorrt.plugin: the plugin's decorators and its TensorDesc/Tensor are Any to mypy.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    stubs = work / "stubs"
    for package in ("tensorrt", "tensorrt_bindings"):
        for pyi in (site / package).glob("*.pyi"):
            target = stubs / package / pyi.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(_fix_stub_line(x) for x in pyi.read_text().splitlines()) + "\n")
    (work / "mypy.ini").write_text(MYPY_CONFIG)
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(work / "mypy.ini"),
                           "--cache-dir", str(work / "cache"), *TYPED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tensorrt_code_type_checks_with_tensorrt_stubs(tmp_path):
    pytest.importorskip("mypy")
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.skip("tensorrt-stubs is not installed (scripts/setup.sh installs it with --no-deps)")
    result = typecheck_tensorrt_code(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The stubs really are in use: a misspelt TensorRT call fails.
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger()).create_netwrk(0)\n")
    bad = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
                          "--cache-dir", str(tmp_path / "cache"), str(probe)], cwd=REPO,
                         env=dict(os.environ, MYPYPATH=str(tmp_path / "stubs")), capture_output=True, text=True)
    assert bad.returncode == 1 and "create_netwrk" in bad.stdout


def test_build_settings_are_plain_data():
    s = BuildSettings("fp16", 2, 16, 64)
    assert s.flags() == {"dtype": "fp16", "max_batch": 2, "max_input_len": 16, "max_seq_len": 64, "plugin": "aot",
                         "optimization_level": 3, "workspace_mib": None}


# ---------------------------------------------------------------- selftest
def test_selftest_without_gpu_reports_the_environment(capsys):
    assert main(["selftest"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "environment" and summary["ok"] and summary["eager_tiny"]["ok"]
    assert {"torch", "cuda_available", "triton", "tensorrt"} <= set(summary["environment"])


def test_selftest_parts_record_failures_and_go_on():
    from sc2deploy.commands import selftest

    summary: dict = {"errors": []}

    def broken():
        raise RuntimeError("kernel exploded")

    assert selftest._part(summary, "kernel", broken) == {"ok": False, "error": "RuntimeError: kernel exploded",
                                                         "seconds": 0.0}
    assert summary["errors"][0]["part"] == "kernel" and "Traceback" in summary["errors"][0]["traceback"]
    assert selftest._part(summary, "eager", lambda: {"ok": True})["ok"]
