"""The generation loop: stop strings cut exactly, stop tokens end it, seeded sampling repeats."""
from __future__ import annotations

import pytest

from sc2deploy.checkpoint import RandomSource
from sc2deploy.config import preset
from sc2deploy.errors import UserError
from sc2deploy.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, generate
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.sampling import SamplingParams
from sc2deploy.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def runtime():
    return EagerRuntime(RandomSource(preset("tiny"), seed=0), capacity=256)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def test_stop_string_cuts_text_exactly(runtime, tok):
    prompt = tok.encode("def main():")
    full = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=24), stop_ids=frozenset())
    assert full.finish_reason == FINISH_LENGTH and len(full.text) > 10
    stop = full.text[5:8]
    cut = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=24, stop=(stop,)), stop_ids=frozenset())
    assert cut.finish_reason == FINISH_STOP
    assert cut.text == full.text[: full.text.index(stop)]


def test_stop_token_ends_generation(runtime, tok):
    prompt = tok.encode("x = 1")
    full = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=12), stop_ids=frozenset())
    stop_at = full.output_ids[4]
    cut = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=12), stop_ids=frozenset({stop_at}))
    assert cut.finish_reason == FINISH_EOS
    assert cut.output_ids == full.output_ids[: full.output_ids.index(stop_at)]


def test_seeded_sampling_repeats_and_seeds_differ(runtime, tok):
    prompt = tok.encode("import os")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=5)
    a = generate(runtime, tok, prompt, params)
    b = generate(runtime, tok, prompt, params)
    c = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=6))
    assert a.output_ids == b.output_ids != c.output_ids


def test_top_k_one_is_greedy(runtime, tok):
    prompt = tok.encode("for i in")
    greedy = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=8), stop_ids=frozenset())
    k1 = generate(runtime, tok, prompt, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1, seed=1),
                  stop_ids=frozenset())
    assert greedy.output_ids == k1.output_ids


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(stop=("",))])
def test_bad_sampling_values(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


def test_prompt_plus_tokens_over_context(runtime, tok):
    with pytest.raises(UserError, match="exceeds the model's context"):
        generate(runtime, tok, [1] * 1000, SamplingParams(max_new_tokens=100))


def test_finish_reasons_have_one_vocabulary():
    """generate's JSON and complete's (the server's enum, named by the client) use the same short names."""
    pytest.importorskip("grpc")
    from sc2deploy.generation import FINISH_CANCELLED
    from sc2deploy.serving.client import FINISH_NAMES

    assert set(FINISH_NAMES.values()) - {"unspecified"} == {FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED}
