"""Health, reflection, TLS, API keys, Prometheus metrics, the `complete` command, and `serve` configured from
the environment with its --json start-up line and JSON log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sc2deploy.cli import main
from sc2deploy.serving.client import Client, make_request

pytestmark = pytest.mark.timeout(120)
SERVICE = "sc2deploy.v1.CompletionService"


def test_health_says_serving(server):
    assert server.client.health() == "SERVING"
    assert server.client.health(SERVICE) == "SERVING"
    with pytest.raises(grpc.RpcError) as error:
        server.client.health("no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.client.channel)
    answers = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    file = descriptor_pb2.FileDescriptorProto.FromString(answers[1].file_descriptor_response.file_descriptor_proto[0])
    assert file.name == "sc2deploy/v1/completion.proto" and file.package == "sc2deploy.v1"


def test_tls_mode(make_server, tls_files):
    cert, key = tls_files["server"]
    with make_server(max_batch=2, tls_cert=cert, tls_key=key, client_options=dict(root_certificates=cert)) as tls:
        assert tls.client.complete(make_request("x", max_tokens=2), timeout=30).usage.completion_tokens == 2
        assert tls.client.health() == "SERVING"
        plain = Client(tls.target)
        with pytest.raises(grpc.RpcError) as error:
            plain.complete(make_request("x", max_tokens=2), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
        untrusted = Client(tls.target, root_certificates=tls_files["other"][0])
        with pytest.raises(grpc.RpcError) as error:
            untrusted.complete(make_request("x", max_tokens=2), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        untrusted.close()


def test_api_key_mode(make_server):
    with make_server(max_batch=2, api_keys=["alpha-key", "beta-key"], client_options=dict(api_key="beta-key")) as keyed:
        assert keyed.client.complete(make_request("x", max_tokens=2), timeout=30).usage.completion_tokens == 2
        assert [c.text for c in keyed.client.stream(make_request("x", max_tokens=2), timeout=30)]
        for key in (None, "wrong-key", "alpha-ke", "ALPHA-KEY"):
            other = Client(keyed.target, api_key=key)
            for call in (lambda: other.complete(make_request("x", max_tokens=2), timeout=10),
                         lambda: list(other.stream(make_request("x", max_tokens=2), timeout=10)),
                         lambda: other.info()):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, key
            assert other.health() == "SERVING"  # probes need no key
            other.close()
        stub = keyed.client.stub
        assert stub.Complete(make_request("x", max_tokens=1), metadata=[("x-api-key", "alpha-key")],
                             timeout=30).usage.completion_tokens == 1
        keyed.wait_idle()


def test_tls_with_api_key_and_the_complete_command(make_server, tls_files, tmp_path, capsys):
    cert, key = tls_files["server"]
    options = dict(root_certificates=cert, api_key="k")
    with make_server(max_batch=1, tls_cert=cert, tls_key=key, api_keys=["k"], client_options=options) as both:
        assert both.client.complete(make_request("x", max_tokens=1), timeout=30).usage.completion_tokens == 1
        anonymous = Client(both.target, root_certificates=cert)
        with pytest.raises(grpc.RpcError) as error:
            anonymous.complete(make_request("x", max_tokens=1), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        anonymous.close()
        (tmp_path / "ca.pem").write_bytes(cert)
        (tmp_path / "key.txt").write_text("# the key\nk\n")
        command = ["complete", "--server", both.target, "--tls-ca", str(tmp_path / "ca.pem"), "--max-tokens", "2"]
        assert main(command + ["--api-key-file", str(tmp_path / "key.txt"), "x"]) == 0
        assert "[" in capsys.readouterr().err
        assert main(command + ["x"]) == 2  # a missing key is the user's to fix
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_prometheus_metrics(make_server):
    with make_server(max_batch=2, metrics_port=0, metrics_host="127.0.0.1") as measured:
        measured.client.complete(make_request("def f():", max_tokens=5), timeout=30)
        list(measured.client.stream(make_request("def g():", max_tokens=5), timeout=30))
        with pytest.raises(grpc.RpcError):
            measured.client.complete(make_request(""), timeout=30)
        port = measured.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in ('sc2deploy_requests_total{code="OK",method="Complete"} 1.0',
                     'sc2deploy_requests_total{code="OK",method="CompleteStream"} 1.0',
                     'sc2deploy_requests_total{code="INVALID_ARGUMENT",method="Complete"} 1.0',
                     "sc2deploy_queue_depth 0.0", "sc2deploy_generated_tokens_total 10.0",
                     "sc2deploy_time_to_first_token_seconds_count 2.0"):
            assert line in text, line
        for name in ("sc2deploy_batch_size_bucket", "sc2deploy_inter_token_latency_seconds_bucket",
                     "sc2deploy_decode_tokens_per_second", "sc2deploy_decode_step_seconds_bucket"):
            assert name in text, name


def test_complete_command_prints_what_generate_prints(server, capsys):
    assert main(["complete", "--server", server.target, "--max-tokens", "6", "def fib(n):"]) == 0
    served = capsys.readouterr()
    assert main(["generate", "--size", "tiny", "--prompt", "def fib(n):", "--max-new-tokens", "6"]) == 0
    generated = capsys.readouterr()
    assert served.out == generated.out and "[length; 6 tokens" in served.err
    assert main(["complete", "--server", server.target, "--max-tokens", "6", "--stream", "--suffix", ")\n",
                 "print("]) == 0
    assert "prompt" in capsys.readouterr().err


def test_complete_command_errors_are_messages(server, capsys):
    assert main(["complete", "--server", server.target, "--max-tokens", "2000", "x"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "Traceback" not in err
    assert main(["complete", "--server", "127.0.0.1:1", "--timeout", "2", "x"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["complete", "--server", server.target]) == 2
    assert "give a PROMPT" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "complete"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "example" in capsys.readouterr().out


def test_serve_from_environment_variables_with_json_startup_line_and_json_logs():
    """A real `sc2deploy serve` configured by SC2DEPLOY_* variables: its --json line on stdout, its JSON log on
    stderr with the client's request id, and the limits it serves with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SC2DEPLOY_")}
    env.update(PYTHONUNBUFFERED="1", SC2DEPLOY_SIZE="tiny", SC2DEPLOY_MAX_BATCH="3", SC2DEPLOY_MAX_QUEUE="5",
               SC2DEPLOY_JSON="1", SC2DEPLOY_LOG_FORMAT="json", SC2DEPLOY_CONTEXT="512", SC2DEPLOY_PORT="1")
    process = subprocess.Popen([sys.executable, "-m", "sc2deploy", "serve", "--host", "127.0.0.1", "--port", "0"],
                               cwd=Path(__file__).resolve().parents[2], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    try:
        line = process.stdout.readline()
        assert line, "no JSON line on stdout; stderr:\n" + "".join(stderr)
        started = json.loads(line)
        assert {k: started[k] for k in ("host", "tls", "metrics_port", "backend", "dtype", "max_batch", "max_queue",
                                        "context")} == {"host": "127.0.0.1", "tls": False, "metrics_port": None,
                                                        "backend": "eager", "dtype": "fp32", "max_batch": 3,
                                                        "max_queue": 5, "context": 512}
        with Client(f"127.0.0.1:{started['port']}") as client:  # --port 0 on the command line beat SC2DEPLOY_PORT
            info = client.info()
            assert (info.max_batch, info.max_queue, info.context_length) == (3, 5, 512)
            _, call = client.stub.Complete.with_call(make_request("def f():", max_tokens=2), timeout=30,
                                                     metadata=[("x-request-id", "abc")])
            assert dict(call.trailing_metadata())["x-request-id"] == "abc"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        reader.join(10)
    finally:
        process.kill()
    entries = [json.loads(line) for line in stderr]  # every stderr line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    (access,) = [e for e in entries if e.get("request_id") == "abc"]
    assert (access["method"], access["code"], access["completion_tokens"]) == ("Complete", "OK", 2)
    assert any("listening on 127.0.0.1:" in e["message"] for e in entries)  # the human line, now a JSON one
    assert process.stdout.read() == ""  # one line on stdout, nothing else
