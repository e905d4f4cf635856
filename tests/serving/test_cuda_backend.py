"""One request served by the cuda backend equals `generate` on a cuda runtime of its own.

On CPU the backend runs under the Triton interpreter (no CUDA graphs); the `cuda` case runs on a GPU host
(`pytest -m gpu`), with graphs."""
from __future__ import annotations

import pytest
import torch

from sc2deploy.generation import generate
from sc2deploy.plugins.triton_kernel import INTERPRET
from sc2deploy.runtime import open_runtime
from sc2deploy.serving.client import Client, make_request
from sc2deploy.serving.jobs import Limits, build_job
from sc2deploy.serving.server import CompletionServer, ServerOptions

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("device, dtype", [("cpu", "fp32"), pytest.param("cuda", "bf16", marks=pytest.mark.gpu)])
def test_served_request_equals_generate(tiny_source, tokenizer, device, dtype):
    if INTERPRET != (device == "cpu"):
        pytest.skip(f"the Triton kernels were built {'with' if INTERPRET else 'without'} TRITON_INTERPRET=1")
    runtime = open_runtime("cuda", source=tiny_source, dtype=dtype, device=device, max_batch=4, capacity=512)
    server = CompletionServer(runtime, tokenizer, ServerOptions(host="127.0.0.1", port=0))
    server.start()
    client = Client(f"127.0.0.1:{server.port}")
    request = make_request("def fibonacci(n):\n    ", "\n    return result\n", max_tokens=12)
    try:
        client.wait_ready(60)
        streamed = list(client.stream(request, timeout=240))
    finally:
        client.close()
        server.stop(grace=1.0)
    job = build_job(request, tokenizer, Limits(context_length=tiny_source.config.max_position_embeddings))
    alone = open_runtime("cuda", source=tiny_source, dtype=dtype, device=device, max_batch=1, capacity=512)
    expected = generate(alone, tokenizer, job.prompt_ids, job.params, job.stop_ids)
    assert [t for chunk in streamed for t in chunk.token_ids] == expected.output_ids
    assert "".join(chunk.text for chunk in streamed) == expected.text
    assert torch.device(device).type == alone.device.type
