"""Prometheus metrics of the completion server (prometheus-client), one registry per server."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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

    def observe_step(self, batch: int, seconds: float) -> None:
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)
        self.running.set(batch)
        if seconds > 0:
            self.tokens_per_second.set(batch / seconds)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Expose /metrics over HTTP; returns (server, thread) from prometheus_client."""
        return start_http_server(port, addr=host, registry=self.registry)
