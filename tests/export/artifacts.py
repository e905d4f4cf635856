"""Shared by tests/export and tests/runtime: HF checkpoints and exported artifacts, each made once per session.

Loaded by path (see the conftests) so that both folders share one store, and so that it works
whether or not the repository root is on sys.path.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]


def load_module(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


make_hf_model = load_module("sc2deploy_tests_root_conftest", TESTS / "conftest.py").make_hf_model

# A small model whose window (8) is crossed by every test prompt; head_dim 16 (GroupQueryAttention needs % 16).
TINY = dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


class Store:
    """Checkpoints written by transformers and their exports, keyed by name; made on first use."""

    def __init__(self, base: Path):
        self.base = base
        self._checkpoints: dict[str, tuple[Path, object]] = {}
        self._artifacts: dict[tuple, Path] = {}

    def checkpoint(self, name: str = "tiny", **overrides) -> tuple[Path, object]:
        if name not in self._checkpoints:
            folder = self.base / "checkpoints" / name
            folder.mkdir(parents=True)
            model = make_hf_model(folder, **(overrides or TINY))
            self._checkpoints[name] = (folder, model)
        return self._checkpoints[name]

    def artifact(self, name: str = "tiny", dtype: str = "fp32", target: str = "ort", **overrides) -> Path:
        from sc2deploy.checkpoint import CheckpointSource
        from sc2deploy.export import export_artifact

        key = (name, dtype, target)
        if key not in self._artifacts:
            folder, _ = self.checkpoint(name, **overrides)
            out = self.base / "artifacts" / f"{name}-{target}-{dtype}"
            self._artifacts[key] = export_artifact(CheckpointSource(folder), out, dtype, target)
        return self._artifacts[key]


_STORE: Store | None = None


def store(tmp_path_factory) -> Store:
    global _STORE
    if _STORE is None:
        _STORE = Store(tmp_path_factory.mktemp("sc2deploy-export"))
    return _STORE


def random_ids(vocab: int, shape, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def ort_session(artifact: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(artifact / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run_prompt(session, config, ids: torch.Tensor, lengths=None, capacity: int | None = None,
               dtype=np.float32) -> np.ndarray:
    """Logits of a first prompt (right-padded rows of `lengths`) from a plain session with empty caches."""
    batch, seq = ids.shape
    lengths = lengths or [seq] * batch
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    capacity = capacity or max(seq, config.sliding_window or seq)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask}
    shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros(shape, dtype)
    return session.run(["logits"], feed)[0]
