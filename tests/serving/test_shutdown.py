"""`sc2deploy serve` as a real process: it prints its port, and on SIGTERM finishes in-flight streams and exits 0."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from sc2deploy.serving.client import Client, make_request
from sc2deploy.serving.v1 import completion_pb2 as pb

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def start_server(*args: str) -> tuple[subprocess.Popen, int, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "sc2deploy.cli", "serve", "--size", "tiny", "--host", "127.0.0.1",
                                "--port", "0", *args], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 120
    while port is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else None
    if port is None:
        process.kill()
        pytest.fail("the server printed no port:\n" + "".join(lines))
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, port, lines


def test_sigterm_finishes_in_flight_streams_then_exits_0():
    process, port, lines = start_server("--grace", "30", "--max-batch", "2")
    try:
        client = Client(f"127.0.0.1:{port}")
        assert client.health() == "SERVING"
        stream = client.stream(make_request("def long_function():\n", max_tokens=400), timeout=120)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        chunks = [first] + list(stream)  # the stream started before SIGTERM runs to its end
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 400 == chunks[-1].usage.completion_tokens
        assert process.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError) as error:
            client.complete(make_request("x", max_tokens=2), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert "shutting down" in "".join(lines) and "Traceback" not in "".join(lines)


def test_grace_period_over_cancels_what_is_left():
    process, port, lines = start_server("--grace", "1")
    try:
        client = Client(f"127.0.0.1:{port}")
        stream = client.stream(make_request("def endless():\n", max_tokens=1000), timeout=120)
        next(stream)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        last = list(stream)[-1]  # the server ends it half a second before the grace period and says so
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED and 0 < last.usage.completion_tokens < 1000
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 15
        client.close()
    finally:
        if process.poll() is None:
            process.kill()


def test_refuses_new_requests_while_draining():
    process, port, lines = start_server("--grace", "20", "--max-batch", "1")
    try:
        client = Client(f"127.0.0.1:{port}")
        stream = client.stream(make_request("class A:\n", max_tokens=300), timeout=120)
        next(stream)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        fresh = Client(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as error:
            fresh.complete(make_request("x", max_tokens=2), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(stream)[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert process.wait(timeout=30) == 0
        fresh.close()
        client.close()
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_drains_the_http_front_end_too():
    process, port, lines = start_server("--grace", "30", "--max-batch", "2", "--http-port", "0")
    try:
        http_port = int(re.search(r"HTTP on :(\d+)", "".join(lines)).group(1))
        url = f"http://127.0.0.1:{http_port}"
        body = {"model": "starcoder2-tiny", "prompt": "def long_function():\n", "max_tokens": 1000, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            events = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
            first = next(events)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(url + "/health", timeout=10).status_code == 503
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            rest = [first] + list(events)  # the stream started before SIGTERM runs to its end
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 1000
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in "".join(lines)


def test_serve_usage_errors_are_messages(tmp_path):
    for args, message in ([["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"],
                          [["--api-key-file", str(tmp_path / "none")], "cannot read API key file"],
                          [["--backend", "ort"], "the ort backend needs --artifact DIR"]):
        done = subprocess.run([sys.executable, "-m", "sc2deploy.cli", "serve", "--size", "tiny", "--port", "0", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("locked", ["folder", "file"])
def test_an_unreadable_artifact_is_one_line_and_exit_2(tmp_path, locked):
    # a volume mounted with another owner, as in a container; root reads everything, so it runs without the
    # capabilities that let it (setpriv, util-linux)
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "sc2deploy.json").write_text("{}")
    (folder if locked == "folder" else folder / "sc2deploy.json").chmod(0o000)
    command = [sys.executable, "-m", "sc2deploy.cli", "serve", "--artifact", str(folder), "--port", "0"]
    if os.getuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop the capability to read anything")
        drop = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
        (folder / "sc2deploy.json").chmod(0o644)
    assert done.returncode == 2, done.stderr
    assert "cannot read --artifact" in done.stderr and "permission denied" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
