"""ONNX Runtime on a head artifact (`sc2deploy export` of a classifier or base-model checkpoint): one
session.run per batch, no cache. The artifact is checked as runtime/ort_artifact.py checks a causal LM's, for
the head tasks instead of text generation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sc2deploy.config import Config
from sc2deploy.contract import MANIFEST, MODEL_FILE, check_external_data, head_graph_io, open_artifact_manifest
from sc2deploy.errors import UserError
from sc2deploy.runtime.hash_cache import HashCache
from sc2deploy.runtime.heads import HeadRuntime
from sc2deploy.runtime.ort_artifact import NUMPY_DTYPES, PROVIDERS, OrtArtifact, choose_provider, ort_session
from sc2deploy.tasks import HEAD_TASKS


def load_ort_head_artifact(folder: str | Path, *, verify: bool = True, trust_cache: bool = True) -> OrtArtifact:
    """The head artifact at `folder` after the checks of load_ort_artifact (files, external data, dtype)."""
    folder = Path(folder)
    hashes = HashCache(trusted=trust_cache)
    try:
        manifest = open_artifact_manifest(folder, "ort", hashes=verify, has_sha256=hashes.has_sha256,
                                          tasks=HEAD_TASKS)
    finally:
        hashes.save()
    model_path = folder / manifest.graph.get("file", MODEL_FILE)
    check_external_data(model_path)
    config = Config.from_hf_dict(manifest.config, source=str(folder / MANIFEST))
    if config.head.task != manifest.task:
        raise UserError(f"{folder / MANIFEST} says task {manifest.task}, but its config's architectures is "
                        f"{config.head.architecture} ({config.head.task}); re-export the artifact")
    if manifest.dtype not in NUMPY_DTYPES:
        raise UserError(f"{folder} holds {manifest.dtype} weights; the ort runtime runs fp32 or fp16 artifacts")
    return OrtArtifact(folder, manifest, config, manifest.dtype, False, model_path, None)


class OrtHeads(HeadRuntime):
    name = "ort"

    def __init__(self, artifact: OrtArtifact | str | Path, *, threads: int | None = None,
                 provider: str | None = None, verify: bool = True, optimization: str = "all"):
        """Run the head artifact `artifact` (or its folder, loaded by load_ort_head_artifact). threads,
        provider, verify and optimization as OrtRuntime's."""
        if not isinstance(artifact, OrtArtifact):
            artifact = load_ort_head_artifact(artifact, verify=verify)
        self.artifact, self.config, self.dtype = artifact.folder, artifact.config, artifact.dtype
        self.provider, self.threads = choose_provider(provider), threads
        self.session = ort_session(artifact.model_path, self.provider, threads, optimization)
        self._output = head_graph_io(self.head.task)[1][0]

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.session.run([self._output], {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)})
        return np.asarray(out[0], dtype=np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "provider": PROVIDERS[self.provider], "artifact": str(self.artifact),
                "threads": self.threads}
