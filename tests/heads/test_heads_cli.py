"""`sc2deploy classify` and `sc2deploy embed` on checkpoints transformers wrote and on their exports; a model of
the wrong kind for a command is one line and exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sc2deploy.cli import main
from sc2deploy.tasks import BASE_MODEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

IDS = [5, 17, 300, 2, 999, 41, 8, 77, 120, 64, 3, 90]  # ends in pad_token_id 999: pooled at 90 (index 11)
ATOL = 1e-5


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def prompt_args(ids=IDS):
    return ["--prompt-ids", ",".join(map(str, ids))]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("flag", ["--checkpoint", "--artifact"])
def test_classify_sequence_json_equals_transformers(hf_heads, head_artifacts, capsys, flag):
    folder, hf = hf_heads(SEQUENCE_CLASSIFICATION)
    where = folder if flag == "--checkpoint" else head_artifacts(SEQUENCE_CLASSIFICATION)
    ids = IDS + [999]  # a last token equal to pad_token_id: pooled one earlier, as transformers pools
    code, out, _ = cli(["classify", flag, where, *prompt_args(ids), "--json"], capsys)
    got = json.loads(out)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert code == 0 and got["task"] == "sequence-classification" and got["ids"] == ids
    assert got["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert np.abs(np.array(got["logits"]) - expected).max() < ATOL
    assert np.abs(np.array(got["scores"]) - softmax(expected.astype(np.float64))).max() < 1e-5
    assert got["predicted"] == got["labels"][int(expected.argmax())]
    assert got["backend"] == ("eager" if flag == "--checkpoint" else "ort") and got["dtype"] == "fp32"


def test_classify_sequence_prints_labels_best_first(hf_heads, capsys):
    folder, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    code, out, _ = cli(["classify", "--checkpoint", folder, *prompt_args()], capsys)
    lines = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and sorted(label for label, _ in lines) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    scores = [float(score) for _, score in lines]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5


@pytest.mark.parametrize("flag", ["--checkpoint", "--artifact"])
def test_classify_tokens_gives_a_row_per_token(hf_heads, head_artifacts, capsys, flag):
    folder, hf = hf_heads(TOKEN_CLASSIFICATION)
    where = folder if flag == "--checkpoint" else head_artifacts(TOKEN_CLASSIFICATION)
    code, out, _ = cli(["classify", flag, where, *prompt_args(), "--json"], capsys)
    got = json.loads(out)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([IDS])).logits[0].numpy()
    assert code == 0 and got["task"] == "token-classification"
    assert np.array(got["logits"]).shape == (len(IDS), 3)
    assert np.abs(np.array(got["logits"]) - expected).max() < ATOL
    assert got["predicted"] == [got["labels"][i] for i in expected.argmax(-1)]
    code, out, _ = cli(["classify", flag, where, *prompt_args()], capsys)
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [int(r[0]) for r in rows] == list(range(len(IDS)))
    assert [r[2] for r in rows] == got["predicted"]


@pytest.mark.parametrize("pooling", ["last", "mean", "none"])
@pytest.mark.parametrize("flag", ["--checkpoint", "--artifact"])
def test_embed_pools_transformers_hidden_states(hf_heads, head_artifacts, capsys, flag, pooling):
    folder, hf = hf_heads(BASE_MODEL)
    where = folder if flag == "--checkpoint" else head_artifacts(BASE_MODEL)
    code, out, _ = cli(["embed", flag, where, *prompt_args(), "--pooling", pooling, "--json"], capsys)
    got = json.loads(out)
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor([IDS])).last_hidden_state[0].numpy()
    expected = {"last": hidden[-1], "mean": hidden.mean(0), "none": hidden}[pooling]
    assert code == 0 and got["task"] == "feature-extraction" and got["hidden_size"] == 64
    assert np.abs(np.array(got["embedding"]) - expected).max() < ATOL
    code, out, _ = cli(["embed", flag, where, *prompt_args(), "--pooling", pooling], capsys)
    rows = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
    assert code == 0 and np.abs(rows.reshape(expected.shape) - expected).max() < 1e-5


def test_text_prompts_are_tokenized_as_generate_does(hf_heads, capsys):
    from sc2deploy.tokenizer import Tokenizer

    folder, _ = hf_heads(BASE_MODEL)
    code, out, _ = cli(["embed", "--checkpoint", folder, "--prompt", "def f(x):", "--json"], capsys)
    assert code == 0 and json.loads(out)["ids"] == Tokenizer.load(folder).encode("def f(x):")


def one_line_error(code, out, err, *fragments):
    assert code == 2 and not out and err.count("\n") == 1, (code, out, err)
    for fragment in fragments:
        assert fragment in err, err


def test_a_model_of_the_wrong_kind_is_one_line_and_exit_2(hf_heads, head_artifacts, helpers, capsys, tmp_path):
    base, _ = hf_heads(BASE_MODEL)
    sequence, _ = hf_heads(SEQUENCE_CLASSIFICATION)
    one_line_error(*cli(["classify", "--checkpoint", base, *prompt_args()], capsys),
                   f"checkpoint {base} is a Starcoder2Model model (feature-extraction), not a sequence-classification "
                   f"or token-classification model; run it with `sc2deploy embed --checkpoint {base}`")
    art = head_artifacts(SEQUENCE_CLASSIFICATION)
    one_line_error(*cli(["embed", "--artifact", art, *prompt_args()], capsys),
                   f"run it with `sc2deploy classify --artifact {art}`")
    one_line_error(*cli(["generate", "--checkpoint", sequence, *prompt_args(), "--max-tokens", "2"], capsys),
                   f"run it with `sc2deploy classify --checkpoint {sequence}`")
    one_line_error(*cli(["generate", "--artifact", art, *prompt_args(), "--max-tokens", "2"], capsys),
                   f"{art} is a sequence-classification artifact, not text-generation")
    causal = tmp_path / "causal"
    helpers.make_hf_model(causal)
    capsys.readouterr()  # transformers' progress bar
    one_line_error(*cli(["classify", "--checkpoint", causal, *prompt_args()], capsys),
                   "is a Starcoder2ForCausalLM model (text-generation)", "`sc2deploy generate --checkpoint")


@pytest.mark.parametrize("args, message", [
    ([*prompt_args()], "give exactly one of --checkpoint DIR"),
    (["--checkpoint", "{ck}", "--artifact", "{ck}", *prompt_args()], "give exactly one of --checkpoint DIR"),
    (["--checkpoint", "{ck}"], "give exactly one of --prompt TEXT or --prompt-ids"),
    (["--checkpoint", "{ck}", "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["--checkpoint", "{ck}", "--prompt-ids", "1,5000"], "token id 5000 is outside the vocabulary [0, 1000)"),
    (["--artifact", "{ck}", *prompt_args()], "this is a Hugging Face checkpoint, not an export"),
    (["--checkpoint", "{ck}", *prompt_args(), "--pooling", "max"], "unknown pooling 'max'"),
    (["--checkpoint", "{ck}", *prompt_args(), "--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bad_input_is_one_line_and_exit_2(hf_heads, capsys, args, message):
    base, _ = hf_heads(BASE_MODEL)
    one_line_error(*cli(["embed", *[a.format(ck=base) for a in args]], capsys), message)


def test_export_of_a_head_says_its_task_and_refuses_trt(hf_heads, capsys, tmp_path):
    folder, _ = hf_heads(TOKEN_CLASSIFICATION)
    code, out, _ = cli(["export", "--checkpoint", folder, "--out", tmp_path / "art", "--json"], capsys)
    assert code == 0 and json.loads(out)["task"] == "token-classification"
    one_line_error(*cli(["export", "--checkpoint", folder, "--out", tmp_path / "trt", "--target", "trt"], capsys),
                   "exports for --target ort only")
