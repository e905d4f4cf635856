"""Results through the generated stubs equal `sc2deploy generate` (the Oracle) for the same request."""
from __future__ import annotations

import pytest

from sc2deploy.serving.client import FINISH_NAMES, make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(120)

PROMPT = "def fibonacci(n):\n    "


def joined(chunks):
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    return text, ids, chunks[-1]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=50, top_p=0.9, seed=1234),
                                      dict(temperature=1.3, seed=7)], ids=["greedy", "seeded-topk-topp", "seeded"])
def test_unary_and_stream_equal_generate(server, oracle, sampling):
    request = make_request(PROMPT, max_tokens=24, **sampling)
    expected = oracle(request)
    response = server.client.complete(request, timeout=60)
    assert list(response.token_ids) == expected.output_ids
    assert response.text == expected.text
    assert FINISH_NAMES[response.finish_reason] == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.output_ids)
    text, ids, last = joined(list(server.client.stream(request, timeout=60)))
    assert (text, ids) == (expected.text, expected.output_ids)
    assert FINISH_NAMES[last.finish_reason] == expected.finish_reason
    assert last.usage == response.usage


def test_fim_request_uses_the_exact_fim_prompt(server, oracle, tokenizer):
    prefix, suffix = "def add(a, b):\n    ", "\n    return result\n"
    request = make_request(prefix, suffix, max_tokens=16)
    response = server.client.complete(request, timeout=60)
    assert response.usage.prompt_tokens == len(tokenizer.fim_prompt_ids(prefix, suffix))
    expected = oracle(request)
    assert expected.prompt_ids == tokenizer.fim_prompt_ids(prefix, suffix)
    assert list(response.token_ids) == expected.output_ids and response.text == expected.text


def test_fim_at_the_start_of_a_file(server, tokenizer):
    response = server.client.complete(make_request("", "import os\n", max_tokens=4), timeout=60)
    assert response.usage.prompt_tokens == len(tokenizer.fim_prompt_ids("", "import os\n"))


def test_repo_level_context(server, oracle, tokenizer):
    request = make_request("def main():\n", "", max_tokens=8, repo_name="octo/demo", file_path="src/app.py",
                           context_files=[("src/util.py", "def helper():\n    return 1\n")])
    response = server.client.complete(request, timeout=60)
    ids = tokenizer.repo_prompt_ids("octo/demo", [("src/util.py", "def helper():\n    return 1\n"),
                                                  ("src/app.py", "def main():\n")])
    assert response.usage.prompt_tokens == len(ids)
    assert list(response.token_ids) == oracle(request).output_ids
    fim = make_request("x = ", "\nprint(x)\n", max_tokens=4, repo_name="octo/demo", file_path="a.py")
    assert server.client.complete(fim, timeout=60).usage.prompt_tokens == len(
        tokenizer.repo_prompt_ids("octo/demo", [("a.py", "x = ")], suffix="\nprint(x)\n"))


def test_stop_sequences_cut_the_text_exactly(server, oracle):
    base = make_request(PROMPT, max_tokens=24)
    full = oracle(base).text
    assert len(full) > 12, "the greedy completion is too short to pick a stop string from"
    stop = full[6:9]
    cut = full[:full.find(stop)]
    request = make_request(PROMPT, max_tokens=24, stop=[stop, "never-there"])
    response = server.client.complete(request, timeout=60)
    assert response.text == cut == oracle(request).text
    assert response.finish_reason == pb.FINISH_REASON_STOP and response.stop_sequence == stop
    text, _, last = joined(list(server.client.stream(request, timeout=60)))
    assert text == cut and last.finish_reason == pb.FINISH_REASON_STOP and last.stop_sequence == stop


def test_logprobs(server, oracle):
    request = make_request(PROMPT, max_tokens=6, logprobs=3)
    response = server.client.complete(request, timeout=60)
    expected = oracle(request)
    assert len(response.logprobs) == len(expected.output_ids)
    for entry, token, (logprob, top) in zip(response.logprobs, expected.output_ids, expected.logprobs):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(logprob, abs=1e-5)
        assert [t.token_id for t in entry.top] == [t for t, _ in top]
        assert [t.logprob for t in entry.top] == pytest.approx([p for _, p in top], abs=1e-5)
    chunks = list(server.client.stream(request, timeout=60))
    assert [e.token_id for c in chunks for e in c.logprobs] == expected.output_ids


def test_tiny_top_p_keeps_the_most_likely_token(server, oracle):
    greedy = server.client.complete(make_request(PROMPT, max_tokens=8), timeout=60)
    tiny = server.client.complete(make_request(PROMPT, max_tokens=8, temperature=0.7, top_p=1e-300, seed=3), timeout=60)
    assert list(tiny.token_ids) == list(greedy.token_ids)


def test_model_info(server):
    info = server.client.info()
    assert (info.size, info.runtime, info.dtype) == ("tiny", "eager", "fp32")
    assert (info.window, info.context_length, info.max_batch) == (32, 1024, 8)
    assert {"sc2deploy", "torch", "grpcio", "protobuf"} <= set(info.versions)
