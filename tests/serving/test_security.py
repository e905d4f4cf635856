"""What a client on the network cannot do: hold the server with calls that never send their message, reach
metrics without the key, get INTERNAL for garbage, or see the port vanish while the server drains."""
from __future__ import annotations

import asyncio
import ssl
import threading
import time
import urllib.error
import urllib.request

import grpc
import grpc.aio
import pytest

from sc2deploy.serving.client import Client, make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(180)
COMPLETE = "/sc2deploy.v1.CompletionService/Complete"
STREAM = "/sc2deploy.v1.CompletionService/CompleteStream"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


async def _silent_calls(target: str, count: int, metadata, seconds: float, channels: int = 4) -> list:
    """`count` calls spread over `channels` connections that send their headers and then nothing for `seconds`
    (a request stream that never yields); returns each call's status code, or None if still open at the end."""
    # a local subchannel pool each: one TCP connection per channel (the server allows 128 calls per connection)
    opened = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    never = asyncio.Event()

    async def nothing():
        await never.wait()
        yield b""  # pragma: no cover - never reached

    async def one(i: int, path: str):
        method = opened[i % channels].stream_stream(path, request_serializer=lambda b: b,
                                                    response_deserializer=lambda b: b)
        call = method(nothing(), metadata=metadata)
        try:
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()

    paths = [COMPLETE, STREAM, REFLECTION]
    tasks = [asyncio.ensure_future(one(i, paths[i % len(paths)])) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    for channel in opened:
        await channel.close()
    return [t.result() if t in done else None for t in tasks]


def _in_thread(coroutine_factory):
    """Run an asyncio coroutine on its own loop in a thread; returns (thread, result holder)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", asyncio.run(coroutine_factory())))
    thread.start()
    return thread, result


def test_unauthenticated_silent_calls_are_refused_without_their_message(make_server):
    """Calls without a key are refused from their metadata at once: 200 of them that never send a message hold
    nothing, and meanwhile health stays SERVING and keyed requests complete."""
    with make_server(max_batch=2, max_queue=4, api_keys=["k1"]) as running:
        thread, result = _in_thread(lambda: _silent_calls(running.target, 200, None, seconds=20))
        keyed = Client(running.target, api_key="k1")
        try:
            for _ in range(5):
                assert running.client.health() == "SERVING"
                assert keyed.complete(make_request("def f(", max_tokens=3), timeout=30).usage.completion_tokens == 3
            thread.join(60)
        finally:
            keyed.close()
        codes = result["value"]
        # refused without waiting for a message: none is still open when the window closes
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 200, set(codes)
        running.wait_idle()


def test_silent_calls_hold_nothing_and_time_out(make_server):
    """Without an API key anyone may call: 200 calls that send headers and then nothing leave health SERVING and
    real requests served, and each ends with DEADLINE_EXCEEDED after read_timeout."""
    with make_server(max_batch=2, max_queue=2, read_timeout=3.0) as running:
        thread, result = _in_thread(lambda: _silent_calls(running.target, 200, None, seconds=60))
        time.sleep(1.0)  # the calls are open now
        for _ in range(5):
            assert running.client.health() == "SERVING"
            assert running.client.complete(make_request("x = ", max_tokens=3), timeout=30).usage.completion_tokens == 3
            assert running.client.info().vocab_size == 49152
        thread.join(90)
        codes = [c for c in result["value"] if c is not None]
        complete_codes = [c for i, c in enumerate(result["value"]) if i % 3 != 2]
        assert all(c == grpc.StatusCode.DEADLINE_EXCEEDED for c in complete_codes), set(complete_codes)
        assert len(codes) >= len(complete_codes)
        registry = running.server.metrics.registry
        assert registry.get_sample_value("sc2deploy_requests_total",
                                         {"method": "Complete", "code": "DEADLINE_EXCEEDED"}) >= 60
        running.wait_idle()


def test_get_model_info_with_garbage_is_invalid_argument(server):
    call = server.client.channel.unary_unary("/sc2deploy.v1.CompletionService/GetModelInfo",
                                             request_serializer=lambda b: b,
                                             response_deserializer=pb.ModelInfo.FromString)
    with pytest.raises(grpc.RpcError) as error:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.client.info().vocab_size == 49152


@pytest.mark.parametrize("size,most", [(4_000_000, 0), (400_000, 10_000)])
def test_oversize_prompt_is_refused_before_it_is_tokenized(server, tokenizer, monkeypatch, size, most):
    """tiny's context is 1,024 tokens. A 4 MB prompt is refused from its byte count alone (no token covers more
    than max_token_bytes); a 400 kB one after its first piece, about 4 k characters, has passed the context."""
    seen: list[int] = []
    real = tokenizer._plain

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_batch(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return real.encode_batch(texts, **kwargs)

    monkeypatch.setattr(tokenizer, "_plain", Recording())
    prompt = ("def f(x):\n    return x * 2\n" * (size // 27 + 1))[:size]
    with pytest.raises(grpc.RpcError) as error:
        server.client.complete(make_request(prompt, max_tokens=4), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in error.value.details()
    assert sum(seen) <= most < size
    monkeypatch.undo()
    assert server.client.complete(make_request("x = ", max_tokens=2), timeout=30).usage.completion_tokens == 2


def _get(url: str, headers: dict | None = None, context=None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10,
                                    context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_follow_the_host_the_key_and_tls(make_server, tls_files, tmp_path):
    cert, key = tls_files["server"]
    (tmp_path / "ca.pem").write_bytes(cert)
    with make_server(max_batch=1, metrics_port=0, api_keys=["k1"], tls_cert=cert, tls_key=key) as running:
        port = running.server.metrics_port
        assert running.server.metrics_http.server_address[0] == "127.0.0.1"  # the server's --host, not 0.0.0.0
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        url = f"https://127.0.0.1:{port}/metrics"
        assert _get(url, context=trusted)[0] == 401
        assert _get(url, {"Authorization": "Bearer nope"}, context=trusted)[0] == 401
        status, text = _get(url, {"Authorization": "Bearer k1"}, context=trusted)
        assert status == 200 and "sc2deploy_requests_total" in text
        assert _get(f"https://127.0.0.1:{port}/other", {"Authorization": "Bearer k1"}, context=trusted)[0] == 404
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()


def test_drain_keeps_the_port_open_and_says_not_serving(make_server):
    """During the grace period health answers NOT_SERVING and new requests UNAVAILABLE (no "connection
    refused"), while the stream in flight runs to its end."""
    with make_server(max_batch=2) as running:
        stream = running.client.stream(make_request("def long_function():\n", max_tokens=300), timeout=120)
        first = next(stream)
        stopper = threading.Thread(target=running.server.stop, args=(60.0,))
        stopper.start()
        time.sleep(0.3)
        assert running.client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as error:
            running.client.complete(make_request("x", max_tokens=2), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = [first] + list(stream)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 300
        stopper.join(30)
        assert not stopper.is_alive()
