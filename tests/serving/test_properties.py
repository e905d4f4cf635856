"""Property-based: no request, however odd, crashes the server or leaks a cache slot."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(300)

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.CANCELLED}
INT32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=40) | st.sampled_from(["", "<fim_prefix>", "<|endoftext|>", "<file_sep>", "é€😀", "\x00"])


@st.composite
def requests(draw):
    request = pb.CompleteRequest(
        prompt=draw(text), suffix=draw(st.sampled_from(["", ""]) | text),
        temperature=draw(st.sampled_from([0.0, 0.7, -1.0, float("nan"), float("inf"), 1e-30, 1e30]) | st.floats()),
        top_k=draw(st.sampled_from([0, 1, 5, -3, 49152, 10**6]) | INT32),
        stop=draw(st.lists(text, max_size=3)), logprobs=draw(st.sampled_from([0, 1, 3, 20, 21, -1]) | INT32),
        repo_name=draw(st.sampled_from(["", "", "org/repo"])), file_path=draw(st.sampled_from(["", "", "a.py"])))
    max_tokens = draw(st.none() | st.sampled_from([1, 2, 5, 8, 0, -1, 1024, 2**31 - 1]) | st.integers(-5, 10))
    if max_tokens is not None:
        request.max_tokens = max_tokens
    top_p = draw(st.none() | st.sampled_from([1.0, 0.5, 0.0, -0.1, 1.1, float("nan")]) | st.floats(0, 1))
    if top_p is not None:
        request.top_p = top_p
    seed = draw(st.none() | st.integers(-(2**63), 2**63 - 1))
    if seed is not None:
        request.seed = seed
    if draw(st.booleans()):
        request.context_files.add(path=draw(text), content=draw(text))
    return request


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=requests(), mode=st.sampled_from(["unary", "stream", "cancel", "deadline"]))
def test_no_request_crashes_the_server_or_leaks_a_slot(server, request, mode):
    if request.HasField("max_tokens") and request.max_tokens > 8:
        request.max_tokens = 8 if mode in ("unary", "stream") else 200  # keep the run short
    try:
        if mode == "unary":
            server.client.complete(request, timeout=30)
        elif mode == "stream":
            list(server.client.stream(request, timeout=30))
        elif mode == "cancel":
            stream = server.client.stream(request, timeout=30)
            next(stream, None)
            stream.cancel()
            list(stream)
        else:
            server.client.complete(request, timeout=0.02)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details())
    stats = server.scheduler.stats()
    assert stats["waiting"] + stats["running"] <= stats["max_batch"]


def test_after_the_property_run_every_slot_is_free(server):
    server.wait_idle(10)
    info = server.client.info()
    assert info.max_batch == server.scheduler.stats()["free_slots"]
