"""Exports of random transformers checkpoints, run in ONNX Runtime, against transformers itself."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource, load_model
from sc2deploy.export import export_artifact
from sc2deploy.contract import MANIFEST
from sc2deploy.export.manifest import verify_artifact

# fp16 tolerances (logits of these random models are at most ~0.8 in size). Measured on the four oracle
# configs: fp16 export vs transformers fp32 <= 7.3e-4 (the eager fp16 model: <= 8.1e-4); fp16 export vs the
# eager fp16 model <= 6.2e-4.
FP16_LOGITS_ATOL = 2e-3
FP16_VS_EAGER_ATOL = 1.5e-3


def test_fp32_logits_match_transformers_past_the_window(hf_checkpoint, tmp_path, helpers):
    folder, hf = hf_checkpoint
    source = CheckpointSource(folder)
    config = source.config
    artifact = export_artifact(source, tmp_path / "art", "fp32", "ort")
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    ids = helpers.random_ids(config.vocab_size, (2, 3 * config.sliding_window + 5), seed=1)
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
    got = helpers.run_prompt(helpers.ort_session(artifact), config, ids)
    assert np.abs(got - expected).max() < 1e-4
    # A right-padded batch: each row equals its own unpadded run.
    lengths = [ids.shape[1], 11]
    got = helpers.run_prompt(helpers.ort_session(artifact), config, ids, lengths=lengths)
    with torch.no_grad():
        short = hf(ids[1:, :11]).logits.numpy()
    assert np.abs(got[0] - expected[0]).max() < 1e-4
    assert np.abs(got[1, :11] - short[0]).max() < 1e-4


def test_fp16_logits_within_documented_tolerance(store, helpers):
    folder, hf = store.checkpoint()
    config = CheckpointSource(folder).config
    artifact = store.artifact(dtype="fp16")
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    ids = helpers.random_ids(config.vocab_size, (2, 3 * config.sliding_window + 5), seed=2)
    got = helpers.run_prompt(helpers.ort_session(artifact), config, ids, dtype=np.float16).astype(np.float32)
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
        model = load_model(CheckpointSource(folder), "fp16")
        eager, _ = model(ids, torch.ones_like(ids), model.empty_cache(2, config.sliding_window))
    assert np.abs(got - expected).max() < FP16_LOGITS_ATOL
    assert np.abs(got - eager.float().numpy()).max() < FP16_VS_EAGER_ATOL


def test_logits_to_keep_returns_the_last_positions(store, helpers):
    folder, _ = store.checkpoint()
    config = CheckpointSource(folder).config
    session = helpers.ort_session(store.artifact())
    ids = helpers.random_ids(config.vocab_size, (2, 20), seed=3)
    mask = np.ones(ids.shape, np.int64)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask}
    shape = (2, config.num_key_value_heads, config.sliding_window, config.head_dim)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros(shape, np.float32)
    every = session.run(["logits"], feed)[0]
    last = session.run(["logits"], {**feed, "logits_to_keep": np.array([1], np.int64)})[0]
    assert last.shape == (2, 1, config.vocab_size)
    assert np.array_equal(last[:, 0], every[:, -1])


def test_graph_io_names_dims_and_versions(store):
    model = onnx.load(str(store.artifact() / "model.onnx"), load_external_data=False)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import} == {"": 20, "com.microsoft": 1}

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    assert dims(inputs["input_ids"]) == ["batch", "sequence"]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(inputs["attention_mask"]) == ["batch", "total_sequence"]
    assert dims(inputs["past_key_values.1.value"]) == ["batch", 2, "past_sequence", 16]
    assert dims(outputs["logits"]) == ["batch", "sequence", 1000]
    assert set(outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(2) for k in ("key", "value")}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["local_window_size"] == 8 and attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    assert attrs["sliding_window_cache"] == 1 and abs(attrs["scale"] - 16**-0.5) < 1e-7
    # seqlens_k and total_sequence_length come from attention_mask, as onnxruntime-genai's builder does it
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceSum" in ops and "Shape" in ops


def test_weights_are_external_and_small_tensors_inline(store):
    model = onnx.load(str(store.artifact() / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) * (4 if tensor.data_type == onnx.TensorProto.FLOAT else 8)
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        assert external == (size >= 1024), tensor.name
        if external:
            info = {e.key: e.value for e in tensor.external_data}
            assert info["location"] == "model.onnx.data" and int(info["offset"]) % 4096 == 0


def test_tied_head_and_no_bias_exports_load_all_weights(tmp_path, helpers):
    folder = tmp_path / "ckpt"
    helpers.make_hf_model(folder, num_attention_heads=4, num_key_value_heads=1, sliding_window=8,
                          tie_word_embeddings=True, use_bias=False)
    source = CheckpointSource(folder)
    model = onnx.load(str(export_artifact(source, tmp_path / "art") / "model.onnx"), load_external_data=False)
    names = {t.name for t in model.graph.initializer}
    assert {"model.embed_tokens.weight", "model.embed_tokens.weight.T"} <= names
    assert not any(n.endswith(".bias") and "proj" in n for n in names)


def test_manifest_records_source_and_every_file(store):
    folder, _ = store.checkpoint()
    artifact = store.artifact()
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["dtype"] == "fp32" and manifest["target"] == "ort"
    assert manifest["source"]["kind"] == "checkpoint"
    assert set(manifest["source"]["sha256"]) == {"model.safetensors"}
    assert manifest["config"]["sliding_window"] == 8
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                                      "tokenizer_config.json"}
    assert {"torch", "onnx", "sc2deploy"} <= set(manifest["tools"])
    verify_artifact(artifact)


def test_random_weights_record_the_seed(tmp_path):
    from sc2deploy.checkpoint import RandomSource
    from sc2deploy.config import preset

    artifact = export_artifact(RandomSource(preset("tiny"), seed=7), tmp_path / "art", "fp32", "trt", check=False)
    manifest = verify_artifact(artifact)
    assert manifest.source == {"kind": "random", "seed": 7, "preset": "tiny"}
    assert "genai_config.json" not in manifest.files


class _FailingSource:
    """A TensorSource that breaks after a few tensors, like a disk error or ^C mid-export."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.config, self.description = inner, after, inner.config, inner.description

    def names(self):
        return self.inner.names()

    def get(self, name, dtype):
        self.after -= 1
        if self.after < 0:
            raise KeyboardInterrupt
        return self.inner.get(name, dtype)


def test_interrupted_export_leaves_nothing_that_looks_valid(store, tmp_path):
    folder, _ = store.checkpoint()
    with pytest.raises(KeyboardInterrupt):
        export_artifact(_FailingSource(CheckpointSource(folder), after=5), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []
