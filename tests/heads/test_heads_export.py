"""Head artifacts (sc2deploy/export/heads.py) in ONNX Runtime against transformers, on checkpoints it wrote; what
they hold; and the causal LM's readers and the head's refusing each other's artifacts."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource
from sc2deploy.errors import UserError
from sc2deploy.export import export_artifact
from sc2deploy.quantization import SCHEMES
from sc2deploy.runtime.heads import EagerHeads
from sc2deploy.runtime.ort_heads import OrtHeads
from sc2deploy.tasks import BASE_MODEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, BatchWithoutPadToken
from tests.heads.conftest import BODIES, HEADS, PAD
from tests.heads.test_heads_model import batch, compare

ATOL = 1e-5  # measured <= 7.2e-7 (hidden states), <= 7.5e-8 (logits)


def transformers_output(hf, architecture, ids, mask):
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if architecture == BASE_MODEL else out.logits


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("architecture", HEADS)
def test_fp32_artifact_matches_transformers_padded_either_side_past_the_window(hf_heads, head_artifacts,
                                                                                architecture, body):
    _, hf = hf_heads(architecture, body)
    runtime = OrtHeads(head_artifacts(architecture, body))
    window = runtime.config.sliding_window
    long = 3 * window + 5
    for lengths, side in (([long, long], "right"), ([long, 11, 5], "right"), ([long, 11, 5], "left")):
        ids, mask = batch(lengths, side)
        got = torch.from_numpy(runtime.forward(ids.numpy(), mask.numpy()))
        assert compare(architecture, got, transformers_output(hf, architecture, ids, mask), mask) < ATOL, (lengths, side)


def test_run_pads_prompts_as_a_tokenizer_would(hf_heads, head_artifacts):
    _, hf = hf_heads(TOKEN_CLASSIFICATION)
    runtime = OrtHeads(head_artifacts(TOKEN_CLASSIFICATION))
    prompts = [list(range(1, 30)), [7, 8, 9]]
    for side in ("right", "left"):
        outputs = runtime.run(prompts, padding=side)
        for prompt, out in zip(prompts, outputs):
            with torch.no_grad():
                alone = hf(input_ids=torch.tensor([prompt])).logits[0].numpy()
            assert out.shape == alone.shape and np.abs(out - alone).max() < ATOL


def test_sequence_artifact_without_pad_token_id(hf_heads, head_artifacts):
    _, hf = hf_heads(SEQUENCE_CLASSIFICATION, pad_token_id=None)
    runtime = OrtHeads(head_artifacts(SEQUENCE_CLASSIFICATION, pad_token_id=None))
    prompt = list(range(3, 40))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(runtime.run([prompt])[0] - expected).max() < ATOL
    with pytest.raises(BatchWithoutPadToken, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        runtime.run([prompt, prompt])


def test_fp16_artifact_within_the_fp16_tolerance(hf_heads, head_artifacts):
    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    runtime = OrtHeads(head_artifacts(SEQUENCE_CLASSIFICATION, dtype="fp16"))
    assert runtime.dtype == "fp16"
    ids, mask = batch([29, 11, 5], "left")
    got = runtime.forward(ids.numpy(), mask.numpy())
    expected = EagerHeads(CheckpointSource(folder)).forward(ids.numpy(), mask.numpy())
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 2e-3


@pytest.mark.parametrize("architecture", HEADS)
def test_graph_is_prefill_only_and_the_manifest_records_task_and_labels(head_artifacts, architecture):
    artifact = head_artifacts(architecture)
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    output = "last_hidden_state" if architecture == BASE_MODEL else "logits"
    width = 64 if architecture == BASE_MODEL else 3
    assert {v.name: dims(v) for v in model.graph.input} == {"input_ids": ["batch", "sequence"],
                                                             "attention_mask": ["batch", "sequence"]}
    assert {v.name: dims(v) for v in model.graph.output} == {
        output: ["batch", width] if architecture == SEQUENCE_CLASSIFICATION else ["batch", "sequence", width]}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for node in gqa:
        attributes = {a.name: a.i for a in node.attribute}
        assert attributes["sliding_window_cache"] == 0 and attributes["local_window_size"] == 8
    manifest = json.loads((artifact / "sc2deploy.json").read_text())
    assert manifest["task"] == {SEQUENCE_CLASSIFICATION: "sequence-classification",
                                TOKEN_CLASSIFICATION: "token-classification",
                                BASE_MODEL: "feature-extraction"}[architecture]
    assert manifest["config"]["architectures"] == [architecture]
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask"] and manifest["graph"]["outputs"] == [output]
    assert manifest["graph"]["sliding_window_cache"] is False
    if architecture != BASE_MODEL:
        assert manifest["config"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
        assert manifest["config"]["pad_token_id"] == PAD
    assert sorted(p.name for p in artifact.iterdir()) == ["model.onnx", "model.onnx.data", "sc2deploy.json",
                                                          "tokenizer.json"]  # no genai files: not a decoder


def test_causal_lm_readers_and_head_readers_refuse_each_others_artifacts(head_artifacts, store):
    from sc2deploy.runtime.onnxruntime import OrtRuntime

    artifact = head_artifacts(SEQUENCE_CLASSIFICATION)
    with pytest.raises(UserError) as e:
        OrtRuntime(artifact)
    assert str(e.value) == (f"{artifact} is a sequence-classification artifact, not text-generation; run it with "
                            f"`sc2deploy classify --artifact {artifact}`")
    causal = store.artifact()
    with pytest.raises(UserError, match=r"is a text-generation artifact, not sequence-classification or "
                                        r"token-classification or feature-extraction; run it with `sc2deploy generate"):
        OrtHeads(causal)


def test_trt_target_and_quantization_are_refused_for_heads(hf_heads, tmp_path):
    folder, _ = hf_heads(TOKEN_CLASSIFICATION)
    with pytest.raises(UserError, match="exports for --target ort only"):
        export_artifact(CheckpointSource(folder), tmp_path / "a", "fp32", "trt")
    with pytest.raises(UserError, match="--quant is for causal LMs"):
        export_artifact(CheckpointSource(folder), tmp_path / "b", "fp32", "ort", quant=SCHEMES["int8"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mask, message", [
    ([[1, 0, 1, 1]], "one run of ones per row"),
    ([[0, 0, 0, 0]], "one run of ones per row"),
    ([[1, 1, 2, 1]], "one run of ones per row"),
])
def test_a_mask_with_holes_is_refused(head_artifacts, mask, message):
    runtime = OrtHeads(head_artifacts(TOKEN_CLASSIFICATION))
    with pytest.raises(UserError, match=message):
        runtime.forward(np.ones((1, 4), np.int64), np.array(mask, np.int64))
    with pytest.raises(UserError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        runtime.forward(np.full((1, 4), 1000, np.int64), np.ones((1, 4), np.int64))


def test_forward_refuses_a_batch_the_graph_cannot_pool(head_artifacts):
    runtime = OrtHeads(head_artifacts(SEQUENCE_CLASSIFICATION, pad_token_id=None))
    with pytest.raises(BatchWithoutPadToken):
        runtime.forward(np.ones((2, 4), np.int64), np.ones((2, 4), np.int64))
