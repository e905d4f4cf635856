"""The server over ONNX Runtime: a tiny fp32 export served with --backend ort gives `generate`'s results."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from sc2deploy.cli import build_parser, main  # noqa: E402
from sc2deploy.commands.serve import open_model  # noqa: E402
from sc2deploy.generation import generate  # noqa: E402
from sc2deploy.serving.client import Client, make_request  # noqa: E402
from sc2deploy.serving.jobs import Limits, build_job  # noqa: E402
from sc2deploy.serving.server import CompletionServer, ServerOptions  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MARGIN = 1e-4  # ONNX Runtime and eager differ by float noise; greedy near ties are excluded (see test_batching)


@pytest.fixture(scope="module")
def ort_server(tmp_path_factory):
    artifact = tmp_path_factory.mktemp("ort") / "tiny-ort-fp32"
    assert main(["export", "--size", "tiny", "--dtype", "fp32", "--out", str(artifact)]) == 0
    args = build_parser().parse_args(["serve", "--artifact", str(artifact), "--backend", "ort", "--max-batch", "8"])
    runtime, tokenizer, where = open_model(args)
    server = CompletionServer(runtime, tokenizer, ServerOptions(host="127.0.0.1", port=0, source=where))
    server.start()
    client = Client(f"127.0.0.1:{server.port}")
    ort_alone = open_model(build_parser().parse_args(["serve", "--artifact", str(artifact), "--max-batch", "1"]))[0]
    yield server, client, ort_alone, tokenizer
    client.close()
    server.stop(1.0)


def requests():
    return [make_request(f"def handler_{i}(event):\n    " + "x = 1\n" * (i % 4), max_tokens=16 + 3 * i,
                         **(dict(temperature=0.8, top_p=0.95, seed=i) if i % 2 else {})) for i in range(16)]


def test_ort_server_equals_generate(ort_server, oracle):
    server, client, ort_alone, tokenizer = ort_server
    info = client.info()
    assert (info.runtime, info.size, info.dtype) == ("ort", "tiny", "fp32") and "onnxruntime" in info.versions
    limits = Limits(context_length=info.context_length)
    alone, checked = {}, 0
    for i, request in enumerate(requests()):
        job = build_job(request, tokenizer, limits)
        expected = generate(ort_alone, tokenizer, job.prompt_ids, job.params, job.stop_ids)  # generate --backend ort
        response = client.complete(request, timeout=60)
        assert (list(response.token_ids), response.text) == (expected.output_ids, expected.text)
        chunks = list(client.stream(request, timeout=60))
        assert "".join(c.text for c in chunks) == expected.text
        if request.temperature == 0 and oracle.greedy_margin(request) > MARGIN:
            assert expected.output_ids == oracle(request).output_ids  # ... and the eager `generate`
            checked += 1
        alone[i] = list(response.token_ids)
    assert checked >= 6, f"only {checked} of 8 greedy requests were compared with eager"
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: [t for c in client.stream(r, timeout=60) for t in c.token_ids], requests()))
    assert together == [alone[i] for i in range(16)]
    assert server.scheduler.wait_idle(10) and server.scheduler.stats()["free_slots"] == 8


def test_ort_fim_prompt_tokens(ort_server):
    _, client, _, tokenizer = ort_server
    response = client.complete(make_request("def f(a):\n    ", "\n    return b\n", max_tokens=8), timeout=60)
    assert response.usage.prompt_tokens == len(tokenizer.fim_prompt_ids("def f(a):\n    ", "\n    return b\n"))


def test_an_int4_artifact_serves_with_no_new_flag(tmp_path):
    artifact = tmp_path / "tiny-ort-int4"
    assert main(["export", "--size", "tiny", "--quant", "int4", "--out", str(artifact)]) == 0
    args = build_parser().parse_args(["serve", "--artifact", str(artifact), "--max-batch", "4"])
    runtime, tokenizer, where = open_model(args)
    assert runtime.quantization is not None and runtime.quantization.bits == 4
    alone = open_model(build_parser().parse_args(["serve", "--artifact", str(artifact), "--max-batch", "1"]))[0]
    server = CompletionServer(runtime, tokenizer, ServerOptions(host="127.0.0.1", port=0, source=where))
    server.start()
    client = Client(f"127.0.0.1:{server.port}")
    try:
        batch = requests()[:8]
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda r: list(client.complete(r, timeout=60).token_ids), batch))
        limits = Limits(context_length=client.info().context_length)
        for request, got in zip(batch, served):
            job = build_job(request, tokenizer, limits)
            assert got == generate(alone, tokenizer, job.prompt_ids, job.params, job.stop_ids).output_ids
    finally:
        client.close()
        server.stop(1.0)
