"""Continuous batching: concurrent streams give what each gives alone; cancels and deadlines free slots."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from sc2deploy.serving.client import make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(180)

# CPU GEMMs are not batch invariant: a row's logits differ between batch sizes by float noise (measured
# <= 5e-7 on the tiny preset). A greedy request whose two best tokens are closer than MARGIN could
# legitimately differ between batched and alone; the prompts below are checked to have no such near tie.
MARGIN = 1e-5


def concurrent_requests(n: int):
    requests = []
    for i in range(n):
        prompt = f"def function_{i}(x{', y' * (i % 3)}):\n    " + "# step\n" * (i % 5)
        sampling = dict(temperature=0.9, top_k=40, seed=100 + i) if i % 2 else {}
        requests.append(make_request(prompt, max_tokens=12 + (i * 7) % 21, **sampling))
    return requests


def test_32_concurrent_streams_match_each_alone(server, oracle):
    requests = concurrent_requests(32)
    for request in requests:
        if request.temperature == 0:
            assert oracle.greedy_margin(request) > MARGIN, "pick another prompt: this one has a near tie"
    alone = [server.client.complete(r, timeout=60) for r in requests]  # one at a time: batch size 1
    for request, response in zip(requests, alone):
        assert list(response.token_ids) == oracle(request).output_ids
    start = threading.Barrier(len(requests))
    registry = server.server.metrics.registry
    steps = lambda: (registry.get_sample_value("sc2deploy_batch_size_sum"),  # noqa: E731
                     registry.get_sample_value("sc2deploy_batch_size_count"))
    before = steps()

    def run(request):
        start.wait()
        chunks = list(server.client.stream(request, timeout=120))
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(run, requests))
    for response, (text, ids, last) in zip(alone, results):
        assert ids == list(response.token_ids) and text == response.text
        assert last.finish_reason == response.finish_reason and last.usage == response.usage
    server.wait_idle()
    after = steps()
    mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    assert mean_batch > 4, f"32 concurrent streams were decoded {mean_batch:.1f} at a time on average"


def test_new_requests_join_running_streams(server):
    long = server.client.stream(make_request("class Tree:\n", max_tokens=300), timeout=120)
    first = next(long)
    assert first.token_ids
    short = server.client.complete(make_request("import os\n", max_tokens=4), timeout=30)
    assert short.usage.completion_tokens == 4  # answered while the long stream still runs
    assert long.running() or long.done()
    rest = list(long)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 300
    server.wait_idle()


def test_cancel_mid_stream_frees_the_slot_at_once(make_server, wait_for):
    with make_server(max_batch=1, max_queue=1) as one:
        stream = one.client.stream(make_request("def slow():\n", max_tokens=1000), timeout=120)
        for _ in range(3):
            next(stream)
        assert one.scheduler.stats()["free_slots"] == 0
        # The next request waits in the queue for the only slot ...
        started = time.monotonic()
        waiting = one.client.stub.Complete.future(make_request("x = ", max_tokens=3), timeout=60)
        assert wait_for(lambda: one.scheduler.stats()["waiting"] == 1, 5)
        steps = lambda: one.server.metrics.registry.get_sample_value("sc2deploy_batch_size_count")  # noqa: E731
        at_cancel = steps()
        stream.cancel()  # ... and is admitted as soon as the cancel frees it
        response = waiting.result(timeout=30)
        elapsed = time.monotonic() - started
        assert response.usage.completion_tokens == 3
        # The queued request needs 2 decode steps; the cancelled one ran a few more while the cancel travelled
        # (it had 990+ tokens to go).
        assert steps() - at_cancel <= 12, f"{steps() - at_cancel} decode steps between the cancel and the next answer"
        assert elapsed < 10, f"the queued request waited {elapsed:.1f} s: the cancelled stream kept its slot"
        with pytest.raises(grpc.RpcError) as error:
            list(stream)
        assert error.value.code() == grpc.StatusCode.CANCELLED
        one.wait_idle()
        assert one.server.metrics.requests.labels("CompleteStream", "CANCELLED")._value.get() == 1


def test_deadline_stops_the_generation_and_frees_the_slot(server):
    with pytest.raises(grpc.RpcError) as error:
        server.client.complete(make_request("while True:\n", max_tokens=1000), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as error:
        list(server.client.stream(make_request("while True:\n", max_tokens=1000), timeout=0.3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle(5)
    assert server.client.complete(make_request("ok", max_tokens=2), timeout=30).usage.completion_tokens == 2


def test_queue_full_is_resource_exhausted(make_server, wait_for):
    with make_server(max_batch=1, max_queue=1) as one:
        running = one.client.stream(make_request("a", max_tokens=1000), timeout=120)
        next(running)
        queued = one.client.stub.Complete.future(make_request("b", max_tokens=2), timeout=60)
        assert wait_for(lambda: one.scheduler.stats()["waiting"] == 1, 5)
        with pytest.raises(grpc.RpcError) as error:
            one.client.complete(make_request("c", max_tokens=2), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        assert queued.result(timeout=30).usage.completion_tokens == 2
        assert one.client.complete(make_request("c", max_tokens=2), timeout=30).usage.completion_tokens == 2
        one.wait_idle()
