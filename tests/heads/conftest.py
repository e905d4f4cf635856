"""Random checkpoints of the three StarCoder2 head classes, written by transformers' save_pretrained."""
from __future__ import annotations

import pytest

from sc2deploy.tasks import BASE_MODEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

HEADS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, BASE_MODEL)
VOCAB = 1000
PAD = VOCAB - 1  # random prompts draw ids below it
# Bodies: window below the prompt length, GQA with biases; MQA without biases and a wider window.
BODIES = {
    "gqa-w8": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "mqa-w12-nobias": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=12, use_bias=False),
}


class HeadCheckpoints:
    """Checkpoints keyed by (architecture, body, pad_token_id, num_labels), each written once per session."""

    def __init__(self, base, make_hf_model):
        self.base, self.make = base, make_hf_model
        self._made: dict = {}

    def __call__(self, architecture: str, body: str = "gqa-w8", pad_token_id: int | None = PAD, num_labels: int = 3):
        key = (architecture, body, pad_token_id, num_labels)
        if key not in self._made:
            folder = self.base / f"{architecture}-{body}-{pad_token_id}-{num_labels}"
            folder.mkdir(parents=True)
            model = self.make(folder, architecture=architecture, vocab_size=VOCAB, pad_token_id=pad_token_id,
                              num_labels=num_labels, **BODIES[body])
            self._made[key] = (folder, model)
        return self._made[key]


@pytest.fixture(scope="session")
def hf_heads(tmp_path_factory, helpers):
    return HeadCheckpoints(tmp_path_factory.mktemp("hf-heads"), helpers.make_hf_model)


class HeadArtifacts:
    """`export_artifact` of the checkpoints above, each made once per session."""

    def __init__(self, base, checkpoints: HeadCheckpoints):
        self.base, self.checkpoints = base, checkpoints
        self._made: dict = {}

    def __call__(self, architecture: str, body: str = "gqa-w8", pad_token_id: int | None = PAD, dtype: str = "fp32"):
        from sc2deploy.checkpoint import CheckpointSource
        from sc2deploy.export import export_artifact

        key = (architecture, body, pad_token_id, dtype)
        if key not in self._made:
            folder, _ = self.checkpoints(architecture, body, pad_token_id)
            out = self.base / f"{architecture}-{body}-{pad_token_id}-{dtype}"
            self._made[key] = export_artifact(CheckpointSource(folder), out, dtype, "ort")
        return self._made[key]


@pytest.fixture(scope="session")
def head_artifacts(tmp_path_factory, hf_heads):
    return HeadArtifacts(tmp_path_factory.mktemp("head-artifacts"), hf_heads)
