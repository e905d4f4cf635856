"""Classify and Embed over gRPC: head checkpoints and artifacts made with transformers, served on 127.0.0.1 through
`sc2deploy serve`'s own model opening, compared with the head runtime `sc2deploy classify`/`embed` run."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from sc2deploy.cli import build_parser
from sc2deploy.runtime.heads import scores
from sc2deploy.commands.serve import open_model
from sc2deploy.serving.server import CompletionServer, ServerOptions
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.serving.v1 import completion_pb2_grpc as pb_grpc
from sc2deploy.tasks import BASE_MODEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

VOCAB, PAD = 1000, 999
PROMPTS = [[5, 17, 3, 250, 9], [1, 2], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410], [7]]
ATOL = 1e-5


@pytest.fixture(scope="module")
def heads(tmp_path_factory, helpers):
    """{architecture: checkpoint folder}, plus "token-artifact": an ort export of the token classifier."""
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.export import export_artifact

    base = tmp_path_factory.mktemp("served-heads")
    made = {}
    for architecture in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, BASE_MODEL):
        folder = base / architecture
        folder.mkdir()
        helpers.make_hf_model(folder, architecture=architecture, vocab_size=VOCAB, pad_token_id=PAD, num_labels=3,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
        made[architecture] = str(folder)
    made["token-artifact"] = str(export_artifact(CheckpointSource(made[TOKEN_CLASSIFICATION]),
                                                 base / "token-ort", "fp32", "ort"))
    return made


class Served:
    def __init__(self, server: CompletionServer, runtime):
        self.server, self.runtime = server, runtime
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.CompletionServiceStub(self.channel)


@contextmanager
def serve(flags: list[str], *, http: bool = False, **options):
    """`sc2deploy serve FLAGS`'s model on 127.0.0.1 (a free port)."""
    args = build_parser("serve").parse_args(["serve", *flags])
    runtime, tokenizer, where = open_model(args)
    server = CompletionServer(runtime, tokenizer, ServerOptions(
        host="127.0.0.1", port=0, max_batch=args.max_batch, source=where, http_port=0 if http else None, **options))
    server.start()
    served = Served(server, runtime)
    try:
        yield served
    finally:
        served.channel.close()
        server.stop(grace=1.0)


def rows(vectors) -> np.ndarray:
    return np.array([list(v.values) for v in vectors], dtype=np.float64)


@pytest.mark.parametrize("kind", [SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, "token-artifact"])
def test_classify_matches_the_runtime_alone_and_batches(heads, kind):
    flag = "--artifact" if kind == "token-artifact" else "--checkpoint"
    with serve([flag, heads[kind], "--max-batch", "4"]) as s:
        head = s.runtime.head
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.methods) == ["Classify", "GetModelInfo"] and info.task == head.task
        assert info.max_batch == 4 and info.runtime == ("ort" if kind == "token-artifact" else "eager")
        alone = [s.runtime.run([ids])[0] for ids in PROMPTS]  # what `sc2deploy classify` computes
        one_by_one = [s.stub.Classify(pb.ClassifyRequest(token_ids=ids)) for ids in PROMPTS]
        for ids, expected, got in zip(PROMPTS, alone, one_by_one):
            expected = expected[None] if expected.ndim == 1 else expected
            assert got.task == head.task and list(got.labels) == list(head.labels) and list(got.token_ids) == ids
            assert rows(got.logits).shape == expected.shape
            assert np.abs(rows(got.logits) - expected).max() < ATOL
            assert np.abs(rows(got.scores) - scores(expected, head.scores)).max() < ATOL
        # Concurrent calls: the engine takes up to max_batch waiting requests into one padded call. Its first step
        # is held until all the others wait, so that this does not depend on the machine's speed.
        steps = s.server.metrics.batch_size.collect()[0].samples
        before = {x.name: x.value for x in steps}
        results: list = [None] * (3 * len(PROMPTS))
        release, run = threading.Event(), s.runtime.run

        def held_run(*args, **kwargs):
            assert release.wait(30)
            return run(*args, **kwargs)

        def call(i):
            results[i] = s.stub.Classify(pb.ClassifyRequest(token_ids=PROMPTS[i % len(PROMPTS)]))

        s.runtime.run = held_run
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for _ in range(3000):
            stats = s.server.scheduler.stats()
            if stats["waiting"] + stats["running"] == len(results):
                break
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join(30)
        s.runtime.run = run
        for i, got in enumerate(results):
            assert np.abs(rows(got.logits) - rows(one_by_one[i % len(PROMPTS)].logits)).max() < ATOL
        after = {x.name: x.value for x in s.server.metrics.batch_size.collect()[0].samples}
        calls = after["sc2deploy_batch_size_count"] - before["sc2deploy_batch_size_count"]
        assert calls < len(results), "concurrent requests were not batched"
        assert after["sc2deploy_batch_size_sum"] - before["sc2deploy_batch_size_sum"] == len(results)
        assert s.server.scheduler.wait_idle(5)


def test_text_prompts_are_tokenized(heads):
    from sc2deploy.tokenizer import Tokenizer

    with serve(["--checkpoint", heads[SEQUENCE_CLASSIFICATION]]) as s:
        ids = Tokenizer.load(heads[SEQUENCE_CLASSIFICATION]).encode("def f(x):")
        got = s.stub.Classify(pb.ClassifyRequest(prompt="def f(x):"))
        assert list(got.token_ids) == ids
        assert np.abs(rows(got.logits)[0] - s.runtime.run([ids])[0]).max() < ATOL


@pytest.mark.parametrize("pooling", ["", "last", "mean", "none"])
def test_embed_pooling(heads, pooling):
    with serve(["--checkpoint", heads[BASE_MODEL]]) as s:
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.methods) == ["Embed", "GetModelInfo"] and info.task == "feature-extraction"
        ids = PROMPTS[0]
        hidden = s.runtime.run([ids])[0]
        expected = {"": hidden[-1:], "last": hidden[-1:], "mean": hidden.astype(np.float64).mean(0, keepdims=True),
                    "none": hidden}[pooling]
        got = s.stub.Embed(pb.EmbedRequest(token_ids=ids, pooling=pooling))
        assert got.pooling == (pooling or "last") and got.hidden_size == hidden.shape[1]
        assert np.abs(rows(got.embeddings) - expected).max() < ATOL


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_wrong_methods_and_bad_input(heads, make_server):
    with serve(["--checkpoint", heads[SEQUENCE_CLASSIFICATION]], max_queue=2, http=True) as s:
        code, message = code_of(lambda: s.stub.Complete(pb.CompleteRequest(prompt="def f():")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert message == ("this model is a sequence-classification model: it serves Classify; completion needs a "
                           "causal LM artifact")
        code, _ = code_of(lambda: list(s.stub.CompleteStream(pb.CompleteRequest(prompt="def f():"))))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        code, message = code_of(lambda: s.stub.Embed(pb.EmbedRequest(token_ids=[1, 2])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "Embed needs a feature-extraction" in message
        for request, fragment in ((pb.ClassifyRequest(), "empty"),
                                  (pb.ClassifyRequest(prompt="x", token_ids=[1]), "not both"),
                                  (pb.ClassifyRequest(token_ids=[VOCAB]), "outside the vocabulary"),
                                  (pb.ClassifyRequest(token_ids=[1] * 513), "more than the model's context")):
            code, message = code_of(lambda: s.stub.Classify(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in message, message
    # The HTTP completion routes answer 400 with the same message.
    with serve(["--checkpoint", heads[BASE_MODEL]], http=True) as s:
        request = urllib.request.Request(f"http://127.0.0.1:{s.server.http_port}/v1/completions",
                                         data=json.dumps({"model": s.server.model_name, "prompt": "def f():"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 400 and "it serves Embed; completion needs a causal LM" in e.value.read().decode()
    with make_server() as running:
        stub = pb_grpc.CompletionServiceStub(grpc.insecure_channel(running.target))
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.methods) == ["Complete", "CompleteStream", "GetModelInfo"]
        assert info.task == "text-generation"
        code, message = code_of(lambda: stub.Classify(pb.ClassifyRequest(token_ids=[1, 2])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert message.startswith("this model is a text-generation model: it serves Complete and CompleteStream; "
                                  "Classify needs")
        code, _ = code_of(lambda: stub.Embed(pb.EmbedRequest(token_ids=[1, 2])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_invalid_utf8_and_pooling_are_invalid_argument(heads):
    with serve(["--checkpoint", heads[BASE_MODEL]]) as s:
        raw = s.channel.unary_unary("/sc2deploy.v1.CompletionService/Embed")
        code, message = code_of(lambda: raw(b"\x0a\x01\xff"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in message, message
        code, message = code_of(lambda: s.stub.Embed(pb.EmbedRequest(token_ids=[1], pooling="max")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "pooling" in message


def test_a_full_queue_and_draining(heads):
    with serve(["--checkpoint", heads[BASE_MODEL], "--max-batch", "1"], max_queue=0) as s:
        gate = threading.Event()
        run = s.runtime.run

        def slow(prompts, padding="right"):
            gate.wait(10)
            return run(prompts, padding)

        s.runtime.run = slow
        first = s.stub.Embed.future(pb.EmbedRequest(token_ids=[1, 2]))
        assert _wait(lambda: s.server.scheduler.stats()["running"] == 1)
        code, _ = code_of(lambda: s.stub.Embed(pb.EmbedRequest(token_ids=[1, 2])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        s.server.scheduler.close()
        code, _ = code_of(lambda: s.stub.Embed(pb.EmbedRequest(token_ids=[1, 2])))
        assert code == grpc.StatusCode.UNAVAILABLE
        gate.set()
        assert len(first.result(10).embeddings) == 1


def _wait(predicate, timeout: float = 10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False
