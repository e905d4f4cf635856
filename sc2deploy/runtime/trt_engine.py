"""The loader of the TensorRT runtime (as Polygraphy's `EngineFromBytes` is to its `TrtRunner`): an engine folder
made by `sc2deploy build`, its manifest checked against this machine (TensorRT version, GPU compute capability,
plugin hash for JIT engines) before TensorRT sees the bytes, so that a mismatch is a clear UserError, not a
crash. Without TensorRT or a GPU it raises a UserError that says what to install; tensorrt is imported only
when an engine is loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sc2deploy.contract import ENGINE, ENGINE_FILE, Manifest, check_engine_manifest, read_manifest
from sc2deploy.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtEngine:
    """A deserialized engine, with the tensorrt module it came from and its folder's manifest."""

    trt: Any  # the tensorrt module (the tests pass a stand-in)
    engine: Any  # tensorrt.ICudaEngine
    manifest: Manifest
    folder: Path
    device: torch.device
    keep: tuple[Any, ...] = ()  # the tensorrt.Logger and tensorrt.Runtime, which the engine must not outlive


def load_trt_engine(folder: str | Path, device: int = 0) -> TrtEngine:
    """The engine in `folder`, deserialized on CUDA device `device` once its manifest says it can run here."""
    from sc2deploy.plugins.trt_env import gpu_identity, require_cuda, require_tensorrt
    from sc2deploy.plugins.trt_rules import plugin_hash

    require_tensorrt("--backend trt")
    require_cuda("--backend trt")
    import tensorrt as trt  # typed by tensorrt-stubs
    folder = Path(folder)
    manifest = read_manifest(folder, ENGINE)
    gpu = gpu_identity(device)
    for warning in check_engine_manifest(manifest, tensorrt_version=str(trt.__version__), gpu_name=gpu["name"],
                                         compute_capability=gpu["compute_capability"], plugin_hash=plugin_hash()):
        log.warning("%s: %s", folder, warning)

    if manifest.plugin.get("mode") == "jit":
        from sc2deploy.plugins.trt_plugin import register_plugins  # the engine calls back into Python

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    path = folder / manifest.engine.get("file", ENGINE_FILE)
    if not path.is_file():
        raise UserError(f"{folder} lacks {path.name}; rebuild the engine")
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT {trt.__version__} could not load {path} although its manifest matches this "
                        "machine; the file may be corrupt: rebuild it with `sc2deploy build`")
    return TrtEngine(trt, engine, manifest, folder, torch.device("cuda", device), keep=(logger, runtime))
