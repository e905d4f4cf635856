"""ONNX artifact (export --target trt) -> TensorRT engine folder, and the engine manifest's checks.

An engine folder holds:
  model.plan       the serialized engine (one engine, two optimization profiles)
  sc2deploy.json   the manifest: TensorRT version, GPU, plugin hash, build flags, profiles, the
                   model config and the weights' source (so `parity` finds its reference)
  config.json      the model's Hugging Face config; tokenizer.json from the artifact

Profiles. The engine has two, both over the same graph:
  0 "prefill": batch 1..max_batch, sequence 1..max_input_len, attention_mask width up to
               max_seq_len (a prompt longer than max_input_len is prefilled in chunks);
  1 "decode":  batch 1..max_batch, sequence 1.
Every past/present cache input is (batch, Nkv, C, head_dim) with C = min(max_seq_len, window)
fixed: the ring cache of the contract, so a 16,384-token context needs only 4,096 slots.

Engines are tied to the TensorRT version and the GPU (compute capability) that built them; the
manifest records both and `check_engine_manifest` refuses a mismatch with a message that says
what to do, before TensorRT gets a chance to fail on the bytes.

The pure-Python half (settings, profiles, manifest) is tested without TensorRT; `build_engine`
is the TensorRT half, written against TensorRT's Python API (10.9+, 11.x) and type-checked.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sc2deploy.config import PRESETS, Config
from sc2deploy.errors import UserError
from sc2deploy.contract import (ATTENTION_MASK, ENGINE, ENGINE_FILE, INPUT_IDS, MANIFEST, MODEL_FILE, PLUGIN_NAMESPACE,
                                PLUGIN_VERSION, Manifest, graph_io, open_artifact_manifest, past_name, write_manifest)
from sc2deploy.staging import check_destination as _check_destination
from sc2deploy.staging import staging_folder

BUILD_DTYPES = ("fp16", "bf16", "fp32")
PLUGIN_MODES = ("aot", "jit")
PREFILL, DECODE = "prefill", "decode"


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class EngineLimits:
    max_batch: int
    max_input_len: int
    max_seq_len: int


# Per size: slots, longest single prefill, longest sequence. KV per slot is 2 x C x kv_bytes_per_token
# (C = 4096; the runtime keeps a second buffer for the plugin's present output): 3b bf16 240 MB,
# 15b 640 MB a slot, so 16 / 8 / 8 slots leave most of an 80 GB GPU to weights and activations.
PRESET_LIMITS = {
    "3b": EngineLimits(max_batch=16, max_input_len=4096, max_seq_len=16384),
    "7b": EngineLimits(max_batch=8, max_input_len=4096, max_seq_len=16384),
    "15b": EngineLimits(max_batch=8, max_input_len=4096, max_seq_len=16384),
    "bench": EngineLimits(max_batch=8, max_input_len=2048, max_seq_len=16384),
    "tiny": EngineLimits(max_batch=4, max_input_len=64, max_seq_len=1024),
}


def preset_of(config: Config) -> str | None:
    """The preset name whose architecture `config` has (weights and token ids aside)."""
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings", "sliding_window")
    for name, preset in PRESETS.items():
        if all(getattr(preset, f) == getattr(config, f) for f in fields):
            return name
    return None


def default_limits(config: Config) -> EngineLimits:
    name = preset_of(config)
    if name is not None:
        return PRESET_LIMITS[name]
    context = config.max_position_embeddings
    return EngineLimits(max_batch=8, max_input_len=min(4096, context), max_seq_len=context)


@dataclass(frozen=True)
class BuildSettings:
    dtype: str
    max_batch: int
    max_input_len: int
    max_seq_len: int
    plugin: str = "aot"  # aot: Triton kernels inside the engine; jit: Python plugin at run time
    optimization_level: int = 3
    workspace_mib: int | None = None

    def capacity(self, config: Config) -> int:
        """Cache slots per sequence: the ring holds the last min(max_seq_len, window) positions."""
        return config.cache_positions(self.max_seq_len)

    def flags(self) -> dict[str, Any]:
        return asdict(self)


def resolve_settings(config: Config, artifact_dtype: str, *, dtype: str | None = None, max_batch: int | None = None,
                     max_input_len: int | None = None, max_seq_len: int | None = None, plugin: str = "aot",
                     optimization_level: int = 3, workspace_mib: int | None = None) -> BuildSettings:
    """Build flags from the command line, the artifact and the size preset's defaults; UserError if inconsistent."""
    limits = default_limits(config)
    dtype = dtype or artifact_dtype
    if dtype not in BUILD_DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of {', '.join(BUILD_DTYPES)}")
    if dtype != artifact_dtype:
        raise UserError(f"the artifact was exported in {artifact_dtype}, and engines are built strongly typed from the "
                        f"graph's own dtype: re-export with `sc2deploy export --target trt --dtype {dtype}`, or build "
                        f"with --dtype {artifact_dtype}")
    if plugin not in PLUGIN_MODES:
        raise UserError(f"unknown --plugin {plugin!r}; choose aot (kernels in the engine) or jit (Python at run time)")
    context = config.max_position_embeddings
    max_seq_len = max_seq_len or min(limits.max_seq_len, context)
    max_input_len = max_input_len or min(limits.max_input_len, max_seq_len)
    max_batch = max_batch or limits.max_batch
    for name, value in (("--max-batch", max_batch), ("--max-input-len", max_input_len),
                        ("--max-seq-len", max_seq_len)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if max_seq_len > context:
        raise UserError(f"--max-seq-len {max_seq_len} exceeds the model's context of {context} tokens")
    if max_input_len > max_seq_len:
        raise UserError(f"--max-input-len {max_input_len} exceeds --max-seq-len {max_seq_len}")
    if not 0 <= optimization_level <= 5:
        raise UserError(f"--optimization-level must be 0..5, got {optimization_level}")
    return BuildSettings(dtype, max_batch, max_input_len, max_seq_len, plugin, optimization_level, workspace_mib)


# ---------------------------------------------------------------- profiles
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def profiles(config: Config, settings: BuildSettings) -> list[Profile]:
    """The two optimization profiles: index 0 prefill, index 1 decode (the runtime relies on the order)."""
    b, s, t = settings.max_batch, settings.max_input_len, settings.max_seq_len
    c = settings.capacity(config)
    nkv, h = config.num_key_value_heads, config.head_dim
    s_opt = min(s, 512)
    t_dec = min(t, max(2, config.cache_positions(t)))

    def with_cache(ids: tuple[Shape, Shape, Shape], mask: tuple[Shape, Shape, Shape]) -> dict:
        shapes = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        batches = (ids[0][0], ids[1][0], ids[2][0])
        for layer in range(config.num_hidden_layers):
            for kind in ("key", "value"):
                shapes[past_name(layer, kind)] = tuple((n, nkv, c, h) for n in batches)  # type: ignore[assignment]
        return shapes

    prefill = with_cache(((1, 1), (1, s_opt), (b, s)), ((1, 1), (1, s_opt), (b, t)))
    decode = with_cache(((1, 1), (b, 1), (b, 1)), ((1, 1), (b, t_dec), (b, t)))
    return [Profile(PREFILL, prefill), Profile(DECODE, decode)]


def check_graph_io(config: Config, inputs: list[str], outputs: list[str], where: str) -> None:
    want_in, want_out = graph_io(config.num_hidden_layers, "trt")
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
        missing = sorted(set(want_in + want_out) - set(inputs + outputs))
        extra = sorted(set(inputs + outputs) - set(want_in + want_out))
        raise UserError(f"{where} does not have the I/O of an `sc2deploy export --target trt` graph "
                        f"(missing: {missing[:4] or 'none'}, unexpected: {extra[:4] or 'none'}); re-export it")


# ---------------------------------------------------------------- the artifact
@dataclass
class Artifact:
    folder: Path
    manifest: Manifest
    config: Config
    dtype: str
    model_path: Path


def open_artifact(folder: str | Path) -> Artifact:
    """The trt-target artifact at `folder` (files present and whole; hashes are the export's business)."""
    folder = Path(folder)
    manifest = open_artifact_manifest(folder, "trt", hashes=False)
    config = Config.from_hf_dict(manifest.config, source=str(folder / MANIFEST))
    graph = manifest.graph
    model_path = folder / graph.get("file", MODEL_FILE)
    if not model_path.is_file():
        raise UserError(f"{folder} has no {model_path.name}; re-export the artifact")
    if graph.get("inputs") and graph.get("outputs"):
        check_graph_io(config, list(graph["inputs"]), list(graph["outputs"]), str(model_path))
    return Artifact(folder, manifest, config, manifest.dtype, model_path)


# ---------------------------------------------------------------- the graph TensorRT parses
def prepare_graph(model: Any, config: Config, plugin: str) -> int:
    """Check the plugin nodes of a trt-target ModelProto and mark them for `plugin` (aot/jit); returns their count.

    Each layer has one node per plugin of `trt_rules.SPECS` (RopeCache, then SlidingWindowGQA).
    The ONNX parser maps a node to a plugin by op_type and the node's plugin_namespace attribute,
    passes the attributes the plugin registered (all must be on the node) and reads "aot" to
    pick aot_impl (1) or impl (0). Other attributes (head_size, rope_theta, ...) are
    documentation the parser ignores.
    """
    from onnx import helper

    from sc2deploy.plugins.trt_rules import SPECS, PluginRuleError, check_attributes

    expected = {"num_heads": config.num_attention_heads, "kv_num_heads": config.num_key_value_heads,
                "local_window_size": config.sliding_window or 0}
    reexport = "re-export the artifact with this sc2deploy"
    count = 0
    for spec in SPECS.values():
        nodes = [n for n in model.graph.node if n.op_type == spec.name]
        if len(nodes) != config.num_hidden_layers:
            raise UserError(f"the graph has {len(nodes)} {spec.name} nodes for {config.num_hidden_layers} layers; "
                            f"it is not an `sc2deploy export --target trt` graph of this model: {reexport}")
        for node in nodes:
            where = f"{spec.name} node {node.name!r}"
            if (len(node.input), len(node.output)) != (len(spec.inputs), len(spec.outputs)):
                raise UserError(f"{where} has {len(node.input)} inputs and {len(node.output)} outputs; the plugin "
                                f"takes {len(spec.inputs)} and gives {len(spec.outputs)}: {reexport}")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            missing = [a for a in spec.attribute_names if a not in attrs]
            if missing:
                raise UserError(f"{where} lacks attribute(s) {missing}; {reexport}")
            namespace = attrs.get("plugin_namespace", b"")
            namespace = namespace.decode() if isinstance(namespace, bytes) else str(namespace)
            version = attrs.get("plugin_version", b"1")
            version = version.decode() if isinstance(version, bytes) else str(version)
            if namespace != PLUGIN_NAMESPACE or version != PLUGIN_VERSION:
                raise UserError(f"{where} asks for plugin {namespace}::{spec.name} version {version}; this sc2deploy "
                                f"provides {spec.plugin_id} version {PLUGIN_VERSION}")
            wrong = {k: attrs[k] for k, v in expected.items() if k in spec.attribute_names and attrs[k] != v}
            if wrong:
                raise UserError(f"{where} has {wrong}, but the model config says "
                                f"{ {k: expected[k] for k in wrong} }; {reexport}")
            try:
                check_attributes(attrs, config.head_dim)
            except PluginRuleError as e:
                raise UserError(f"{where}: {e}") from None
            for attr in [a for a in node.attribute if a.name == "aot"]:
                node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("aot", int(plugin == "aot")))
        count += len(nodes)
    return count


def prepare_model_bytes(model_path: Path, config: Config, plugin: str) -> tuple[bytes, int]:
    """The artifact's graph (weights stay in the external-data file) ready for TensorRT's parser."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    count = prepare_graph(model, config, plugin)
    return model.SerializeToString(), count


# ---------------------------------------------------------------- engine manifest
def engine_manifest(*, artifact: Artifact, settings: BuildSettings, tensorrt_version: str, gpu: dict[str, str],
                    plugin_hash: str, build_seconds: float, engine_bytes: int, engine_sha256: str) -> Manifest:
    """The engine folder's manifest; "plugin" names the plugins the engine holds and their sources' hash."""
    from sc2deploy import __version__
    from sc2deploy.plugins.trt_rules import SPECS

    inputs, outputs = graph_io(artifact.config.num_hidden_layers, "trt")
    return Manifest(ENGINE, artifact.config.to_hf_dict(), settings.dtype, details={
        "engine": {"file": ENGINE_FILE, "bytes": engine_bytes, "sha256": engine_sha256},
        "tensorrt_version": tensorrt_version,
        "gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]},
        "plugin": {"namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION, "names": list(SPECS),
                   "mode": settings.plugin, "hash": plugin_hash},
        "build": {**settings.flags(), "capacity": settings.capacity(artifact.config), "strongly_typed": True,
                  "seconds": round(build_seconds, 1)},
        "profiles": [p.to_json() for p in profiles(artifact.config, settings)],
        "io": {"inputs": inputs, "outputs": outputs},
        "source": artifact.manifest.source or None,
        "artifact": {"path": str(artifact.folder.resolve()),
                     "files": {k: v.get("sha256") for k, v in artifact.manifest.files.items()}},
        "sc2deploy_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


# ---------------------------------------------------------------- writing the folder
def write_engine_folder(out: Path, engine: bytes | memoryview, manifest_without_hashes: Callable[[int, str], Manifest],
                        extra_files: dict[str, Path], force: bool) -> Manifest:
    """Write model.plan, the manifest and `extra_files` into a temporary folder, then rename it to `out`."""
    import hashlib

    with staging_folder(Path(out), force, "engine folder", ENGINE_MARKERS) as tmp:
        data = bytes(engine)
        (tmp / ENGINE_FILE).write_bytes(data)
        for name, src in extra_files.items():
            shutil.copyfile(src, tmp / name)
        manifest = manifest_without_hashes(len(data), hashlib.sha256(data).hexdigest())
        (tmp / "config.json").write_text(json.dumps(manifest.config, indent=2) + "\n")
        write_manifest(tmp, manifest)
    return manifest


ENGINE_MARKERS = (MANIFEST, ENGINE_FILE)


def check_destination(out: Path, force: bool) -> None:
    _check_destination(out, force, "engine folder", ENGINE_MARKERS)


# ---------------------------------------------------------------- the TensorRT half
@dataclass
class BuildResult:
    folder: Path
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)


def build_engine(artifact_dir: str | Path, out: str | Path, settings: BuildSettings | None = None, *,
                 force: bool = False, verbose: bool = False, log: Callable[[str], None] | None = None,
                 **overrides: Any) -> BuildResult:
    """Parse the trt-target ONNX with the plugins registered, build both profiles, write the engine folder.

    settings=None: `resolve_settings` from `overrides` (dtype, max_batch, max_input_len, max_seq_len, plugin, ...).
    """
    from sc2deploy.plugins.trt_env import gpu_identity, require_cuda, require_tensorrt, require_triton

    require_tensorrt("sc2deploy build")  # first: on a machine without TensorRT nothing else matters
    require_triton("sc2deploy build")
    require_cuda("sc2deploy build")
    import tensorrt as trt  # typed by tensorrt-stubs

    artifact = open_artifact(artifact_dir)
    if settings is None:
        settings = resolve_settings(artifact.config, artifact.dtype, **overrides)
    check_destination(Path(out), force)
    say = log or (lambda message: print(message, file=sys.stderr))

    from sc2deploy.plugins import trt_plugin
    from sc2deploy.plugins.trt_rules import plugin_hash

    trt_plugin.register_plugins()
    start = time.time()
    model_bytes, n_nodes = prepare_model_bytes(artifact.model_path, artifact.config, settings.plugin)
    say(f"parsing {artifact.model_path} ({n_nodes} plugin nodes, {settings.plugin} plugins)")

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    prefer = (trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS if settings.plugin == "aot"
              else trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) | (1 << int(prefer))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes, str(artifact.model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT could not parse {artifact.model_path}: " + "; ".join(errors[:5])
                        + ("" if len(errors) <= 5 else f" (and {len(errors) - 5} more)"))
    names_in = [network.get_input(i).name for i in range(network.num_inputs)]
    names_out = [network.get_output(i).name for i in range(network.num_outputs)]
    check_graph_io(artifact.config, names_in, names_out, str(artifact.model_path))

    config = builder.create_builder_config()
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    for profile in profiles(artifact.config, settings):
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        if config.add_optimization_profile(p) < 0:
            raise UserError(f"TensorRT refused the {profile.name} optimization profile: {profile.to_json()}")
    say(f"building {settings.dtype} engine: batch <= {settings.max_batch}, prefill <= {settings.max_input_len} "
        f"tokens, sequence <= {settings.max_seq_len}, cache {settings.capacity(artifact.config)} slots")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT failed to build the engine (its log above says why); rerun with --verbose")
    seconds = time.time() - start

    gpu = gpu_identity()
    extra = {name: artifact.folder / name for name in ("tokenizer.json",) if (artifact.folder / name).is_file()}

    def manifest_for(nbytes: int, sha: str) -> Manifest:
        return engine_manifest(artifact=artifact, settings=settings, tensorrt_version=str(trt.__version__), gpu=gpu,
                               plugin_hash=plugin_hash(), build_seconds=seconds, engine_bytes=nbytes,
                               engine_sha256=sha)

    manifest = write_engine_folder(Path(out), memoryview(serialized), manifest_for, extra, force)
    return BuildResult(Path(out), manifest)
