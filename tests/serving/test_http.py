"""The HTTP front end on 127.0.0.1, through real clients: the `openai` package for /v1/completions, httpx for
/infill and the error paths. Greedy HTTP output equals gRPC's and `sc2deploy generate`'s (the oracle)."""
from __future__ import annotations

import json
import socket
import ssl
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sc2deploy.serving.client import make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

openai = pytest.importorskip("openai")

MODEL = "starcoder2-tiny"


@pytest.fixture(scope="module")
def web(make_server):
    with make_server(max_batch=4, max_queue=16, http_port=0) as running:
        running.client.wait_ready(30)
        yield running


def base(running) -> str:
    return f"http://127.0.0.1:{running.server.http_port}"


def openai_client(running, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=base(running) + "/v1", max_retries=0, timeout=60)


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event, JSON-decoded ("[DONE]" stays a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_openai_completion_equals_generate_and_grpc(web, oracle):
    client = openai_client(web)
    expected = oracle(make_request("def fibonacci(n):\n", max_tokens=12))
    answer = client.completions.create(model=MODEL, prompt="def fibonacci(n):\n", max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(expected.prompt_ids)
    assert answer.usage.completion_tokens == len(expected.output_ids) == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    assert answer.model == MODEL and answer.object == "text_completion"
    grpc_answer = web.client.complete(make_request("def fibonacci(n):\n", max_tokens=12))
    assert grpc_answer.text == answer.choices[0].text


def test_openai_stream_with_usage_and_suffix(web, oracle):
    client = openai_client(web)
    request = make_request("def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n", max_tokens=10)
    expected = oracle(request)
    chunks = list(client.completions.create(model=MODEL, prompt=request.prompt, suffix=request.suffix, max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [{"length": "length", "eos": "stop", "stop": "stop"}[expected.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.output_ids)
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])
    # the stream ends with OpenAI's terminator
    with httpx.stream("POST", base(web) + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "x = ", "max_tokens": 2, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert sse_events(response)[-1] == "[DONE]"


def test_openai_token_prompt_stop_echo_and_logprobs(web, oracle, tokenizer):
    client = openai_client(web)
    ids = tokenizer.encode("import os\n")
    expected = oracle(make_request("import os\n", max_tokens=6))
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected.text
    echoed = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "import os\n" + expected.text
    with_logprobs = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0,
                                              logprobs=3)
    lp = with_logprobs.choices[0].logprobs
    reference = oracle(make_request("import os\n", max_tokens=6), logprobs=3)
    assert lp.token_logprobs == pytest.approx([p for p, _ in reference.logprobs], abs=1e-5)
    assert lp.tokens == [tokenizer.decode([t]) for t in reference.output_ids]
    assert [len(top) for top in lp.top_logprobs] == [3] * 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    if len(expected.text) > 3:
        stop = expected.text[2:4]
        cut = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0, stop=stop)
        assert cut.choices[0].text == expected.text[:expected.text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_infill_builds_the_repo_level_fim_prompt(web, oracle):
    body = {"input_prefix": "def area(r):\n    return ", "prompt": "3.14", "input_suffix": "\n\nprint(area(2))\n",
            "input_extra": [{"filename": "util/math.py", "text": "PI = 3.14159\n"}],
            "file_path": "geometry.py", "repo_name": "shapes", "n_predict": 8, "temperature": 0}
    request = make_request("def area(r):\n    return 3.14", suffix="\n\nprint(area(2))\n", max_tokens=8,
                           repo_name="shapes", file_path="geometry.py",
                           context_files=[("util/math.py", "PI = 3.14159\n")])
    expected = oracle(request)
    answer = httpx.post(base(web) + "/infill", json=body, timeout=60).json()
    assert answer["content"] == expected.text and answer["stop"] is True
    assert answer["tokens_predicted"] == len(expected.output_ids)
    assert answer["tokens_evaluated"] == len(expected.prompt_ids)
    assert answer["stop_type"] == {"length": "limit", "eos": "eos", "stop": "word"}[expected.finish_reason]
    assert answer["truncated"] is False
    with httpx.stream("POST", base(web) + "/infill", json={**body, "stream": True}, timeout=60) as response:
        events = sse_events(response)
    assert "".join(e["content"] for e in events) == expected.text
    assert [e["stop"] for e in events][-1] is True and not any(e["stop"] for e in events[:-1])
    assert events[-1]["tokens_predicted"] == len(expected.output_ids)


def test_infill_plain_fim_without_context_equals_grpc_fim(web, oracle):
    expected = oracle(make_request("x = [", suffix="]\n", max_tokens=5))
    answer = httpx.post(base(web) + "/infill", timeout=60,
                        json={"input_prefix": "x = [", "input_suffix": "]\n", "n_predict": 5, "temperature": 0})
    assert answer.json()["content"] == expected.text


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "UTF-8"),
    (b"[1, 2]", 400, "JSON array"),
    (b"[" * 100_000, 400, "not valid JSON"),
    (b'{"model": "starcoder2-tiny", "prompt": "x", "temperature": NaN}', 400, "not valid JSON"),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt must be"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "9"}).encode(), 400, "max_tokens must be an integer"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": True}).encode(), 400, "max_tokens must be an integer"),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": 3}).encode(), 400, "temperature must be"),
    (json.dumps({"model": MODEL, "prompt": "x", "n": 2}).encode(), 400, "n=2 is not supported"),
    (json.dumps({"model": MODEL, "prompt": "x", "best_of": 3}).encode(), 400, "best_of=3"),
    (json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "holds 2 prompts"),
    (json.dumps({"model": MODEL, "prompt": [1, 10**9]}).encode(), 400, "token ids must be in"),
    (json.dumps({"model": MODEL, "prompt": "x", "wat": 1}).encode(), 400, "Unrecognized request argument"),
    (json.dumps({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400,
     "stream_options"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model is required"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
])
def test_openai_bad_requests_get_openai_errors(web, body, status, needle):
    response = httpx.post(base(web) + "/v1/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_its_own_error_types(web):
    client = openai_client(web)
    with pytest.raises(openai.BadRequestError, match="is not supported"):
        client.completions.create(model=MODEL, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt="x")


@pytest.mark.parametrize("body, needle", [
    ({"input_suffix": ""}, "input_prefix is required"),
    ({"input_prefix": "a", "input_suffix": "", "input_extra": {"text": "x"}}, "input_extra must be an array"),
    ({"input_prefix": "a", "input_suffix": "", "input_extra": [{"filename": "a"}]}, "input_extra[0].text is required"),
    ({"input_prefix": "a", "input_suffix": "", "n_predict": 0}, "n_predict must be"),
    ({"input_prefix": "a", "input_suffix": "", "top_k": -3}, "top_k must be"),
])
def test_infill_bad_requests_get_llama_cpp_errors(web, body, needle):
    response = httpx.post(base(web) + "/infill", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"] and error["code"] == 400 and error["type"] == "invalid_request_error"


def test_routes_sizes_and_methods_are_json_errors(web, make_server):
    assert httpx.get(base(web) + "/nope", timeout=10).json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(base(web) + "/v1/completions", timeout=10)
    assert wrong.status_code == 405 and "not allowed" in wrong.json()["error"]["message"]
    with make_server(max_batch=1, http_port=0, max_message_bytes=4096) as small:
        big = httpx.post(base(small) + "/v1/completions", json={"model": MODEL, "prompt": "x" * 5000}, timeout=30)
        assert big.status_code == 413 and "over 4096 bytes" in big.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield b'{"model": "starcoder2-tiny", "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'
        streamed = httpx.post(base(small) + "/v1/completions", content=chunks(), timeout=30)
        assert streamed.status_code == 413
        ok = httpx.post(base(small) + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_models_health_and_metrics(web):
    models = openai_client(web).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(base(web) + "/health", timeout=10).json() == {"status": "ok"}
    httpx.post(base(web) + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}, timeout=30)
    metrics = httpx.get(base(web) + "/metrics", timeout=10).text
    assert 'sc2deploy_requests_total{code="200",method="POST /v1/completions"}' in metrics
    assert "sc2deploy_decode_step_seconds" in metrics  # the engine's registry, shared with gRPC


def test_api_key_guards_every_route_but_health(make_server):
    with make_server(max_batch=1, http_port=0, api_keys=["s3cret"]) as keyed:
        url = base(keyed)
        missing = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/infill", json={}, headers={"authorization": "Bearer nope"},
                          timeout=30).status_code == 401
        assert httpx.get(url + "/metrics", timeout=10).status_code == 401
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai_client(keyed, key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
        good = openai_client(keyed, key="s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert good.usage.completion_tokens == 2
        assert httpx.get(url + "/metrics", headers={"x-api-key": "s3cret"}, timeout=10).status_code == 200


def test_full_queue_is_429(make_server, wait_for):
    with make_server(max_batch=1, max_queue=0, http_port=0) as one:
        url = base(one) + "/v1/completions"
        with httpx.stream("POST", url, json={"model": MODEL, "prompt": "a", "max_tokens": 1000, "stream": True},
                          timeout=60) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            refused = httpx.post(url, json={"model": MODEL, "prompt": "b", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 429 and "queue is full" in refused.json()["error"]["message"]
        assert wait_for(lambda: one.scheduler.stats()["free_slots"] == 1, 10)


def test_closing_the_connection_frees_the_slot_within_a_step(make_server, wait_for):
    with make_server(max_batch=1, max_queue=1, http_port=0) as one:
        url = base(one) + "/v1/completions"
        steps = lambda: one.server.metrics.registry.get_sample_value("sc2deploy_batch_size_count")  # noqa: E731
        for stream in (True, False):
            client = httpx.Client(timeout=60)
            body = {"model": MODEL, "prompt": "def slow():\n", "max_tokens": 1000, "stream": stream}
            if stream:
                with client.stream("POST", url, json=body) as response:
                    next(line for line in response.iter_lines() if line.startswith("data: "))
                    at_close = steps()
            else:  # a raw socket: the request, then close while the server is still generating
                raw = socket.create_connection(("127.0.0.1", one.server.http_port))
                data = json.dumps(body).encode()
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                assert wait_for(lambda: one.scheduler.stats()["free_slots"] == 0, 10)
                time.sleep(0.2)
                at_close = steps()
                raw.close()
            client.close()
            assert wait_for(lambda: one.scheduler.stats()["free_slots"] == 1, 10), one.scheduler.stats()
            assert steps() - at_close <= 12, f"{steps() - at_close} decode steps after the client went away"
        one.wait_idle()
        closed = one.server.metrics.registry.get_sample_value(
            "sc2deploy_requests_total", {"method": "POST /v1/completions", "code": "499"})
        assert closed == 2


def test_request_id_header_round_trips(web):
    response = httpx.post(base(web) + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                          headers={"x-request-id": "editor-42"}, timeout=30)
    assert response.headers["x-request-id"] == "editor-42" and response.json()["id"] == "cmpl-editor-42"


def test_finish_reason_maps_eos_to_stop(web, oracle):
    # a FIM completion usually ends with a control token within a few dozen tokens on the tiny model; whichever
    # way it ends, the HTTP reason is OpenAI's name for the oracle's
    request = make_request("if x:\n    ", suffix="\nelse:\n    pass\n", max_tokens=40)
    expected = oracle(request)
    answer = openai_client(web).completions.create(model=MODEL, prompt=request.prompt, suffix=request.suffix,
                                                   max_tokens=40, temperature=0)
    assert answer.choices[0].finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[
        expected.finish_reason]
    assert answer.choices[0].text == expected.text


def test_grpc_is_unchanged_beside_http(web):
    info = web.client.info()
    assert info.runtime == "eager" and web.client.health() == "SERVING"
    response = web.client.complete(pb.CompleteRequest(prompt="a", max_tokens=2))
    assert response.usage.completion_tokens == 2


def test_http_connections_send_small_writes_at_once(web):
    # asyncio sets TCP_NODELAY on accepted connections only when the listener names IPPROTO_TCP; without it a
    # stream's first chunk on a kept-alive connection waited ~40 ms for the client's delayed ACK
    assert web.server.http.socket.proto == socket.IPPROTO_TCP


def test_over_long_fim_prompts_are_trimmed_on_every_front_end(make_server, oracle):
    prefix = "".join(f"value_{i} = {i} * 2\n" for i in range(60))
    suffix = "".join(f"print(value_{i})\n" for i in range(60))
    with make_server(max_batch=2, http_port=0, context_length=160) as small:
        grpc_answer = small.client.complete(make_request(prefix, suffix=suffix, max_tokens=8))
        cut = grpc_answer.usage.trimmed
        assert cut.prefix_chars > 0 and cut.suffix_chars > 0 and cut.context_files == 0
        assert grpc_answer.usage.prompt_tokens + 8 <= 160
        # exactly the completion of the kept text: the end of the prefix and the start of the suffix
        kept = make_request(prefix[cut.prefix_chars:], suffix=suffix[:len(suffix) - cut.suffix_chars], max_tokens=8)
        assert grpc_answer.text == oracle(kept).text
        answer = openai_client(small).completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=8,
                                                         temperature=0)
        assert answer.choices[0].text == grpc_answer.text
        assert answer.usage.prompt_trimmed == {"prefix_chars": cut.prefix_chars, "suffix_chars": cut.suffix_chars,
                                               "context_files": 0}
        infilled = httpx.post(base(small) + "/infill", timeout=60, json={
            "input_prefix": prefix, "input_suffix": suffix, "n_predict": 8, "temperature": 0}).json()
        assert infilled["truncated"] is True and infilled["content"] == grpc_answer.text
        assert infilled["trimmed"]["prefix_chars"] == cut.prefix_chars
        plain = make_request("x = 1\n", max_tokens=8)
        assert not small.client.complete(plain).usage.HasField("trimmed")
    with make_server(max_batch=1, http_port=0, context_length=160, trim_prompts=False) as strict:
        refused = httpx.post(base(strict) + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prefix, "suffix": suffix, "max_tokens": 8})
        assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]


def test_tls_serves_http_too(make_server, tls_files):
    cert, key = tls_files["server"]
    trusted = ssl.create_default_context(cadata=cert.decode())
    with make_server(max_batch=1, http_port=0, tls_cert=cert, tls_key=key) as secure:
        url = f"https://127.0.0.1:{secure.server.http_port}"
        answer = httpx.post(url + "/v1/completions", verify=trusted, timeout=30,
                            json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{secure.server.http_port}/health", timeout=5)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
COMPLETION_BODIES = st.fixed_dictionaries(
    {"model": st.just(MODEL) | JSON_VALUES, "max_tokens": st.integers(-2, 6) | JSON_VALUES},
    optional={name: JSON_VALUES | st.text(max_size=20) for name in
              ("prompt", "suffix", "temperature", "top_p", "stop", "seed", "logprobs", "echo", "stream",
               "stream_options", "n", "user", "logit_bias")})
INFILL_BODIES = st.fixed_dictionaries(
    {"n_predict": st.integers(-2, 6)},
    optional={name: JSON_VALUES | st.text(max_size=20) for name in
              ("input_prefix", "input_suffix", "input_extra", "prompt", "temperature", "top_k", "top_p", "stop",
               "stream", "seed", "repo_name", "file_path")})


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/infill"]),
       body=st.one_of(st.binary(max_size=64), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      COMPLETION_BODIES.map(lambda v: json.dumps(v).encode()),
                      INFILL_BODIES.map(lambda v: json.dumps(v).encode())))
def test_fuzzed_bodies_get_a_status_and_never_break_the_server(web, path, body):
    response = httpx.post(base(web) + path, content=body, timeout=60, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        message = response.json()["error"]["message"]
        assert isinstance(message, str) and message and "Traceback" not in message
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and all("error" not in json.loads(e[6:]) for e in events if e != "data: [DONE]")
    else:
        assert "error" not in response.json()


def test_a_client_templated_fim_prompt_equals_the_server_built_one(web, oracle, tokenizer):
    # Continue and similar plugins spell the FIM layout in `prompt` themselves; the control tokens are read as
    # tokens (as vLLM and llama.cpp read them), so the model sees what a `suffix` request gives it
    request = make_request("def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n", max_tokens=10)
    expected = oracle(request)
    templated = f"<fim_prefix>{request.prompt}<fim_suffix>{request.suffix}<fim_middle>"
    answer = openai_client(web).completions.create(model=MODEL, prompt=templated, max_tokens=10, temperature=0)
    assert answer.choices[0].text == expected.text
    assert answer.usage.prompt_tokens == len(expected.prompt_ids)
    # with `suffix`, the texts are the user's: a control token spelled in them stays text
    spelled = openai_client(web).completions.create(model=MODEL, prompt="x = '<file_sep>'", suffix="", max_tokens=1)
    as_text = tokenizer.encode("x = '<file_sep>'")
    assert tokenizer.file_sep_id not in as_text and spelled.usage.prompt_tokens == len(as_text) + 3


def test_infill_as_llama_vscode_sends_it(web, oracle):
    fields = ["content", "timings/prompt_n", "timings/predicted_n", "truncated", "tokens_cached"]
    body = {"input_prefix": "import os\n\ndef main():\n", "input_suffix": "\n\nmain()\n", "prompt": "    ",
            "input_extra": [{"filename": "util.py", "text": "def helper():\n    return 1\n"}],
            "n_predict": 6, "top_k": 40, "top_p": 0.99, "stream": False, "n_indent": 4, "cache_prompt": True,
            "samplers": ["top_k", "top_p", "infill"], "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "response_fields": fields}
    answer = httpx.post(base(web) + "/infill", json=body, timeout=60).json()
    assert set(answer) == set(fields) and isinstance(answer["content"], str)
    # the file being completed is unnamed in llama.cpp's protocol: its path line reads "filename", as there
    expected = oracle(make_request("import os\n\ndef main():\n    ", suffix="\n\nmain()\n", max_tokens=6,
                                   file_path="filename", context_files=[("util.py", "def helper():\n    return 1\n")]))
    assert answer["timings/prompt_n"] == len(expected.prompt_ids)
    assert 1 <= answer["timings/predicted_n"] <= 6 and answer["truncated"] is False
    greedy = httpx.post(base(web) + "/infill", json={**body, "temperature": 0, "response_fields": None},
                        timeout=60).json()
    assert greedy["content"] == expected.text
