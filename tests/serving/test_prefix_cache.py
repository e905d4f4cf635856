"""Prefix caching and chunked prefill in the server: a prompt that reuses a cached prefix, or is prefilled in
chunks, gets exactly the completion of a cold run (the oracle: `generate` alone in a batch-1 runtime). The tiny
preset's window is 32 tokens, so the prompts here run past it."""
from __future__ import annotations

import threading

import pytest

from sc2deploy.serving.client import make_request


def sample(server, name: str) -> float:
    return server.server.metrics.registry.get_sample_value(name) or 0.0


CODE = "".join(f"x{i} = {i}\n" for i in range(12))  # 76 tokens


@pytest.mark.parametrize("fim", [False, True])
def test_a_shared_prefix_is_reused_and_the_completion_is_exact(make_server, oracle, fim):
    with make_server(max_batch=2) as server:
        first = make_request(CODE[:20], suffix="\nprint(x)\n" if fim else "", max_tokens=4)
        server.client.complete(first)  # 17 (FIM: 27) tokens + 3 fed back: its whole cache fits the 32-token ring
        server.client.complete(make_request("import sys\n" * 4, max_tokens=20))  # overwrites the slot's rows
        # within two windows (two layers) of the reused part, so that its every position reaches the logits
        second = make_request(CODE[:70], suffix="\nprint(x)\n" if fim else "", max_tokens=12, logprobs=1)
        got = server.client.complete(second)
        expected = [p for p, _ in oracle(second).logprobs]  # logits equal, not only the argmax
        assert [x.logprob for x in got.logprobs] == pytest.approx(expected, abs=1e-4)
        if fim:  # the suffix comes after the prefix: only the shared start of the prefix is reused
            assert sample(server, "sc2deploy_prefix_cache_hits_total") == 1
        reused = sample(server, "sc2deploy_prefix_cache_reused_tokens_total")
        assert reused >= 8
        assert got.text == oracle(second).text and got.usage.prompt_tokens == len(oracle(second).prompt_ids)
        # the prompt past the reused part crossed the window: 60 tokens and more against a 32-token cache
        assert got.usage.prompt_tokens >= 60


def test_an_identical_prompt_past_the_window_reuses_all_but_its_last_token(make_server, oracle, wait_for):
    with make_server(max_batch=2) as server:
        request = make_request(CODE, max_tokens=6)
        first = server.client.complete(request)
        server.wait_idle()
        before = sample(server, "sc2deploy_prefix_cache_reused_tokens_total")
        again = server.client.complete(request)
        assert again.text == first.text == oracle(request).text
        # the stored sequence ran past the ring, so only the whole of it could serve, and the prompt is
        # shorter than it (prompt + 5 generated tokens): no hit, a cold prefill, the same answer
        assert sample(server, "sc2deploy_prefix_cache_reused_tokens_total") == before


def test_concurrent_requests_sharing_prefixes_match_cold_runs(make_server, oracle):
    base = CODE[:30]
    requests = [make_request(base + tail, max_tokens=8) for tail in ("a = 1\n", "b = 2\n", "c", "def f():\n")]
    requests += [make_request(base, suffix=tail, max_tokens=8) for tail in ("\n", "\nreturn x\n")]
    with make_server(max_batch=3) as server:
        server.client.complete(make_request(base, max_tokens=2))  # seeds the cache
        results: dict[int, str] = {}

        def run(i):
            results[i] = server.client.complete(requests[i]).text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sample(server, "sc2deploy_prefix_cache_hits_total") >= 3
        for i, request in enumerate(requests):
            assert results[i] == oracle(request).text, i


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_prefill_gives_the_cold_completion(make_server, oracle, chunk):
    request = make_request(CODE * 2, max_tokens=10)  # 152 tokens: nearly five windows
    with make_server(max_batch=2, prefill_tokens=chunk, prefix_cache_bytes=0) as server:
        stream = server.client.stream(make_request("while True:\n", max_tokens=300), timeout=60)
        next(stream)  # a running stream: the chunks go between its decode steps
        got = server.client.complete(request)
        assert got.text == oracle(request).text
        tokens = sum(len(c.token_ids) for c in stream)
        assert tokens == 299
        assert sample(server, "sc2deploy_prefix_cache_lookups_total") == 0


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(make_server):
    with make_server(max_batch=2, prefill_tokens=8, prefix_cache_bytes=0) as server:
        stream = server.client.stream(make_request("while True:\n", max_tokens=400), timeout=60)
        next(stream)
        steps = lambda: sample(server, "sc2deploy_batch_size_count")  # noqa: E731
        before = steps()
        server.client.complete(make_request(CODE * 3, max_tokens=1))  # 228 tokens: 29 chunks of 8
        # one decode step of the running stream per chunk: it was not stalled for the whole prompt
        assert steps() - before >= 20
        stream.cancel()
