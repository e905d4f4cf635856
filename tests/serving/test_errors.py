"""Every refusal has its status code, and the server keeps serving afterwards."""
from __future__ import annotations

import grpc
import pytest

from sc2deploy.serving.client import make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(120)

INVALID = {
    "empty prompt": make_request(""),
    "over the context": make_request("x", max_tokens=1024),
    "long prompt over the context": make_request("word " * 1000, max_tokens=100),
    "zero max_tokens": make_request("x", max_tokens=0),
    "negative max_tokens": make_request("x", max_tokens=-5),
    "negative temperature": make_request("x", temperature=-0.5),
    "nan temperature": make_request("x", temperature=float("nan")),
    "infinite temperature": make_request("x", temperature=float("inf")),
    "denormal temperature": make_request("x", temperature=1e-300),
    "top_p zero": make_request("x", top_p=0.0),
    "top_p above one": make_request("x", top_p=1.5),
    "negative top_k": make_request("x", top_k=-1),
    "empty stop string": make_request("x", stop=[""]),
    "too many stop strings": make_request("x", stop=[f"s{i}" for i in range(17)]),
    "logprobs too many": make_request("x", logprobs=21),
    "negative logprobs": make_request("x", logprobs=-1),
    "repo without file_path": make_request("x", repo_name="a/b"),
}


def check_still_serving(server):
    response = server.client.complete(make_request("print(", max_tokens=2), timeout=30)
    assert response.usage.completion_tokens == 2
    server.wait_idle()


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_argument(server, name):
    for call in (server.client.complete, lambda r, timeout: list(server.client.stream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as error:
            call(INVALID[name], timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details()


def raw_call(server, method: str, data: bytes, **kwargs):
    call = server.client.channel.unary_unary(f"/sc2deploy.v1.CompletionService/{method}",
                                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call(data, timeout=30, **kwargs)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("data, where", [
    (field(1, b"def f():\xff\xfe"), "prompt"),
    (field(1, b"x") + field(2, b"\xc3(") , "suffix"),
    (field(1, b"x") + field(8, b"ok") + field(8, b"\xed\xa0\x80"), "stop[1]"),  # a UTF-16 surrogate
    (field(1, b"x") + field(11, b"a.py") + field(12, field(1, b"b.py") + field(2, b"\x80")),
     "context_files[0].content"),
])
def test_invalid_utf8_is_invalid_argument(server, data, where):
    for method in ("Complete", "CompleteStream"):
        with pytest.raises(grpc.RpcError) as error:
            raw_call(server, method, data) if method == "Complete" else list(
                server.client.channel.unary_stream(f"/sc2deploy.v1.CompletionService/{method}",
                                                   request_serializer=lambda b: b,
                                                   response_deserializer=lambda b: b)(data, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{where} is not valid UTF-8" in error.value.details()
    check_still_serving(server)


def test_garbage_bytes_are_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as error:
        raw_call(server, "Complete", b"\xff\xff\xff\xff")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check_still_serving(server)


def test_message_over_the_size_limit_is_resource_exhausted(server):
    big = make_request("x" * (5 << 20), max_tokens=1).SerializeToString()
    unlimited = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)])
    try:
        call = unlimited.unary_unary("/sc2deploy.v1.CompletionService/Complete",
                                     request_serializer=lambda b: b, response_deserializer=pb.CompleteResponse.FromString)
        with pytest.raises(grpc.RpcError) as error:
            call(big, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        unlimited.close()
    check_still_serving(server)


def test_refusals_are_counted_by_code(server):
    registry = server.server.metrics.registry
    labels = {"method": "Complete", "code": "INVALID_ARGUMENT"}
    before = registry.get_sample_value("sc2deploy_requests_total", labels) or 0
    with pytest.raises(grpc.RpcError):
        server.client.complete(INVALID["empty prompt"], timeout=30)
    assert registry.get_sample_value("sc2deploy_requests_total", labels) == before + 1
    check_still_serving(server)
