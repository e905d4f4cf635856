"""The loaders of the ONNX Runtime runtime (as Polygraphy's `SessionFromOnnx` is to its `OnnxrtRunner`): an
`sc2deploy export --target ort` artifact checked against its manifest, and the InferenceSession over its graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sc2deploy.config import Config
from sc2deploy.contract import MANIFEST, MODEL_FILE, Manifest, check_external_data, open_artifact_manifest
from sc2deploy.errors import UserError
from sc2deploy.quantization import QuantScheme
from sc2deploy.runtime.hash_cache import HashCache

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class OrtArtifact:
    """An ort-target artifact whose files passed the checks of `load_ort_artifact`."""

    folder: Path
    manifest: Manifest
    config: Config
    dtype: str  # fp32 or fp16
    windowed: bool  # its GroupQueryAttention nodes run with sliding_window_cache=1
    model_path: Path
    quantization: QuantScheme | None  # its weights' block quantization (export --quant)


def load_ort_artifact(folder: str | Path, *, verify: bool = True, trust_cache: bool = True) -> OrtArtifact:
    """The artifact at `folder`, after checking that every file its manifest lists is present and whole, that the
    graph's external data is long enough, and that its dtype runs here.

    verify: also check the sha256 of every file (False: sizes only). trust_cache: skip the files whose size, mtime
    and inode are those they had when they last passed (runtime/hash_cache.py); False rehashes every file.
    """
    folder = Path(folder)
    hashes = HashCache(trusted=trust_cache)
    try:
        manifest = open_artifact_manifest(folder, "ort", hashes=verify, has_sha256=hashes.has_sha256)
    finally:
        hashes.save()
    model_path = folder / manifest.graph.get("file", MODEL_FILE)
    check_external_data(model_path)
    config = Config.from_hf_dict(manifest.config, source=str(folder / MANIFEST))
    if manifest.dtype not in NUMPY_DTYPES:
        raise UserError(f"{folder} holds {manifest.dtype} weights; the ort runtime runs fp32 or fp16 artifacts")
    return OrtArtifact(folder, manifest, config, manifest.dtype, bool(manifest.graph.get("sliding_window_cache")),
                       model_path, manifest_quantization(manifest, folder))


def manifest_quantization(manifest: Manifest, folder: Path) -> QuantScheme | None:
    """The quantization scheme an artifact's manifest records, or None."""
    recorded = manifest.graph.get("quantization")
    if recorded is None:
        return None
    try:
        return QuantScheme.from_manifest(recorded)
    except (ValueError, TypeError) as e:
        raise UserError(f"{folder / MANIFEST} records a quantization this sc2deploy does not know ({e}); upgrade "
                        "sc2deploy or re-export the artifact") from None


def choose_provider(provider: str | None) -> str:
    """"cpu" or "cuda": `provider` if ONNX Runtime here offers it; None: cuda where onnxruntime-gpu offers it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is None:
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise UserError(f"ONNX Runtime here has no {PROVIDERS[provider]} (available: {', '.join(available)}); "
                        "install onnxruntime-gpu for cuda, or use provider cpu")
    return provider


def ort_session(model_path: Path, provider: str, threads: int | None = None, optimization: str = "all"):
    """An onnxruntime.InferenceSession on `model_path`: `provider` (and the CPU for what it lacks), sequential
    execution, `threads` intra-op threads (None: one per core), graph optimization level `optimization`."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise UserError(f"unknown optimization level {optimization!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the overridable logits_to_keep initializer draws a warning by design
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise UserError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0][:500]}; "
                        "re-export the artifact with this sc2deploy version") from None
