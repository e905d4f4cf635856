"""The parity checker: a correct runtime passes, a corrupted one fails and says where (issue #3).

First with eager runtimes under test (the window off by one, one weight moved), then the acceptance of
the issue on a real ONNX export (--target ort) corrupted the same two ways.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sc2deploy import parity
from sc2deploy.checkpoint import RandomSource, TensorSource, write_checkpoint
from sc2deploy.cli import main
from sc2deploy.config import preset
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.tokenizer import Tokenizer

TINY = preset("tiny")
W = TINY.window
SEED = 0


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def full_suite(tokenizer):
    return parity.build_suite(TINY, tokenizer)


@pytest.fixture(scope="module")
def suite(tokenizer):
    """The suite with 40 decode steps instead of 64: still two windows past the 24-token prompt, and faster."""
    return parity.build_suite(TINY, tokenizer, decode_steps=40)


@pytest.fixture(scope="module")
def reference():
    return EagerRuntime(RandomSource(TINY, SEED), max_batch=3)


def eager(config=TINY, dtype="fp32"):
    return EagerRuntime(RandomSource(config, SEED), dtype=dtype, max_batch=3)


def by_name(report_or_cases):
    cases = report_or_cases.cases if isinstance(report_or_cases, parity.Report) else report_or_cases
    return {c.name: c for c in cases}


# ---------------------------------------------------------------- the suite
def test_suite_covers_the_issue(full_suite, tokenizer):
    cases = by_name(full_suite)
    assert set(cases) == {"short", "long", "fim", "batch", "decode"}
    assert len(cases["short"].prompts[0]) < W
    assert len(cases["long"].prompts[0]) == 2 * W + 5
    fim = cases["fim"].prompts[0]
    assert fim[0] == tokenizer.fim_prefix_id and fim[-1] == tokenizer.fim_middle_id
    lengths = [len(p) for p in cases["batch"].prompts]
    assert len(set(lengths)) == 3 and max(lengths) > W
    decode = cases["decode"]
    assert decode.decode_steps == 64 and len(decode.prompts[0]) < W < len(decode.prompts[0]) + 64


def test_suite_fits_small_vocabularies_and_contexts(tokenizer):
    config = TINY.replace(vocab_size=300, max_position_embeddings=48, sliding_window=None)
    for case in parity.build_suite(config, tokenizer):
        for prompt in case.prompts:
            assert prompt and max(prompt) < 300
            assert len(prompt) + case.decode_steps <= 48


# ---------------------------------------------------------------- run_suite against eager runtimes
def test_same_weights_pass_with_zero_error(reference, suite):
    report = parity.run_suite(reference, eager(), suite, parity.tolerances_for("fp32"))
    assert report.passed and report.exit_code == 0
    for case in report.cases:
        assert case.max_abs == 0 and case.kl_max == 0 and case.top1 == 1 and case.first_divergence is None
    assert by_name(report)["decode"].positions == (W - 8) + 40  # the prompt's logits, then one per token fed


@pytest.mark.parametrize("window", [W - 1, W + 1])
def test_window_off_by_one_fails_at_the_window(reference, suite, window):
    report = parity.run_suite(reference, eager(TINY.replace(sliding_window=window)), suite, parity.tolerances_for("fp32"))
    cases = by_name(report)
    assert not report.passed and report.exit_code == 1
    assert cases["short"].passed  # never reaches the window: nothing to see there
    for name in ("long", "batch", "decode"):
        assert not cases[name].passed
    # The first position out of tolerance is the first one whose window differs: W-1 or W.
    assert f"(first: position {min(window, W)}," in cases["long"].failures[0]
    assert f"(first: row 1 position {min(window, W)}," in cases["batch"].failures[0]


def perturbed(runtime: EagerRuntime, delta: float = 1.0) -> EagerRuntime:
    with torch.no_grad():
        runtime.model.model.layers[1].self_attn.q_proj.weight[3, 5] += delta
    return runtime


def test_one_perturbed_weight_fails_every_case(reference, suite):
    report = parity.run_suite(reference, perturbed(eager()), suite, parity.tolerances_for("fp32"))
    assert report.exit_code == 1
    assert not any(c.passed for c in report.cases)
    # Invisible to argmax (at most a near-tie flips: the prompts are this package's sources, they change with it):
    # only the logit check catches it.
    assert all(len(c.failures) == 1 and c.failures[0].startswith("logits off by") for c in report.cases)


def test_low_precision_is_judged_by_its_own_tolerances(reference, suite):
    report = parity.run_suite(reference, eager(dtype="bf16"), suite, parity.tolerances_for("bf16"))
    assert report.passed and report.dtype == "bf16"
    fp32 = parity.DEFAULT_TOLERANCES["fp32"]
    assert all(c.max_abs > fp32.atol for c in report.cases)  # far outside what fp32 allows


def test_tolerance_overrides():
    assert parity.tolerances_for("fp16", atol=0.5) == parity.Tolerances(0.5, 1e-2, 5e-3)
    with pytest.raises(parity.UserError, match="no parity tolerances for dtype 'int8'"):
        parity.tolerances_for("int8")


class Crashes(EagerRuntime):
    def decode(self, slots, token_ids):
        raise RuntimeError("kernel exploded")


def test_a_runtime_that_raises_fails_its_case(reference, suite):
    crash = Crashes(RandomSource(TINY, SEED), max_batch=3)
    cases = [c for c in suite if c.name in ("short", "batch")]
    report = parity.run_suite(reference, crash, cases, parity.tolerances_for("fp32"))
    assert report.exit_code == 1
    assert all("RuntimeError: kernel exploded" in c.failures[0] for c in report.cases)


def test_suite_needs_enough_slots(reference, suite):
    with pytest.raises(parity.UserError, match="the suite needs 3"):
        parity.run_suite(reference, EagerRuntime(RandomSource(TINY, SEED)), suite, parity.tolerances_for("fp32"))


# ---------------------------------------------------------------- compare_case on synthetic logits
def decode_case(prompt_len=3, steps=4):
    return parity.Case("synthetic", "synthetic logits", [list(range(prompt_len))], steps)


def synthetic(case, vocab=8, seed=0):
    n = len(case.prompts[0]) + case.decode_steps
    logits = np.random.default_rng(seed).normal(size=(1, n, vocab)).astype(np.float32)
    logits[0, :, 0] = 5.0  # a clear favourite everywhere ...
    return logits


TOL = parity.Tolerances(atol=1e-3, rtol=0.0, kl=1e-2)


def test_near_tie_divergence_passes():
    case = decode_case()
    ref = synthetic(case)
    step = 2
    ref[0, 2 + step, 1] = 5.0 + 5e-4  # ... except at decode step 2, where token 1 leads by 5e-4 < 2 * atol
    test = ref.copy()
    test[0, 2 + step, 1] -= 9e-4  # within atol, and enough to flip the argmax
    result = parity.compare_case(case, ref, test, TOL)
    assert result.passed and result.first_divergence == step and result.near_tie is True
    assert result.margin == pytest.approx(5e-4, rel=1e-3) and result.top1 == pytest.approx(6 / 7)


def test_real_divergence_fails():
    case = decode_case()
    ref = synthetic(case)
    test = ref.copy()
    test[0, 4, 3] = 6.0  # token 3 overtakes by far at decode step 2
    result = parity.compare_case(case, ref, test, TOL)
    assert not result.passed and result.first_divergence == 2 and result.near_tie is False
    assert any("not near-ties" in f for f in result.failures)
    assert any("decode step 2" in f for f in result.failures)


def test_relative_error_is_relative_to_the_logit_range():
    case = decode_case(steps=0)
    ref = synthetic(case)
    test = ref + 1e-3
    result = parity.compare_case(case, ref, test, parity.Tolerances(atol=0.0, rtol=3e-4, kl=1))
    assert result.max_rel == pytest.approx(1e-3 / 5.0, rel=1e-3) and result.passed is True  # 1e-3 <= 3e-4 * 5
    assert result.max_abs == pytest.approx(1e-3, rel=1e-3)


def test_non_finite_logits_fail_and_json_stays_valid():
    case = decode_case()
    ref = synthetic(case)
    test = ref.copy()
    test[0, 1, 2] = np.nan
    result = parity.compare_case(case, ref, test, TOL)
    assert not result.passed and "non-finite logits" in result.failures[0] and "position 1" in result.failures[0]
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["max_abs"] is None


def test_kl_alone_can_fail():
    case = decode_case(steps=0)
    ref = synthetic(case)
    test = ref.copy()
    test[0, :, 1] += 0.5  # a big logit shift of a non-top token
    result = parity.compare_case(case, ref, test, parity.Tolerances(atol=1.0, rtol=0.0, kl=1e-6))
    assert not result.passed and result.failures[0].startswith("KL up to")


def test_row_parts_compare_exactly_like_padded_arrays():
    """The runners hand over each row's logits as parts (the prompt's, as the runtime returned them, then the
    decode steps'), not one padded copy: the verdict and every number are the same as from the padded array."""
    case = parity.Case("rows", "two rows", [[1, 2, 3, 4, 5], [6, 7]], 3)
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2, 8, 16)).astype(np.float32)
    test = ref + rng.normal(scale=2e-4, size=ref.shape).astype(np.float32)
    test[1, 3, 5] += 0.5  # a failure in row 1's decode part
    test[0, 6, 2] = np.nan  # and a non-finite logit in row 0's

    def parts(logits, cut):
        return [[logits[row, :cut(len(p))], logits[row, cut(len(p)):len(p) + 3]] for row, p in enumerate(case.prompts)]

    padded = parity.compare_case(case, ref, test, TOL).to_dict()
    assert not padded["passed"] and "non-finite logits from the runtime (first at row 0 decode step 2)" in \
        padded["failures"][0]
    for cut in (lambda n: n, lambda n: 1, lambda n: n + 2):  # at the prompt's end (the runners' cut) and elsewhere
        assert parity.compare_case(case, parts(ref, cut), parts(test, cut), TOL).to_dict() == padded
    short = [[test[0, :8]], [test[1, :4]]]  # a row one position short
    result = parity.compare_case(case, parts(ref, lambda n: n), short, TOL)
    assert not result.passed and "the runtime returned logits of shape [(8, 16), (4, 16)] per row" in \
        result.failures[0]


# ---------------------------------------------------------------- prompts file
def test_prompts_file(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "import os\\n", "name": "imports"}\n\n"def f():"\n'
                    '{"fim_prefix": "a = ", "fim_suffix": "\\n", "max_new_tokens": 2}\n')
    cases = parity.load_prompts(path, tokenizer, TINY.vocab_size)
    assert [c.name for c in cases] == ["imports", "prompt-3", "prompt-4"]
    assert cases[0].prompts == [tokenizer.encode("import os\n")] and cases[2].decode_steps == 2
    assert cases[2].prompts[0][0] == tokenizer.fim_prefix_id


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not JSON"),
    ('{"text": "x"}', 'needs a "prompt" string'),
    ('{"prompt": ""}', "the prompt is empty"),
    ('{"prompt": "x", "max_new_tokens": -1}', "max_new_tokens"),
    ("\n", "holds no prompts"),
])
def test_bad_prompts_file(tmp_path, tokenizer, text, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(parity.UserError, match=message):
        parity.load_prompts(path, tokenizer, TINY.vocab_size)


# ---------------------------------------------------------------- the CLI, eager backend (checkpoints on disk)
class PerturbedSource(TensorSource):
    """Another source's weights with one element moved."""

    def __init__(self, base: TensorSource, name: str, index: int, delta: float):
        self.base, self.config, self.description = base, base.config, f"{base.description}, {name} perturbed"
        self.name, self.index, self.delta = name, index, delta

    def get(self, name, dtype):
        tensor = self.base.get(name, dtype)
        if name == self.name:
            tensor.view(-1)[self.index] += self.delta
        return tensor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    good = write_checkpoint(RandomSource(TINY, SEED), root / "good", "fp32")
    weight = write_checkpoint(PerturbedSource(RandomSource(TINY, SEED), "model.layers.0.self_attn.q_proj.weight",
                                              7, 1.0), root / "weight", "fp32")
    window = write_checkpoint(RandomSource(TINY.replace(sliding_window=W + 1), SEED), root / "window", "fp32")
    return {"good": good, "weight": weight, "window": window}


def cli(args, capsys):
    code = main(["parity", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_passes_on_the_same_weights(checkpoints, capsys):
    code, out, _ = cli([checkpoints["good"], "--backend", "eager", "--checkpoint", checkpoints["good"],
                        "--decode-steps", "40"], capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("parity: eager fp32 against eager fp32 on checkpoint")
    assert lines[1].split() == ["case", "pos", "max", "abs", "max", "rel", "top-1", "KL", "mean", "KL", "max",
                                "diverges", "near-tie", "result"]
    assert [line.split()[0] for line in lines[2:7]] == ["short", "long", "fim", "batch", "decode"]
    assert all(line.endswith("PASS") for line in lines[2:7]) and lines[-1] == "PASSED"


@pytest.mark.parametrize("corruption", ["weight", "window"])
def test_cli_fails_on_a_corrupted_checkpoint(checkpoints, capsys, corruption, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "print(1)", "name": "mine"}\n')
    code, out, _ = cli([checkpoints[corruption], "--backend", "eager", "--checkpoint", checkpoints["good"],
                        "--decode-steps", "40", "--prompts", prompts, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    assert report["backend"] == "eager" and report["dtype"] == "fp32"
    assert report["tolerances"] == {"atol": 1e-4, "rtol": 1e-5, "kl": 1e-6}
    cases = {c["name"]: c for c in report["cases"]}
    assert list(cases) == ["short", "long", "fim", "batch", "decode", "mine"]
    assert not cases["long"]["passed"] and not cases["decode"]["passed"]
    assert {"max_abs", "max_rel", "top1", "kl_mean", "kl_max", "first_divergence", "near_tie", "failures"} <= set(cases["long"])
    if corruption == "window":
        assert cases["short"]["passed"] and "sliding_window=33 (reference 32)" in report["notes"][0]


def test_cli_tolerance_override_turns_a_failure_into_a_pass(checkpoints, capsys):
    code, out, _ = cli([checkpoints["weight"], "--backend", "eager", "--checkpoint", checkpoints["good"],
                        "--decode-steps", "8", "--atol", "1", "--kl", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["tolerances"]["atol"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "is not a folder"),
    (["{tmp}"], "has no sc2deploy.json, so it is not a finished ort folder; give the folder `sc2deploy export` wrote"),
    (["{tmp}", "--backend", "onnx"], "unknown backend 'onnx'"),
    (["{good}", "--backend", "eager", "--prompts", "{tmp}/none.jsonl"], "cannot read --prompts file"),
    # a checkpoint where an artifact belongs: the way out, not "pass --checkpoint" (which leads back here)
    (["{good}"], "{good} is a Hugging Face checkpoint, not an export artifact; export it first: sc2deploy export "
                 "--checkpoint {good} --out ART, then sc2deploy parity ART"),
    (["{good}", "--backend", "trt"], "sc2deploy build ART --out ENGINE, then sc2deploy parity ENGINE --backend trt"),
])
def test_cli_errors_exit_2(checkpoints, capsys, tmp_path, args, message):
    code, out, err = cli([a.format(tmp=tmp_path, good=checkpoints["good"]) for a in args], capsys)
    assert code == 2 and message.format(good=checkpoints["good"]) in err and not out
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_manifest_exits_2(capsys, tmp_path):
    (tmp_path / "sc2deploy.json").write_text("{broken")
    code, _, err = cli([tmp_path], capsys)
    assert code == 2 and "sc2deploy.json is not valid JSON" in err


def test_cli_refuses_a_different_model(checkpoints, capsys, tmp_path):
    other = write_checkpoint(RandomSource(TINY.replace(num_hidden_layers=1), SEED), tmp_path / "other", "fp32")
    code, _, err = cli([other, "--backend", "eager", "--checkpoint", checkpoints["good"]], capsys)
    assert code == 2 and "num_hidden_layers=1 (reference 2)" in err


# ---------------------------------------------------------------- the acceptance: a real ONNX export, corrupted
# The corruptions edit the artifact and then re-seal its manifest (sizes and sha256), so that it is parity, not
# the runtime's integrity check, that has to notice them.
def reseal(folder):
    from sc2deploy.contract import sha256_file

    path = folder / "sc2deploy.json"
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        entry["bytes"], entry["sha256"] = (folder / name).stat().st_size, sha256_file(folder / name)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def copy_artifact(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def set_window_of_one_node(folder, window):
    """local_window_size of the first GroupQueryAttention node (layer 0) only."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attribute = next(a for a in node.attribute if a.name == "local_window_size")
    assert attribute.i == W
    attribute.i = window
    onnx.save(model, str(folder / "model.onnx"))
    reseal(folder)


def perturb_external_weight(folder, name, index, delta):
    """Add `delta` to one float32 element of initializer `name` inside the external data file."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    assert tensor.data_type == onnx.TensorProto.FLOAT
    where = {e.key: e.value for e in tensor.external_data}
    position = int(where.get("offset", 0)) + 4 * index
    with open(folder / where["location"], "r+b") as f:
        f.seek(position)
        value = np.frombuffer(f.read(4), dtype=np.float32) + np.float32(delta)
        f.seek(position)
        f.write(value.tobytes())
    reseal(folder)


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory):
    from sc2deploy.export import export_artifact

    return export_artifact(RandomSource(TINY, SEED), tmp_path_factory.mktemp("ort") / "tiny-ort", "fp32", "ort")


def test_export_passes(ort_artifact, capsys):
    code, out, _ = cli([ort_artifact, "--json"], capsys)
    report = json.loads(out)
    assert code == 0, out
    assert report["passed"] and report["backend"] == "ort" and report["dtype"] == "fp32"
    assert "random weights (seed 0)" in report["reference"]
    assert [c["name"] for c in report["cases"]] == ["short", "long", "fim", "batch", "decode"]


@pytest.mark.parametrize("window", [W - 1, W + 1])
def test_export_with_window_off_by_one_fails(ort_artifact, capsys, tmp_path, window):
    bad = copy_artifact(ort_artifact, tmp_path / "bad")
    set_window_of_one_node(bad, window)
    code, out, _ = cli([bad, "--decode-steps", "40", "--json"], capsys)
    cases = {c["name"]: c for c in json.loads(out)["cases"]}
    assert code == 1 and not cases["long"]["passed"] and not cases["decode"]["passed"]
    assert cases["short"]["passed"]  # 27 positions: never reaches the window
    assert f"(first: position {min(window, W)}," in cases["long"]["failures"][0]


def test_export_with_one_weight_perturbed_fails(ort_artifact, capsys, tmp_path):
    bad = copy_artifact(ort_artifact, tmp_path / "bad")
    perturb_external_weight(bad, "model.layers.1.self_attn.q_proj.weight.T", 5 * TINY.q_size + 3, 1.0)
    code, out, _ = cli([bad, "--decode-steps", "40"], capsys)
    assert code == 1 and out.splitlines()[-1] == "FAILED: 5 of 5 cases"


def test_export_corruption_without_reseal_is_an_error(ort_artifact, capsys, tmp_path):
    bad = copy_artifact(ort_artifact, tmp_path / "bad")
    (bad / "model.onnx.data").write_bytes(b"truncated")
    code, out, err = cli([bad], capsys)
    assert code == 2 and "model.onnx.data" in err and not out


def test_export_checked_with_the_wrong_backend_is_an_error(ort_artifact, capsys):
    code, out, err = cli([ort_artifact, "--backend", "trt"], capsys)
    assert code == 2 and "trt" in err and not out
    code, out, err = cli([ort_artifact, "--backend", "eager"], capsys)
    assert code == 2 and f"{ort_artifact} is an export artifact, not a checkpoint; check it with --backend ort" in err


def test_an_artifact_given_as_the_reference_checkpoint_is_an_error(ort_artifact, capsys):
    code, out, err = cli([ort_artifact, "--checkpoint", ort_artifact], capsys)
    assert code == 2 and not out and err.count("\n") == 1
    assert f"--checkpoint {ort_artifact}: this is an export artifact (has sc2deploy.json)" in err


# ---------------------------------------------------------------- the source checkpoint's recorded sha256
@pytest.fixture
def exported_checkpoint(tmp_path):
    """A checkpoint on disk and its ort export, which records the sha256 of the checkpoint's weight files."""
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.export import export_artifact

    folder = write_checkpoint(RandomSource(TINY, SEED), tmp_path / "ckpt", "fp32")
    return folder, export_artifact(CheckpointSource(folder), tmp_path / "art", "fp32", "ort")


def nudge_a_weight(folder):
    """Change one float32 of model.safetensors in place: still a valid checkpoint, different weights."""
    import struct

    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    offset = 8 + header + 4 * 1000
    raw[offset:offset + 4] = (np.frombuffer(raw[offset:offset + 4], np.float32) + np.float32(0.5)).tobytes()
    path.write_bytes(bytes(raw))


def test_a_checkpoint_changed_since_export_is_named_not_blamed_on_the_runtime(exported_checkpoint, capsys):
    folder, artifact = exported_checkpoint
    code, out, err = cli([artifact, "--decode-steps", "2"], capsys)
    assert code == 0 and f"note: source checkpoint {folder} matches the sha256 recorded at export" in out
    nudge_a_weight(folder)
    code, out, err = cli([artifact, "--decode-steps", "2"], capsys)
    assert code == 2 and not out and "Traceback" not in err
    assert (f"the checkpoint {folder} changed since {artifact} was exported from it (model.safetensors differs from "
            f"the sha256 in {artifact}/sc2deploy.json)") in err
    assert f"re-export: sc2deploy export --checkpoint {folder} --out {artifact} --force" in err


def test_a_different_reference_checkpoint_is_refused(exported_checkpoint, checkpoints, capsys):
    folder, artifact = exported_checkpoint
    code, out, err = cli([artifact, "--checkpoint", checkpoints["weight"], "--decode-steps", "2"], capsys)
    assert code == 2 and not out
    assert f"--checkpoint {checkpoints['weight']} is not the checkpoint {artifact} was made from" in err
    code, out, _ = cli([artifact, "--checkpoint", checkpoints["good"], "--decode-steps", "2"], capsys)
    assert code == 0 and "matches the sha256 sc2deploy.json records" in out  # the same weights, another folder


def test_an_old_manifest_without_hashes_still_checks_and_says_so(exported_checkpoint, capsys):
    folder, artifact = exported_checkpoint
    path = artifact / "sc2deploy.json"
    manifest = json.loads(path.read_text())
    del manifest["source"]["sha256"]
    path.write_text(json.dumps(manifest))
    code, out, _ = cli([artifact, "--decode-steps", "2"], capsys)
    assert code == 0 and "note: sc2deploy.json records no sha256 of the source checkpoint" in out


# ---------------------------------------------------------------- the chunked reference and progress lines
@pytest.mark.parametrize("chunk", [1, 7, W, 50])
def test_chunked_reference_equals_one_shot_prefill(chunk):
    """Prompts longer than the window, prefilled in chunks through the ring cache: the same logits as one pass
    (fp32, 1e-5), and the same cache (the decode steps after it, two windows on, agree too)."""
    source = RandomSource(TINY, SEED)
    one_shot = EagerRuntime(source, max_batch=3)
    chunked = parity.ChunkedReference(source, max_batch=3, chunk=chunk)
    assert chunked.capacity == W  # a ring of one window: chunks past it must use the cached keys
    prompt = [(37 * i + 11) % TINY.vocab_size for i in range(2 * W + 5)]
    expected, got = one_shot.prefill(0, prompt, all_logits=True), chunked.prefill(0, prompt, all_logits=True)
    assert got.shape == expected.shape == (len(prompt), TINY.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.prefill(1, prompt), one_shot.prefill(1, prompt), rtol=0, atol=1e-5)
    for step in range(2 * W):
        token = (5 * step + 3) % TINY.vocab_size
        torch.testing.assert_close(chunked.decode([0], [token]), one_shot.decode([0], [token]), rtol=0, atol=1e-5)
    batch = [prompt[:5], prompt[:W + 3], prompt[3:3 + W // 2 + 1]]
    for got_row, expected_row in zip(chunked.prefill_batch(batch), one_shot.prefill_batch(batch)):
        torch.testing.assert_close(got_row, expected_row, rtol=0, atol=1e-5)
    assert chunked.decode([0, 1, 2], [1, 2, 3]).shape == (3, TINY.vocab_size)


def test_chunked_reference_passes_the_suite_against_one_shot(suite):
    report = parity.run_suite(parity.ChunkedReference(RandomSource(TINY, SEED), max_batch=3, chunk=5), eager(),
                              suite, parity.tolerances_for("fp32"))
    assert report.passed, [c.failures for c in report.cases]


def test_parity_piped_prints_stage_lines(ort_artifact):
    """Long work is not silent when stderr is a pipe: a line per step (and a heartbeat every few seconds)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sc2deploy.cli", "parity", str(ort_artifact), "--decode-steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    for expected in ("parity: loading the ort runtime under test", "parity: loading the eager fp32 reference",
                     "parity: case 1/5 short (a short code prompt): the eager reference ...",
                     f"parity: case 2/5 long (a {2 * W + 5}-token prompt, window {W}): the ort runtime ...",
                     "parity: case 5/5 decode"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)


@pytest.mark.parametrize("dtype, corruption", [("fp32", None), ("bf16", None), ("fp32", "window")])
def test_cli_cuda_backend(checkpoints, capsys, dtype, corruption):
    """`parity --backend cuda`: the GPU runtime (here on CPU under the Triton interpreter) against eager fp32."""
    from sc2deploy.plugins.triton_kernel import INTERPRET

    if not INTERPRET:
        pytest.skip("the CPU run of the cuda runtime needs TRITON_INTERPRET=1")
    folder = checkpoints[corruption or "good"]
    code, out, _ = cli([folder, "--backend", "cuda", "--device", "cpu", "--dtype", dtype, "--checkpoint",
                        checkpoints["good"], "--decode-steps", "40", "--json"], capsys)
    report = json.loads(out)
    assert (report["backend"], report["dtype"]) == ("cuda", dtype)
    assert code == (1 if corruption else 0) and report["passed"] is not bool(corruption), report["cases"]


def test_nan_logits_fail_through_polygraphy_validate(checkpoints, tmp_path, capsys):
    nan = write_checkpoint(PerturbedSource(RandomSource(TINY, SEED), "model.norm.weight", 0, float("nan")),
                           tmp_path / "nan", "fp32")
    code, out, _ = cli([nan, "--backend", "eager", "--checkpoint", checkpoints["good"], "--decode-steps", "4",
                        "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["passed"]
    assert all("the eager runtime produced NaN or inf logits" in c["failures"][0] for c in report["cases"])


def test_save_results_writes_polygraphy_run_results(ort_artifact, tmp_path, capsys):
    from polygraphy.comparator import RunResults

    saved = tmp_path / "results.json"
    code, out, _ = cli([ort_artifact, "--decode-steps", "4", "--save-results", saved], capsys)
    assert code == 0, out
    results = RunResults.load(str(saved))
    assert [name for name, _ in results.items()] == ["eager-fp32", "ort-fp32"]
    assert all(len(iterations) == 5 for _, iterations in results.items())  # one per case
    short = results["ort-fp32"][0]
    assert short["decode_logits"].shape[-1] == TINY.vocab_size
    polygraphy = Path(sys.executable).with_name("polygraphy")
    if polygraphy.is_file():
        shown = subprocess.run([str(polygraphy), "inspect", "data", str(saved)], capture_output=True, text=True)
        assert shown.returncode == 0 and "ort-fp32" in shown.stdout + shown.stderr
    code, _, err = cli([ort_artifact, "--save-results", tmp_path / "missing" / "r.json"], capsys)
    assert code == 2 and "its folder does not exist" in err
