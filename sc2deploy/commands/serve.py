"""sc2deploy serve: the gRPC completion service over any runtime, with continuous batching."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from sc2deploy.commands.common import (add_device, add_no_verify, add_run_dtype, add_weights, check_dtype,
                                       check_readable, infer_backend, notice, open_weights, positive_int,
                                       resolve_device, runtime_folder)
from sc2deploy.commands.environment import PREFIX
from sc2deploy.commands.progress import StageLog
from sc2deploy.errors import UserError
from sc2deploy.runtime import BACKENDS
from sc2deploy.serving.logs import LOG_FORMATS


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve completions over gRPC and HTTP (streaming, FIM, continuous batching)",
        description="Serve StarCoder2 completions over gRPC: the sc2deploy.v1.CompletionService (Complete, "
                    "CompleteStream, GetModelInfo), the standard grpc.health.v1 health service and server "
                    "reflection. Concurrent requests share decode steps (continuous batching over --max-batch "
                    "cache slots); up to --max-queue more wait for a slot, beyond that requests are refused with "
                    "RESOURCE_EXHAUSTED. On SIGTERM the server reports NOT_SERVING, stops accepting, lets "
                    "in-flight requests finish for --grace seconds, then exits 0. The weights come from an "
                    "export --artifact (ort), an --engine (trt), a --checkpoint or a --size preset (eager and cuda, "
                    "random weights).",
        epilog="examples:\n"
               "  sc2deploy serve --size tiny --backend eager --port 50051\n"
               "  sc2deploy serve --checkpoint ckpt/starcoder2-15b --backend cuda --dtype bf16 --max-batch 32\n"
               "  sc2deploy serve --artifact out/3b-ort --backend ort --max-batch 16 --metrics-port 9090 \\\n"
               "      --tls-cert server.crt --tls-key server.key --api-key-file keys.txt\n"
               "  sc2deploy serve --artifact out/3b-ort --http-port 8080   # OpenAI and llama.cpp HTTP APIs too\n"
               "then: sc2deploy complete --server localhost:50051 'def fib(n):'\n"
               "  or: curl localhost:8080/v1/completions -d '{\"model\": \"starcoder2-3b\", \"prompt\": \"def fib(n):\"}'\n\n"
               "environment:\n"
               f"  every option can be set as {PREFIX}<OPTION> (upper case, dashes as underscores), e.g. in a "
               "container:\n"
               f"    {PREFIX}MAX_BATCH=16 {PREFIX}API_KEY_FILE=/run/secrets/keys sc2deploy serve --artifact /models/a\n"
               "  an option on the command line wins; an empty variable is unset; switches take 1 or 0\n\n"
               "output:\n"
               "  --json prints one JSON line on stdout once listening (host, port, tls, metrics_port, http_port,\n"
               "  model_name, backend, dtype, max_batch, max_queue, context); --log-format json makes every stderr line a JSON object, and each\n"
               "  call's lines carry its request id (the client's x-request-id, or a new one, returned as trailing\n"
               "  metadata x-request-id)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = p.add_argument_group("model")
    add_weights(weights, seed_flag="--weights-seed")
    weights.add_argument("--artifact", metavar="DIR", help="export artifact folder (for --backend ort)")
    weights.add_argument("--engine", metavar="DIR", help="TensorRT engine folder (for --backend trt)")
    weights.add_argument("--backend", metavar="NAME",
                         help=f"runtime: {', '.join(BACKENDS)} (default: ort with --artifact, trt with --engine, "
                              "else eager)")
    add_run_dtype(weights)
    add_device(weights)
    add_no_verify(weights)
    weights.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads of the runtime (default: all)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 or [::] for every "
                          "interface, e.g. in a container)")
    net.add_argument("--port", type=non_negative_int, default=50051,
                     help="port (default 50051; 0 picks a free one, printed on stderr)")
    net.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain; with --tls-key, serve TLS only")
    net.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    net.add_argument("--api-key-file", metavar="FILE",
                     help="require an API key (one accepted key per line); clients send `authorization: Bearer KEY` "
                          "or `x-api-key: KEY`; the health service stays open")
    net.add_argument("--metrics-port", type=non_negative_int, metavar="N",
                     help="serve Prometheus metrics on http(s)://HOST:N/metrics, with the same TLS and API key as "
                          "the gRPC port")
    net.add_argument("--metrics-host", metavar="HOST", help="address of the metrics endpoint (default: --host)")
    net.add_argument("--http-port", type=non_negative_int, metavar="N",
                     help="also serve HTTP on this port: OpenAI's POST /v1/completions (suffix = fill-in-the-middle) "
                          "and GET /v1/models, llama.cpp's POST /infill, GET /health and GET /metrics; same scheduler, "
                          "limits, API key and TLS as gRPC")
    net.add_argument("--http-host", metavar="HOST", help="address of the HTTP port (default: --host)")
    net.add_argument("--model-name", metavar="NAME",
                     help="the model id of the HTTP APIs (default: starcoder2-<size>, or the weights' folder name)")
    net.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="how long a call may take to send its request message before DEADLINE_EXCEEDED "
                          "(default 30)")
    net.add_argument("--max-message-mb", type=positive_int, default=4, metavar="MB",
                     help="largest request or response message (default 4 MiB)")
    sched = p.add_argument_group("batching and limits")
    sched.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                       help="sequences decoded together, i.e. KV-cache slots (default 8)")
    sched.add_argument("--max-queue", type=non_negative_int, default=64, metavar="N",
                       help="requests that may wait for a slot before RESOURCE_EXHAUSTED (default 64)")
    sched.add_argument("--prefill-tokens", type=positive_int, default=256, metavar="N",
                       help="prompt tokens prefilled per engine step at most (default 256); while streams "
                            "decode, a step prefills only as many as take about one decode step (measured), so "
                            "a long prompt goes in chunks between decode steps and delays running streams by "
                            "about one step each, not by all of it")
    sched.add_argument("--context", type=positive_int, metavar="N",
                       help="prompt + max_tokens limit per request (default: the model's context); a smaller one "
                            "shrinks each slot's KV cache when the model's window is larger")
    sched.add_argument("--prefix-cache-mb", type=non_negative_int, default=512, metavar="MB",
                       help="keep the KV cache of finished sequences, up to this many MiB, for prompts that start "
                            "the same way (an editor's next request); they prefill only what differs (default 512; "
                            "0 turns it off; eager and ONNX Runtime on CPU)")
    sched.add_argument("--refuse-long-prompts", action="store_true",
                       help="refuse a fill-in-the-middle or repo-level prompt that does not fit the context instead "
                            "of trimming it (by default the text farthest from the cursor and the least relevant "
                            "context files are dropped, and the response says how much)")
    sched.add_argument("--default-max-tokens", type=positive_int, default=128, metavar="N",
                       help="max_tokens of requests that leave it unset (default 128)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may take to finish (default 10)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level on stderr (default info: one access-log line per call)")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text (default) or json: one JSON object per stderr line (time, level, logger, message, "
                        "request_id)")
    p.add_argument("--json", action="store_true",
                   help="once listening, print one JSON line on stdout describing the server")
    p.set_defaults(func=run)
    p.read_environment()


def head_config(args):
    """The Config of --checkpoint or --artifact when it is a head model (classifier or base model: served with
    Classify or Embed), else None. Reads only JSON."""
    from sc2deploy.config import Config
    from sc2deploy.contract import ARTIFACT, MANIFEST, folder_kind, read_manifest
    from sc2deploy.tasks import HEAD_TASKS

    config = None
    if args.checkpoint is not None and (Path(args.checkpoint) / "config.json").is_file():
        config = Config.load(args.checkpoint)
    elif args.artifact is not None and Path(args.artifact).is_dir() and folder_kind(args.artifact) != "checkpoint" \
            and (Path(args.artifact) / MANIFEST).is_file():
        config = Config.from_hf_dict(read_manifest(args.artifact, ARTIFACT).config,
                                     source=str(Path(args.artifact) / MANIFEST))
    return config if config is not None and config.head.task in HEAD_TASKS else None


def open_head_model(args, config):
    """(HeadRuntime, tokenizer, source description) of a head --checkpoint (eager, or cuda on a GPU) or
    --artifact (ort)."""
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.runtime import open_head_runtime
    from sc2deploy.tokenizer import Tokenizer

    where = args.checkpoint or args.artifact
    backend = infer_backend(args)
    wanted = "ort" if args.artifact else "eager"
    if args.engine is not None or backend not in (wanted, "cuda" if wanted == "eager" else wanted):
        raise UserError(f"{where} is a {config.head.task} model: serve it from --checkpoint (backend eager or cuda) "
                        f"or an `sc2deploy export` --artifact (backend ort)")
    options: dict = {"threads": args.threads} if args.threads else {}
    with StageLog() as stage:
        stage(f"serve: loading the {config.head.task} model ({where}) ...", show=False)
        if args.artifact:
            check_dtype(args, "ort", args.artifact)
            runtime = open_head_runtime("ort", artifact=args.artifact, verify=not args.no_verify, **options)
        else:
            dtype = check_dtype(args, "eager", None)
            device = resolve_device(args.device, backend)
            runtime = open_head_runtime("eager", source=CheckpointSource(args.checkpoint), dtype=dtype,
                                        device=device, **options)
    return runtime, Tokenizer.load(where), where


def open_model(args):
    """(runtime, tokenizer, source description) for the serve arguments: a causal LM's Runtime, or a head model's
    HeadRuntime (runtime/heads.py)."""
    from sc2deploy.config import Config
    from sc2deploy.runtime import open_runtime
    from sc2deploy.tokenizer import Tokenizer

    head = head_config(args)
    if head is not None:
        return open_head_model(args, head)
    backend = infer_backend(args)
    device = resolve_device(args.device, backend)
    on_weights = backend in ("eager", "cuda")
    folder = args.checkpoint if on_weights else runtime_folder(args, backend)
    dtype = check_dtype(args, backend, None if on_weights else folder)
    source = None
    if on_weights:
        source = open_weights(args.checkpoint, args.size, args.weights_seed)
        config = source.config
        where = args.checkpoint or f"--size {args.size} (random weights, seed {args.weights_seed})"
    else:
        config = Config.load(folder) if (Path(folder) / "config.json").is_file() else None
        where = folder
    capacity = config.cache_positions(args.context) if config is not None else None
    options: dict = {"threads": args.threads} if args.threads else {}
    if on_weights:
        options.update(dtype=dtype, device=device)
    if backend == "ort" and args.no_verify:
        options["verify"] = False
    with StageLog() as stage:
        stage(f"serve: loading the {backend} runtime ({where}) ...", show=False)
        runtime = open_runtime(backend, source=source, artifact=args.artifact, engine=args.engine,
                               max_batch=args.max_batch, capacity=capacity, **options)
    return runtime, Tokenizer.load(folder), where


def run(args) -> int:
    """Serve until SIGTERM or SIGINT. With --log-format json, what the command prints on stderr goes through the
    JSON log while it runs."""
    stderr = sys.stderr
    try:
        return _serve(args)
    finally:
        sys.stderr = stderr


def _serve(args) -> int:
    from sc2deploy.config import Config

    for folder, flag in ((args.checkpoint, "--checkpoint"), (args.artifact, "--artifact"), (args.engine, "--engine")):
        check_readable(folder, flag)
    folder = args.checkpoint or args.artifact or args.engine
    if folder is not None and (Path(folder) / "config.json").is_file():
        Config.load(folder)  # a bad config.json fails now, before the serving stack is imported
    missing = [name for name in ("grpc", "grpc_health", "grpc_reflection", "prometheus_client", "starlette", "uvicorn")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serving needs the `serve` extra ({missing[0]} is missing): pip install 'sc2deploy[serve]'")
    from sc2deploy.serving import logs
    from sc2deploy.serving.auth import read_api_keys, server_ssl_context
    from sc2deploy.serving.server import CompletionServer, ServerOptions

    logs.configure(args.log_level, args.log_format, sys.stderr)
    if args.log_format == "json":
        lines = logging.getLogger("sc2deploy.serve")
        lines.setLevel(logging.INFO)  # start-up and shutdown lines show at any --log-level, as in text
        sys.stderr = logs.LogStream(lines)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    if not 0 <= args.grace < float("inf"):
        raise UserError(f"--grace must be a number of seconds >= 0, got {args.grace}")
    if not 0 < args.read_timeout < float("inf"):
        raise UserError(f"--read-timeout must be a number of seconds > 0, got {args.read_timeout}")
    options = ServerOptions(
        host=args.host, port=args.port, max_queue=args.max_queue, prefill_tokens=args.prefill_tokens,
        context_length=args.context, default_max_tokens=args.default_max_tokens,
        max_message_bytes=args.max_message_mb << 20, read_timeout=args.read_timeout,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, http_port=args.http_port,
        http_host=args.http_host, model_name=args.model_name, trim_prompts=not args.refuse_long_prompts,
        prefix_cache_bytes=args.prefix_cache_mb << 20, max_batch=args.max_batch,
        tls_cert=_read(args.tls_cert, "--tls-cert"), tls_key=_read(args.tls_key, "--tls-key"),
        api_keys=read_api_keys(args.api_key_file) if args.api_key_file else None)
    # Check what can be checked before loading the model (minutes for a large one).
    if options.tls_cert is not None and options.tls_key is not None:
        server_ssl_context(options.tls_cert, options.tls_key)
    check_bindable(options.host, options.port, "--port")
    if options.metrics_port is not None:
        check_bindable(options.metrics_host or options.host, options.metrics_port, "--metrics-port")
    if options.http_port is not None:
        check_bindable(options.http_host or options.host, options.http_port, "--http-port")
    runtime, tokenizer, where = open_model(args)
    options.source = where
    server = CompletionServer(runtime, tokenizer, options)
    port = server.start()
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scheme = "TLS" if options.tls_cert else "plaintext"
    notice(f"sc2deploy serve: listening on {args.host}:{port} ({scheme}; {runtime.name} {runtime.dtype}, "
           f"max batch {server.max_batch}, queue {args.max_queue}, context {server.limits.context_length}"
           + (f"; metrics on :{server.metrics_port}/metrics" if server.metrics_port is not None else "")
           + (f"; HTTP on :{server.http_port} as model {server.model_name}" if server.http_port is not None else "")
           + ")")
    if args.json:
        print(json.dumps({"host": args.host, "port": port, "tls": options.tls_cert is not None,
                          "metrics_port": server.metrics_port, "http_port": server.http_port,
                          "model_name": server.model_name, "task": server.task, "backend": runtime.name, "dtype": runtime.dtype,
                          "max_batch": server.max_batch, "max_queue": args.max_queue,
                          "context": server.limits.context_length, "source": where, "pid": os.getpid()}), flush=True)
    while not stop.wait(0.5):
        pass
    notice(f"sc2deploy serve: shutting down (grace {args.grace:g} s)")
    server.stop(args.grace)
    notice("sc2deploy serve: stopped")
    return 0


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {flag} {path} ({e.strerror})") from None


def check_bindable(host: str, port: int, flag: str) -> None:
    """A UserError now, before the model loads, when `host`:`port` cannot be listened on."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            probe.bind(address)
    except (OSError, OverflowError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); choose a free {flag} and a host address of "
                        f"this machine (--host 127.0.0.1, or 0.0.0.0 for every interface)") from None
