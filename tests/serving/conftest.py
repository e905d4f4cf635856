"""A real completion server on 127.0.0.1 (tiny preset, random weights, eager) and the `generate` oracle."""
from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health")
pytest.importorskip("grpc_reflection")

from sc2deploy.checkpoint import RandomSource  # noqa: E402
from sc2deploy.config import preset  # noqa: E402
from sc2deploy.generation import generate  # noqa: E402
from sc2deploy.runtime import open_runtime  # noqa: E402
from sc2deploy.serving.client import Client  # noqa: E402
from sc2deploy.serving.jobs import Limits, build_job  # noqa: E402
from sc2deploy.serving.server import CompletionServer, ServerOptions  # noqa: E402
from sc2deploy.tokenizer import Tokenizer  # noqa: E402

MAX_BATCH = 8


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="session")
def tiny_source():
    return RandomSource(preset("tiny"), seed=0)


@dataclass
class Running:
    server: CompletionServer
    client: Client

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def scheduler(self):
        return self.server.scheduler

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Wait until no request waits or runs; returns the final stats (all slots must be free)."""
        assert self.scheduler.wait_idle(timeout), f"still busy after {timeout} s: {self.scheduler.stats()}"
        stats = self.scheduler.stats()
        assert stats["free_slots"] == stats["max_batch"] and stats["waiting"] == 0 and stats["running"] == 0, stats
        return stats


@contextmanager
def serving(source, tokenizer, max_batch: int = MAX_BATCH, client_options: dict | None = None, **options):
    """A CompletionServer on 127.0.0.1 with a fresh eager runtime; yields Running."""
    runtime = open_runtime("eager", source=source, max_batch=max_batch, capacity=source.config.cache_positions())
    server = CompletionServer(runtime, tokenizer, ServerOptions(host="127.0.0.1", port=0, **options))
    server.start()
    client_options = client_options if client_options is not None else {}
    client = Client(f"127.0.0.1:{server.port}", **client_options)
    try:
        yield Running(server, client)
    finally:
        client.close()
        server.stop(grace=1.0)


@pytest.fixture(scope="session")
def make_server(tiny_source, tokenizer):
    """make_server(max_batch=..., **ServerOptions fields) -> a context manager yielding Running."""
    return lambda **options: serving(tiny_source, tokenizer, **options)


@pytest.fixture(scope="session")
def server(tiny_source, tokenizer):
    with serving(tiny_source, tokenizer, max_batch=MAX_BATCH, max_queue=64) as running:
        running.client.wait_ready(30)
        yield running


class Oracle:
    """`sc2deploy generate` for a CompleteRequest: same prompt building, one sequence alone in a batch-1 runtime."""

    def __init__(self, source, tokenizer):
        self.runtime = open_runtime("eager", source=source, max_batch=1, capacity=source.config.cache_positions())
        self.tokenizer = tokenizer
        self.limits = Limits(context_length=source.config.max_position_embeddings)
        self._cache: dict[bytes, object] = {}

    def __call__(self, request, logprobs: int | None = None):
        key = request.SerializeToString(deterministic=True) + bytes([logprobs or 0])
        if key not in self._cache:
            job = build_job(request, self.tokenizer, self.limits)
            self._cache[key] = generate(self.runtime, self.tokenizer, job.prompt_ids, job.params, job.stop_ids,
                                        logprobs=job.logprobs if logprobs is None else logprobs)
        return self._cache[key]

    def greedy_margin(self, request) -> float:
        """Smallest gap between the two most likely tokens along the greedy path (in logits)."""
        result = self(request, logprobs=2)
        return min((top[0][1] - top[1][1] for _, top in result.logprobs), default=float("inf"))


@pytest.fixture(scope="session")
def oracle(tiny_source, tokenizer) -> Oracle:
    return Oracle(tiny_source, tokenizer)


def _wait_for(predicate, timeout: float, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def wait_for():
    """wait_for(predicate, timeout) -> whether it became true in time."""
    return _wait_for


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1/localhost made with the openssl CLI, and a second unrelated one."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    files = {}
    for name in ("server", "other"):
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
        files[name] = (cert.read_bytes(), key.read_bytes())
    return files
