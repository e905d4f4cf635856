"""`sc2deploy parity` on head artifacts: the causal LM's tolerances and report; a correct export passes, a
corrupted one fails where it should."""
from __future__ import annotations

import json

import pytest

from sc2deploy.checkpoint import RandomSource
from sc2deploy.cli import main
from sc2deploy.config import preset
from sc2deploy.export import export_artifact
from sc2deploy.tasks import BASE_MODEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, Head
from tests.test_parity import copy_artifact, perturb_external_weight, set_window_of_one_node

TINY = preset("tiny")  # the real vocabulary: the suite's code prompts; window 32
HEADS = {
    SEQUENCE_CLASSIFICATION: Head(SEQUENCE_CLASSIFICATION, ("neg", "pos"), pad_token_id=0),
    TOKEN_CLASSIFICATION: Head(TOKEN_CLASSIFICATION, ("O", "B", "I"), pad_token_id=0, score_bias=True),
    BASE_MODEL: Head(BASE_MODEL, pad_token_id=0),
    "no-pad": Head(SEQUENCE_CLASSIFICATION, ("neg", "pos")),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    base = tmp_path_factory.mktemp("head-parity")
    made: dict = {}

    def get(name):
        if name not in made:
            made[name] = export_artifact(RandomSource(TINY.replace(head=HEADS[name]), 0), base / name, "fp32", "ort")
        return made[name]

    return get


def parity(args, capsys):
    code = main(["parity", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


@pytest.mark.parametrize("name", [SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, BASE_MODEL])
def test_a_head_export_passes(artifacts, capsys, name):
    code, report, _ = parity([artifacts(name)], capsys)
    assert code == 0, report
    assert report["backend"] == "ort" and report["tolerances"] == {"atol": 1e-4, "rtol": 1e-5, "kl": 1e-6}
    cases = {c["name"]: c for c in report["cases"]}
    assert list(cases) == ["short", "long", "fim", "batch", "batch-left"]
    if name == SEQUENCE_CLASSIFICATION:
        assert cases["long"]["positions"] == 1 and cases["batch"]["positions"] == 3
    else:
        assert cases["long"]["positions"] == 2 * TINY.window + 5
    if name == BASE_MODEL:  # hidden states: no KL or top-1
        assert cases["long"]["kl_max"] is None and cases["long"]["top1"] is None
    else:
        assert cases["long"]["top1"] == 1.0 and cases["long"]["kl_max"] < 1e-12
    assert max(c["max_abs"] for c in report["cases"]) < 2e-6


def test_a_window_off_by_one_fails_past_the_window(artifacts, capsys, tmp_path):
    bad = copy_artifact(artifacts(TOKEN_CLASSIFICATION), tmp_path / "bad")
    set_window_of_one_node(bad, TINY.window + 1)
    code, report, _ = parity([bad], capsys)
    cases = {c["name"]: c for c in report["cases"]}
    assert code == 1 and cases["short"]["passed"] and not cases["long"]["passed"]
    assert f"(first: position {TINY.window}," in cases["long"]["failures"][0]
    assert not cases["batch"]["passed"] and not cases["batch-left"]["passed"]  # a row of W + 3 tokens


def test_one_perturbed_weight_fails_every_case(artifacts, capsys, tmp_path):
    bad = copy_artifact(artifacts(SEQUENCE_CLASSIFICATION), tmp_path / "bad")
    perturb_external_weight(bad, "model.layers.1.mlp.c_fc.weight.T", 3 * TINY.intermediate_size + 7, 1.0)
    code, report, _ = parity([bad], capsys)
    assert code == 1 and not any(c["passed"] for c in report["cases"]), report


def test_a_classifier_without_pad_token_id_runs_single_prompts_only(artifacts, capsys):
    code, report, _ = parity([artifacts("no-pad")], capsys)
    assert code == 0 and [c["name"] for c in report["cases"]] == ["short", "long", "fim"]
    assert any("batch cases left out" in note for note in report["notes"])


def test_a_head_artifact_with_another_backend_is_an_error(artifacts, capsys):
    code = main(["parity", str(artifacts(BASE_MODEL)), "--backend", "trt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "runs in ONNX Runtime only" in err
