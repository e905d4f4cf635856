"""Request ids and the JSON log: one access-log line per call, carrying the client's x-request-id (or a new one),
which also comes back to the client as trailing metadata."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
from contextlib import contextmanager

import grpc
import pytest

from sc2deploy.serving.client import make_request
from sc2deploy.serving.logs import JsonFormatter, LogStream, TextFormatter, request_id
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(120)


@contextmanager
def captured(formatter: logging.Formatter):
    """The server's log lines, formatted, as a list that fills while the block runs."""
    logger = logging.getLogger("sc2deploy.serving")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[str] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines.extend(stream.getvalue().splitlines())


def trailing_id(call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def test_json_access_log_carries_the_clients_request_id(make_server):
    with make_server(max_batch=2) as served, captured(JsonFormatter()) as lines:
        response, call = served.client.stub.Complete.with_call(make_request("def f():", max_tokens=4), timeout=30,
                                                                metadata=[("x-request-id", "abc")])
        stream = served.client.stub.CompleteStream(make_request("def g():", max_tokens=3), timeout=30,
                                                   metadata=[("x-request-id", "stream-1")])
        chunks = list(stream)
        _, info_call = served.client.stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), timeout=10)
    assert response.usage.completion_tokens == 4 and trailing_id(call) == "abc"
    assert chunks[-1].usage.completion_tokens == 3 and trailing_id(stream) == "stream-1"
    assert re.fullmatch(r"[0-9a-f]{32}", trailing_id(info_call))
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    mine = [e for e in entries if e.get("request_id") == "abc"]
    assert len(mine) == 1, entries  # one line per finished call
    (entry,) = mine
    assert {k: entry[k] for k in ("level", "logger", "method", "code", "completion_tokens")} == {
        "level": "INFO", "logger": "sc2deploy.serving", "method": "Complete", "code": "OK", "completion_tokens": 4}
    assert entry["prompt_tokens"] == response.usage.prompt_tokens > 0 and entry["duration_ms"] > 0
    assert "Complete OK" in entry["message"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    (streamed,) = [e for e in entries if e.get("request_id") == "stream-1"]
    assert (streamed["method"], streamed["code"], streamed["completion_tokens"]) == ("CompleteStream", "OK", 3)
    (info,) = [e for e in entries if e.get("request_id") == trailing_id(info_call)]
    assert (info["method"], info["code"]) == ("GetModelInfo", "OK")


def test_a_refused_call_and_an_unusable_id(make_server):
    with make_server(max_batch=2) as served, captured(JsonFormatter()) as lines:
        with pytest.raises(grpc.RpcError) as refused:
            served.client.stub.Complete(make_request(""), timeout=30, metadata=[("x-request-id", "empty-1")])
        long_id, odd_id = "x" * 129, "a b"
        _, long_call = served.client.stub.Complete.with_call(make_request("x", max_tokens=1), timeout=30,
                                                             metadata=[("x-request-id", long_id)])
        _, odd_call = served.client.stub.Complete.with_call(make_request("x", max_tokens=1), timeout=30,
                                                            metadata=[("x-request-id", odd_id)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())["x-request-id"] == "empty-1"
    entries = [json.loads(line) for line in lines]
    (entry,) = [e for e in entries if e.get("request_id") == "empty-1"]
    assert (entry["method"], entry["code"]) == ("Complete", "INVALID_ARGUMENT") and "empty" in entry["detail"]
    for call in (long_call, odd_call):  # not the client's: a fresh id, in the log and the metadata
        assert re.fullmatch(r"[0-9a-f]{32}", trailing_id(call))
        assert [e["code"] for e in entries if e.get("request_id") == trailing_id(call)] == ["OK"]


def test_text_lines_name_the_request():
    record = logging.LogRecord("sc2deploy.serving", logging.INFO, __file__, 1, "Complete OK", None, None)
    record.request_id = "abc"
    assert TextFormatter().format(record).endswith("sc2deploy.serving: Complete OK [request abc]")
    plain = logging.LogRecord("sc2deploy.serving", logging.WARNING, __file__, 1, "no request", None, None)
    assert not TextFormatter().format(plain).endswith("]")
    assert "request_id" not in json.loads(JsonFormatter().format(plain))
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exception"]


def test_request_ids_and_stderr_lines():
    assert request_id([("x-request-id", "req-1.a:B_2")]) == "req-1.a:B_2"
    assert request_id([("other", "v")]) != request_id([("other", "v")])  # fresh each time
    logger = logging.getLogger("test.logstream")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    out = LogStream(logger)
    print("first line\nsecond", file=out, end="")
    print(" half", file=out)
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["first line", "second half"]
