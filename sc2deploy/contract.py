"""The artifact contract: what every stage that writes or reads an export artifact or an engine folder agrees on.

One place for the graph's I/O names, the attention node's identity per target, the dtype tables, and the
two folder formats with their manifest (`sc2deploy.json`: one typed Manifest, one writer, one reader, each
format versioned). The exporter, `build`, the runtimes, parity, the genai config and the TensorRT rules
import it; none re-declares any of it. It imports only the standard library, sc2deploy.errors and
sc2deploy.tasks, so a runtime that reads an artifact depends on neither the exporter nor the engine builder.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sc2deploy.errors import UserError
from sc2deploy.tasks import COMMAND_OF_TASK, FEATURE_EXTRACTION, TEXT_GENERATION

# ---------------------------------------------------------------- dtypes
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ONNX_DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT / FLOAT16 / BFLOAT16
DTYPE_OF_ONNX = {v: k for k, v in ONNX_DTYPES.items()}
# What an artifact's initializers may be stored as: the model dtypes, and uint8 for quantized weights.
STORED_BYTES = {**DTYPE_BYTES, "uint8": 1}
STORED_ONNX_DTYPES = {**ONNX_DTYPES, "uint8": 2}  # onnx.TensorProto.UINT8

# ---------------------------------------------------------------- the graph's inputs and outputs
# The names onnxruntime-genai and optimum use.
INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
# An extra input of the ort target with a default of 0 (every position): k > 0 computes the logits of the
# last k positions only.
LOGITS_TO_KEEP = "logits_to_keep"
KV_KINDS = ("key", "value")


# The other heads' artifacts (sc2deploy/tasks.py) are prefill only: no cache inputs or outputs.
LAST_HIDDEN_STATE = "last_hidden_state"


def head_graph_io(task: str) -> tuple[list[str], list[str]]:
    """A head artifact's graph (inputs, outputs): logits of a classifier, else the base model's hidden states."""
    return [INPUT_IDS, ATTENTION_MASK], [LAST_HIDDEN_STATE if task == FEATURE_EXTRACTION else LOGITS]


def past_name(layer: int | str, kind: str) -> str:
    """The cache input of `layer` (or of "%d": onnxruntime-genai's name pattern)."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int | str, kind: str) -> str:
    return f"present.{layer}.{kind}"


def graph_io(num_layers: int, target: str) -> tuple[list[str], list[str]]:
    """The exported graph's (inputs, outputs), in order."""
    pasts = [past_name(i, k) for i in range(num_layers) for k in KV_KINDS]
    presents = [present_name(i, k) for i in range(num_layers) for k in KV_KINDS]
    return [INPUT_IDS, ATTENTION_MASK] + pasts + ([LOGITS_TO_KEEP] if target == "ort" else []), [LOGITS] + presents


# ---------------------------------------------------------------- the attention nodes
TARGETS = ("ort", "trt")
# ort: ONNX Runtime's contrib op, inputs in its order (the optional ones up to query_seqlens).
GQA_DOMAIN, GQA_OP = "com.microsoft", "GroupQueryAttention"
GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
              "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale",
              "q_norm_weight", "k_norm_weight", "query_seqlens")
ATTENTION_OUTPUTS = ("output", "present_key", "present_value")
# Quantized artifacts (export --quant): weights as ONNX Runtime's block-quantized contrib ops, inputs in their order.
QUANT_DOMAIN = GQA_DOMAIN
MATMUL_NBITS_INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")
GATHER_QUANTIZED_INPUTS = ("data", "indices", "scales", "zero_points")
# trt: two TensorRT plugins per layer, found by the ONNX parser from op_type and the plugin_namespace attribute.
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE, PLUGIN_VERSION = "sc2deploy", "1"
ROPE_PLUGIN, ATTENTION_PLUGIN = "RopeCache", "SlidingWindowGQA"
PLUGIN_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                 "cos_cache", "sin_cache")  # RopeCache's: the contract op's own inputs
ROPE_OUTPUTS = ("q_rot", "k_rot", "present_key", "present_value")
ATTENTION_PLUGIN_INPUTS = ("q_rot", "k_rot", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length")


def attention_domain(target: str) -> str:
    return GQA_DOMAIN if target == "ort" else PLUGIN_DOMAIN


def attention_description(target: str, windowed: bool) -> str:
    """What the attention of an artifact is, for its manifest and for people."""
    if target == "trt":
        return (f"{PLUGIN_DOMAIN}::{ROPE_PLUGIN} -> {PLUGIN_DOMAIN}::{ATTENTION_PLUGIN} (plugin_namespace "
                f"{PLUGIN_NAMESPACE}, plugin_version {PLUGIN_VERSION})")
    return f"{GQA_DOMAIN}::{GQA_OP}" + (" (sliding_window_cache=1, query_seqlens)" if windowed else "")


# ---------------------------------------------------------------- the folders
MANIFEST = "sc2deploy.json"  # written last: a folder without it is not finished
MODEL_FILE, DATA_FILE, TOKENIZER_FILE = "model.onnx", "model.onnx.data", "tokenizer.json"
ENGINE_FILE = "model.plan"
ARTIFACT, ENGINE = "artifact", "engine"
FORMATS = {ARTIFACT: ("sc2deploy-onnx-artifact", 1), ENGINE: ("sc2deploy-tensorrt-engine", 1)}
WHAT = {ARTIFACT: "export artifact", ENGINE: "TensorRT engine folder"}
REMEDY = {ARTIFACT: "run `sc2deploy export` again", ENGINE: "build one with `sc2deploy build ARTIFACT --out DIR`"}
REQUIRED = {ARTIFACT: ("target", "files"), ENGINE: ("tensorrt_version", "gpu", "plugin", "build", "engine")}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """sc2deploy.json. `config` is the model's Hugging Face config dict, `files` maps every other file of the
    folder to {"bytes", "sha256"}; `details` holds what only one kind has (an artifact's target, graph and
    source; an engine's TensorRT version, GPU, plugin, build limits, profiles)."""

    kind: str  # ARTIFACT or ENGINE
    config: dict[str, Any]
    dtype: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    version: int = 0  # 0: the current version of `kind`

    def __post_init__(self) -> None:
        self.version = self.version or FORMATS[self.kind][1]

    @property
    def target(self) -> str | None:
        return self.details.get("target") if self.kind == ARTIFACT else "trt"

    @property
    def task(self) -> str:
        """What an artifact's graph computes (sc2deploy/tasks.py); artifacts without one are causal LMs."""
        return str(self.details.get("task", TEXT_GENERATION))

    @property
    def source(self) -> dict[str, Any]:
        """The weights it was made from: {"kind": "checkpoint", "path", "sha256": {file: hash}} or "random"."""
        source = self.details.get("source")
        return source if isinstance(source, dict) else {}

    @property
    def graph(self) -> dict[str, Any]:
        """An artifact's graph: {"file", "external_data", "inputs", "outputs", "opset", ...}."""
        return self.details.get("graph") or {}

    @property
    def engine(self) -> dict[str, Any]:
        """An engine folder's plan: {"file", "bytes", "sha256"}."""
        return self.details.get("engine") or {}

    @property
    def plugin(self) -> dict[str, Any]:
        return self.details.get("plugin") or {}

    def to_json(self) -> dict[str, Any]:
        name = FORMATS[self.kind][0]
        return {"format": name, "format_version": self.version, "config": self.config, "dtype": self.dtype,
                **self.details, "files": self.files}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Manifest:
        """The Manifest in `data` (parsed sc2deploy.json at `path`), or a UserError saying what is wrong and how to fix it."""
        found = data.get("format") if isinstance(data, dict) else None
        kind = next((k for k, (name, _) in FORMATS.items() if name == found), None)
        if kind is None:
            raise UserError(f"{path} is not an sc2deploy manifest (format {found!r}); export or build the folder again")
        assert isinstance(data, dict)
        version, current = data.get("format_version"), FORMATS[kind][1]
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= current:
            newer = isinstance(version, int) and version > current
            raise UserError(f"{path} has {WHAT[kind]} format version {version!r}; this sc2deploy reads version "
                            f"{current}: " + ("upgrade sc2deploy" if newer else REMEDY[kind]))
        rest = {k: v for k, v in data.items() if k not in ("format", "format_version", "config", "dtype", "files")}
        missing = [k for k in (*REQUIRED[kind], "config", "dtype") if k not in data]
        if missing:
            raise UserError(f"{path} lacks {missing[0]!r}; {REMEDY[kind]}")
        files = data.get("files", {})
        if (not isinstance(data["config"], dict) or not isinstance(files, dict)
                or not all(isinstance(entry, dict) for entry in files.values())):
            raise UserError(f"{path} has no valid \"config\" object or \"files\" table; {REMEDY[kind]}")
        return cls(kind, data["config"], str(data["dtype"]), data.get("files", {}), rest, version)


def files_table(folder: Path, known_sha256: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of every file in `folder` but the manifest; `known_sha256` saves rereading."""
    known_sha256 = known_sha256 or {}
    return {p.name: {"bytes": p.stat().st_size, "sha256": known_sha256.get(p.name) or sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def folder_kind(folder: str | Path) -> str | None:
    """ARTIFACT, ENGINE, "checkpoint" (a config.json without a manifest) or None, from a quick look."""
    folder = Path(folder)
    try:
        found = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        found = None
    kind = next((k for k, (name, _) in FORMATS.items() if name == found), None)
    if kind is None and (folder / MANIFEST).is_file():
        return ARTIFACT  # a damaged manifest: reading it says what is wrong
    return kind or ("checkpoint" if (folder / "config.json").is_file() else None)


def read_manifest(folder: str | Path, kind: str | None) -> Manifest:
    """The manifest of the `kind` folder (None: either kind) at `folder`, or a UserError naming the problem and
    the fix."""
    folder = Path(folder)
    path = folder / MANIFEST
    what, remedy = (WHAT[kind], REMEDY[kind]) if kind else ("artifact or engine folder", "export or build it again")
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist; {remedy}")
    if not path.is_file():
        raise UserError(f"{folder} is not an sc2deploy {what} (no {MANIFEST}; an interrupted write lacks it); {remedy}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:200]}); {remedy}") from None
    found = data.get("format") if isinstance(data, dict) else None
    other = next((k for k, (name, _) in FORMATS.items() if name == found and k != kind), None)
    if kind is not None and other is not None:
        if other == ARTIFACT:
            raise UserError(f"{folder} is an export artifact, not an engine: build an engine from it with "
                            "`sc2deploy build`")
        raise UserError(f"{folder} is a TensorRT engine folder, not an export artifact; give the artifact it was "
                        "built from")
    return Manifest.from_json(data, path)


def file_has_sha256(path: Path, sha256: str) -> bool:
    return sha256_file(path) == sha256


def verify_files(folder: str | Path, manifest: Manifest, hashes: bool = True,
                 has_sha256: Callable[[Path, str], bool] = file_has_sha256) -> None:
    """Every file the manifest lists is present and whole, and (with `hashes`) unchanged: `has_sha256` of it and
    its manifest sha256 (a runtime passes a cache's, which can vouch for a file without reading it)."""
    folder = Path(folder)
    redo = "copy the folder again or " + REMEDY[manifest.kind]
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{WHAT[manifest.kind]} {folder} lacks {name}, which its {MANIFEST} lists; {redo}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            what = "truncated" if size < entry.get("bytes", 0) else "changed"
            raise UserError(f"{path} is {what}: {size} bytes, {MANIFEST} says {entry.get('bytes')}; {redo}")
    if hashes:
        for name, entry in manifest.files.items():
            if not has_sha256(folder / name, entry.get("sha256", "")):
                raise UserError(f"{folder / name} does not match the sha256 in {MANIFEST}: the file was changed or "
                                f"corrupted after it was written; {redo}")


def check_external_data(model_path: Path) -> None:
    """Every external-data file `model_path` refers to exists and is long enough (a clear error, not ORT's)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, end in needed.items():
        path = model_path.parent / location
        if not path.is_file():
            raise UserError(f"{path} is missing: {model_path.name} keeps its weights there; copy the whole artifact "
                            "folder or re-export it")
        size = path.stat().st_size
        if size < end:
            raise UserError(f"{path} is truncated: {size} bytes, but {model_path.name} needs {end}; the copy or export "
                            "was interrupted: copy the artifact again or re-export it")


def open_artifact_manifest(folder: str | Path, target: str, hashes: bool = True,
                           has_sha256: Callable[[Path, str], bool] = file_has_sha256,
                           tasks: tuple[str, ...] = (TEXT_GENERATION,)) -> Manifest:
    """The manifest of an export artifact for `target` and one of `tasks`, after verify_files."""
    manifest = read_manifest(folder, ARTIFACT)
    verify_files(folder, manifest, hashes, has_sha256)
    if manifest.task not in tasks:
        command = COMMAND_OF_TASK.get(manifest.task)
        raise UserError(f"{folder} is a {manifest.task} artifact, not {' or '.join(tasks)}; "
                        + (f"run it with `sc2deploy {command} --artifact {folder}`" if command else
                           "this sc2deploy does not know that task: upgrade sc2deploy"))
    if manifest.target != target:
        how = ("`sc2deploy export ... --target trt` (the plugin graph), then `sc2deploy build`" if target == "trt"
               else "`sc2deploy export ... --target ort`")
        scheme = (manifest.graph.get("quantization") or {}).get("bits")
        what = f"is an int{scheme}-quantized ONNX Runtime artifact" if scheme else \
            f"was exported for --target {manifest.target}, not {target}"
        raise UserError(f"{folder} {what}; export it with {how}")
    return manifest


# ---------------------------------------------------------------- an engine folder on this machine
def check_engine_manifest(manifest: Manifest, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                          plugin_hash: str | None) -> list[str]:
    """Raise UserError if this engine cannot load here; return warnings for what merely differs.

    TensorRT deserializes only engines of its own exact version, built for the same compute
    capability (we never build version- or hardware-compatible engines: plugins exclude them).
    """
    built_with = str(manifest.details["tensorrt_version"])
    gpu = manifest.details["gpu"]
    rebuild = "rebuild it here: `sc2deploy build ARTIFACT --out DIR`"
    if built_with != tensorrt_version:
        raise UserError(f"this engine was built with TensorRT {built_with}, but TensorRT {tensorrt_version} is "
                        f"installed, and engines load only in the TensorRT version that built them: {rebuild}, or run "
                        f"it with TensorRT {built_with} (the image that built it)")
    if str(gpu.get("compute_capability")) != compute_capability:
        raise UserError(f"this engine was built for {gpu.get('name')} (compute capability "
                        f"{gpu.get('compute_capability')}), but this GPU is {gpu_name} (compute capability "
                        f"{compute_capability}); engines are compiled for one GPU architecture: {rebuild} on this GPU")
    warnings = []
    if gpu.get("name") != gpu_name:
        warnings.append(f"engine tuned on {gpu.get('name')}, running on {gpu_name} (same compute capability "
                        f"{compute_capability}): it runs, but rebuild here for the best kernels")
    plugin = manifest.plugin
    if plugin_hash is not None and plugin.get("hash") != plugin_hash:
        if plugin.get("mode") == "jit":
            raise UserError("this engine runs its attention plugins from Python (--plugin jit) and the plugin code "
                            f"changed since it was built (hash {str(plugin.get('hash'))[:12]}, now {plugin_hash[:12]}): "
                            f"{rebuild}")
        warnings.append("the plugin source changed since this engine was built; its kernels are embedded (aot), so "
                        "it runs as built")
    return warnings


def engine_limits(manifest: Manifest) -> tuple[int, int, int, int]:
    """(max_batch, max_input_len, max_seq_len, capacity) of an engine."""
    b = manifest.details["build"]
    return int(b["max_batch"]), int(b["max_input_len"]), int(b["max_seq_len"]), int(b["capacity"])
