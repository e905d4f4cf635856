"""Prometheus metrics of the completion server (prometheus-client), one registry per server, and the HTTP
endpoint that serves them: on the server's host, behind its API key and TLS when it has them."""
from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sc2deploy.errors import UserError
from sc2deploy.serving.auth import KeyRing, key_from_metadata

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by method and status code, queue depth, batch size, time to first token, tokens/s."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("sc2deploy_requests", "Finished RPCs by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.queue_depth = Gauge("sc2deploy_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.running = Gauge("sc2deploy_running_sequences", "Sequences holding a cache slot", registry=r)
        self.batch_size = Histogram("sc2deploy_batch_size", "Sequences decoded together per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step_seconds = Histogram("sc2deploy_decode_step_seconds", "Duration of one batched decode step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("sc2deploy_time_to_first_token_seconds",
                                             "From request arrival to its first token (queueing included)",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("sc2deploy_inter_token_latency_seconds",
                                             "Time between consecutive tokens of one request",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("sc2deploy_generated_tokens", "Generated tokens (rate() gives tokens/s)", registry=r)
        self.tokens_per_second = Gauge("sc2deploy_decode_tokens_per_second",
                                       "Tokens per second of the latest decode step (batch size / step time)",
                                       registry=r)
        self.prompt_tokens = Counter("sc2deploy_prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.prefix_lookups = Counter("sc2deploy_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("sc2deploy_prefix_cache_hits",
                                   "Prompts that reused the cache of a stored or running sequence's prefix",
                                   registry=r)
        self.prefix_reused_tokens = Counter("sc2deploy_prefix_cache_reused_tokens",
                                            "Prompt tokens restored from the prefix cache instead of prefilled",
                                            registry=r)
        self.prefix_cache_bytes = Gauge("sc2deploy_prefix_cache_bytes", "Bytes of KV cache the prefix cache holds",
                                        registry=r)

    def observe_step(self, batch: int, seconds: float) -> None:
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)
        self.running.set(batch)
        if seconds > 0:
            self.tokens_per_second.set(batch / seconds)

    def serve(self, port: int, host: str, keys: KeyRing | None = None,
              tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
        """Serve GET /metrics on host:port (0: a free port) from a thread; `server_port` tells which."""
        server = _http_server(host, port, _metrics_handler(self.registry, keys))
        if tls is not None:  # the handshake happens in the request's thread, bounded by its timeout
            server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, name="sc2deploy-metrics", daemon=True).start()
        return server


def _http_server(host: str, port: int, handler) -> ThreadingHTTPServer:
    host = host.strip("[]")

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

        def handle_error(self, request, client_address):  # a client's bad TLS or dropped socket: not ours to print
            pass

    try:
        return Server((host, port), handler)
    except (OSError, OverflowError) as e:
        raise UserError(f"cannot serve metrics on {host}:{port} ({getattr(e, 'strerror', None) or e}); choose a "
                        f"free --metrics-port and a --metrics-host of this machine") from None


def _metrics_handler(registry: CollectorRegistry, keys: KeyRing | None):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a client may take to send its request: a slow one cannot hold a thread for long

        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                return self._reply(404, b"only /metrics is served here\n")
            if keys is not None:
                given = key_from_metadata((k.lower(), v) for k, v in self.headers.items())
                if not keys.allows(given):
                    return self._reply(401, (keys.refusal(given) + "\n").encode(),
                                       {"WWW-Authenticate": 'Bearer realm="sc2deploy"'})
            self._reply(200, generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST})

        def _reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

    return Handler
