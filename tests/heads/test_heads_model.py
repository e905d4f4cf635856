"""The reference heads against transformers' Starcoder2Model, ForSequenceClassification and ForTokenClassification
on random checkpoints that transformers wrote: fp32 outputs within 1e-5, unpadded, right- and left-padded, past
the window; transformers' pooling rules; what a checkpoint of the wrong kind gets."""
from __future__ import annotations

import json

import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource, load_model
from sc2deploy.errors import UserError
from sc2deploy.heads import Starcoder2Base, Starcoder2Classifier, load_head_model
from sc2deploy.tasks import BASE_MODEL, CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, BatchWithoutPadToken
from tests.heads.conftest import BODIES, HEADS, PAD, VOCAB

ATOL = 1e-5


def batch(lengths: list[int], side: str, pad: int = PAD, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of `lengths` in one batch padded on `side` with `pad`, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.randint(0, PAD, (n,), generator=gen)
        mask[row, cols] = 1
    return ids, mask


def compare(architecture: str, got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference, over real positions only (padded columns mean nothing on either side)."""
    if architecture == SEQUENCE_CLASSIFICATION:
        assert got.shape == expected.shape == (mask.shape[0], 3)
        return (got - expected).abs().max().item()
    assert got.shape == expected.shape
    return max((got[row][mask[row].bool()] - expected[row][mask[row].bool()]).abs().max().item()
               for row in range(mask.shape[0]))


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("architecture", HEADS)
def test_outputs_match_transformers_padded_either_side_past_the_window(hf_heads, architecture, body):
    folder, hf = hf_heads(architecture, body)
    model = load_head_model(CheckpointSource(folder))
    assert isinstance(model, Starcoder2Base if architecture == BASE_MODEL else Starcoder2Classifier)
    window = model.config.sliding_window
    long = 3 * window + 5
    for lengths, side in (([long, long], "right"), ([long, 11, 5], "right"), ([long, 11, 5], "left"),
                          ([7, long], "left")):
        ids, mask = batch(lengths, side)
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask)
            expected = out.last_hidden_state if architecture == BASE_MODEL else out.logits
            got = model(ids, mask)
        assert compare(architecture, got, expected, mask) < ATOL, (lengths, side)


def test_sequence_pooling_without_pad_token_id(hf_heads):
    folder, hf = hf_heads(SEQUENCE_CLASSIFICATION, pad_token_id=None)
    model = load_head_model(CheckpointSource(folder))
    assert model.config.head.pad_token_id is None
    ids, mask = batch([20], "right")
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        assert (model(ids, mask) - expected).abs().max().item() < ATOL  # one row: the last position
        ids, mask = batch([20, 20], "right")
        with pytest.raises(ValueError) as theirs:
            hf(input_ids=ids, attention_mask=mask)
        with pytest.raises(BatchWithoutPadToken) as ours:
            model(ids, mask)
    assert str(ours.value) == str(theirs.value)
    assert isinstance(ours.value, ValueError) and isinstance(ours.value, UserError)


def test_sequence_pooling_of_a_last_token_equal_to_pad_token_id(hf_heads):
    """transformers pools at the rightmost id that is not pad_token_id, so a prompt ending in that id is pooled
    at an earlier token; the reference does the same, alone and in a padded batch."""
    folder, hf = hf_heads(SEQUENCE_CLASSIFICATION)
    model = load_head_model(CheckpointSource(folder))
    for lengths, side in (([20], "right"), ([20, 9], "right"), ([20, 9], "left")):
        ids, mask = batch(lengths, side, seed=4)
        last = mask.shape[1] - 1 if side == "left" else lengths[0] - 1
        ids[0, last] = PAD
        ids[0, last - 3] = PAD  # a pad id inside the prompt is not where pooling stops
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask).logits
            got = model(ids, mask)
            moved = model(torch.where(ids == PAD, 5, ids), mask)  # pooled at the true last token
        assert (got - expected).abs().max().item() < ATOL
        assert (moved[0] - got[0]).abs().max().item() > 1e-3  # the edge case changes the answer


def test_a_prompt_of_pad_ids_only_pools_at_the_first_column(hf_heads):
    folder, hf = hf_heads(SEQUENCE_CLASSIFICATION)
    model = load_head_model(CheckpointSource(folder))
    ids = torch.full((2, 6), PAD)
    ids[1, :3] = torch.tensor([1, 2, 3])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert (model(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item() < ATOL


def test_token_classification_without_a_score_bias(helpers, tmp_path):
    hf = helpers.make_hf_model(tmp_path, architecture=TOKEN_CLASSIFICATION, token_classification_bias=False,
                               num_labels=5, pad_token_id=PAD, vocab_size=VOCAB, **BODIES["gqa-w8"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["token_classification_bias"] is False
    model = load_head_model(CheckpointSource(tmp_path))
    assert model.score.bias is None and model.config.head.labels == tuple(f"LABEL_{i}" for i in range(5))
    ids, mask = batch([30, 12], "left")
    with torch.no_grad():
        got, expected = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert compare(TOKEN_CLASSIFICATION, got, expected, mask) < ATOL


def test_labels_come_from_config_json(hf_heads, tmp_path):
    import shutil

    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    shutil.copytree(folder, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["id2label"] = {"2": "high", "0": "low", "1": "mid"}
    path.write_text(json.dumps(config))
    assert CheckpointSource(tmp_path / "ckpt").config.head.labels == ("low", "mid", "high")
    config["id2label"] = {"0": "low", "1": "mid", "3": "high"}
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: id2label has the entry '3'"):
        CheckpointSource(tmp_path / "ckpt")


# ---------------------------------------------------------------- checkpoints of the wrong kind
def edit_config(folder, tmp_path, **changes):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_an_unexpected_head_tensor_names_the_architecture_that_has_it(hf_heads, tmp_path):
    folder, _ = hf_heads(TOKEN_CLASSIFICATION)
    copy = edit_config(folder, tmp_path, architectures=None, tie_word_embeddings=True)  # a tied causal LM
    with pytest.raises(UserError) as e:
        CheckpointSource(copy)
    message = str(e.value)
    assert "unexpected tensor score." in message and "(and 1 more)" in message
    assert f"its tensors are those of a {TOKEN_CLASSIFICATION}, but config.json's architectures gives {CAUSAL_LM}" \
        in message and "\n" not in message


def test_a_missing_head_tensor_names_the_architecture_that_needs_it(hf_heads, tmp_path):
    folder, _ = hf_heads(BASE_MODEL)
    copy = edit_config(folder, tmp_path, architectures=[SEQUENCE_CLASSIFICATION])
    with pytest.raises(UserError) as e:
        CheckpointSource(copy)
    assert str(e.value).startswith(f"checkpoint {copy} has no tensor model.embed_tokens.weight, which "
                                   f"{SEQUENCE_CLASSIFICATION} needs")
    assert f"its tensors are those of a {BASE_MODEL}" in str(e.value)
    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    copy = edit_config(folder, tmp_path / "b", architectures=[CAUSAL_LM], tie_word_embeddings=False)
    with pytest.raises(UserError, match=f"has no tensor lm_head.weight, which {CAUSAL_LM} needs .*its tensors are "
                                        f"those of a {SEQUENCE_CLASSIFICATION}"):
        CheckpointSource(copy)


def test_an_architecture_that_is_not_starcoder2_is_refused(hf_heads, tmp_path):
    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    copy = edit_config(folder, tmp_path, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(UserError, match=r"architectures is \['LlamaForSequenceClassification'\]: not a StarCoder2 "
                                        r"class; sc2deploy runs Starcoder2ForCausalLM, "):
        CheckpointSource(copy)


def test_the_causal_lm_loader_refuses_a_head_and_the_head_loader_a_causal_lm(hf_heads, helpers, tmp_path):
    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    with pytest.raises(UserError) as e:
        load_model(CheckpointSource(folder))
    assert str(e.value) == (f"checkpoint {folder} is a {SEQUENCE_CLASSIFICATION} model (sequence-classification), "
                            f"not a text-generation model; run it with `sc2deploy classify --checkpoint {folder}`")
    helpers.make_hf_model(tmp_path, **BODIES["gqa-w8"])
    with pytest.raises(UserError, match=r"is a Starcoder2ForCausalLM model \(text-generation\), not a "
                                        r"sequence-classification or token-classification or feature-extraction "
                                        r"model; run it with `sc2deploy generate --checkpoint "):
        load_head_model(CheckpointSource(tmp_path))


@pytest.mark.parametrize("changes, message", [
    ({"pad_token_id": VOCAB}, r"pad_token_id is 1000; expected an integer from 0 to 999"),
    ({"pad_token_id": "0"}, r"pad_token_id is '0'; expected null or an integer token id"),
    ({"id2label": None, "num_labels": 0}, r"num_labels is 0; expected an integer from 1 to 65536"),
    ({"id2label": {}}, r"id2label must be an object of 1 to 65536 labels"),
    ({"problem_type": "ranking"}, r"problem_type is 'ranking'; expected null or one of regression, "),
    ({"architectures": "Starcoder2Model"}, r"architectures is 'Starcoder2Model'; expected a list of class names"),
])
def test_bad_head_fields_of_config_json_are_named(changes, message):
    from sc2deploy.config import Config

    config = {"model_type": "starcoder2", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": VOCAB, "architectures": [SEQUENCE_CLASSIFICATION],
              "id2label": {"0": "a", "1": "b"}, "pad_token_id": 0}
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(UserError, match="^config.json: " + message):
        Config.from_hf_dict(config)
