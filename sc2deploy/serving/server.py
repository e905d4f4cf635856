"""The gRPC completion server: CompletionService, health, reflection, API keys, TLS, limits, metrics.

Status codes: INVALID_ARGUMENT for a request that can never succeed (empty prompt, prompt plus
max_tokens over the context, bad sampling values, invalid UTF-8), RESOURCE_EXHAUSTED when the queue
is full (or a message is over the size limit), UNAUTHENTICATED for a missing or wrong API key,
DEADLINE_EXCEEDED when the client's deadline passes, UNAVAILABLE while shutting down.
"""
from __future__ import annotations

import logging
import platform
import time
from concurrent import futures
from dataclasses import dataclass
from importlib import metadata

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sc2deploy import __version__
from sc2deploy.config import PRESETS
from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.serving.auth import ApiKeyInterceptor
from sc2deploy.serving.jobs import Limits, build_job
from sc2deploy.serving.metrics import Metrics
from sc2deploy.serving.scheduler import DEADLINE, Finished, QueueFull, Request, Scheduler, ShuttingDown, Step
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.serving.v1 import completion_pb2_grpc as pb_grpc
from sc2deploy.serving.wire import BadRequest, parse_request
from sc2deploy.tokenizer import Tokenizer

log = logging.getLogger("sc2deploy.serving")

SERVICE = pb.DESCRIPTOR.services_by_name["CompletionService"].full_name  # sc2deploy.v1.CompletionService
FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
          "cancelled": pb.FINISH_REASON_CANCELLED}
MiB = 1 << 20


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    max_queue: int = 64
    prefill_tokens: int = 256
    context_length: int | None = None  # default: the model's max_position_embeddings
    default_max_tokens: int = 128
    max_message_bytes: int = 4 * MiB
    tls_cert: bytes | None = None  # PEM
    tls_key: bytes | None = None
    api_keys: list[str] | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    source: str = ""  # where the weights came from, for GetModelInfo


class CompletionServicer(pb_grpc.CompletionServiceServicer):
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, limits: Limits, info: pb.ModelInfo,
                 metrics: Metrics):
        self.scheduler, self.tokenizer, self.limits, self.info, self.metrics = (scheduler, tokenizer, limits, info,
                                                                               metrics)

    def GetModelInfo(self, request, context):
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return self.info

    def Complete(self, request, context):
        texts, ids, logprobs = [], [], []
        for event in self._run("Complete", request, context):
            if isinstance(event, Step):
                texts.append(event.text)
                ids += event.token_ids
                logprobs += event.logprobs
            else:
                return pb.CompleteResponse(text="".join(texts), token_ids=ids, finish_reason=FINISH[event.reason],
                                           stop_sequence=event.stop_sequence, usage=_usage(event),
                                           logprobs=[_logprob(x) for x in logprobs])
        return pb.CompleteResponse()  # the client went away; nobody reads this

    def CompleteStream(self, request, context):
        for event in self._run("CompleteStream", request, context):
            if isinstance(event, Step):
                yield pb.CompleteChunk(text=event.text, token_ids=event.token_ids,
                                       logprobs=[_logprob(x) for x in event.logprobs])
            else:
                yield pb.CompleteChunk(finish_reason=FINISH[event.reason], stop_sequence=event.stop_sequence,
                                       usage=_usage(event))

    def _run(self, method: str, request, context):
        """Validate, enqueue, and yield the request's Steps and its final Finished; aborts with the status."""
        if isinstance(request, BadRequest):
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            job = build_job(request, self.tokenizer, self.limits)
        except UserError as e:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            handle = self.scheduler.submit(job, deadline)
        except QueueFull as e:
            self._abort(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDown as e:
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE, str(e))
        if not context.add_callback(handle.cancel):  # runs when the RPC ends: cancelled, deadline, or done
            handle.cancel()
        finished = None
        try:
            finished = yield from self._events(handle, context)
        finally:
            handle.cancel()  # a no-op once finished; frees the slot if the client went away mid-stream
            if finished is None:  # the RPC ended first: gRPC closed this generator
                self.metrics.requests.labels(method, "CANCELLED").inc()
        if finished.reason == DEADLINE:
            self._abort(context, method, grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the deadline passed after {finished.completion_tokens} tokens")
        if finished.reason == "error":
            self._abort(context, method, grpc.StatusCode.INTERNAL, finished.error)
        code = "CANCELLED" if finished.reason == "cancelled" and not context.is_active() else "OK"
        self.metrics.requests.labels(method, code).inc()
        yield finished

    def _events(self, handle: Request, context):
        while True:
            event = handle.next_event(timeout=1.0)
            if event is None:
                if not context.is_active():
                    handle.cancel()
                continue
            if isinstance(event, Finished):
                return event
            yield event

    def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(method, code.name).inc()
        context.abort(code, message)


def _usage(finished: Finished) -> pb.Usage:
    return pb.Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens)


def _logprob(entry) -> pb.TokenLogprob:
    token, logprob, top = entry
    return pb.TokenLogprob(token_id=token, logprob=logprob, top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in top])


def _service_handler(servicer: CompletionServicer) -> grpc.GenericRpcHandler:
    """Like the generated add_..._to_server, but requests are parsed by wire.parse_request."""
    handlers = {
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=parse_request,
            response_serializer=pb.CompleteResponse.SerializeToString),
        "CompleteStream": grpc.unary_stream_rpc_method_handler(
            servicer.CompleteStream, request_deserializer=parse_request,
            response_serializer=pb.CompleteChunk.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def model_info(runtime: Runtime, options: ServerOptions, limits: Limits) -> pb.ModelInfo:
    config = runtime.config
    size = next((name for name, preset in PRESETS.items() if preset == config), "custom")
    versions = {"sc2deploy": __version__, "python": platform.python_version()}
    runtime_package = {"ort": "onnxruntime", "trt": "tensorrt"}.get(runtime.name)
    for package in ("torch", "grpcio", "protobuf", runtime_package):
        try:
            if package:
                versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    for key, value in runtime.describe().items():
        if key.endswith("version"):
            versions[key] = str(value)
    return pb.ModelInfo(size=size, dtype=runtime.dtype, runtime=runtime.name, window=config.window,
                        context_length=limits.context_length, vocab_size=config.vocab_size,
                        num_parameters=config.num_parameters, max_batch=runtime.max_batch,
                        max_queue=options.max_queue, default_max_tokens=limits.default_max_tokens,
                        max_logprobs=limits.max_logprobs, versions=versions, source=options.source)


def context_length(runtime: Runtime, requested: int | None) -> int:
    """The per-request context: the model's, or less; the runtime's cache must hold its window."""
    model = runtime.config.max_position_embeddings
    context = model if requested is None else requested
    if not 2 <= context <= model:
        raise UserError(f"--context {context} is outside [2, {model}] (the model's context)")
    if runtime.capacity < runtime.config.cache_positions(context):
        raise UserError(f"the {runtime.name} runtime holds {runtime.capacity} positions per sequence, fewer than "
                        f"the {runtime.config.cache_positions(context)} a context of {context} needs; "
                        f"lower --context")
    return context


class CompletionServer:
    """Owns the scheduler and the grpc.Server; start() binds and returns the port."""

    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, options: ServerOptions | None = None):
        self.options = options = options or ServerOptions()
        self.runtime = runtime
        self.limits = Limits(context_length=context_length(runtime, options.context_length),
                             default_max_tokens=options.default_max_tokens)
        self.metrics = Metrics()
        self.scheduler = Scheduler(runtime, tokenizer, max_queue=options.max_queue,
                                   prefill_tokens=options.prefill_tokens, metrics=self.metrics)
        self.info = model_info(runtime, options, self.limits)
        self.servicer = CompletionServicer(self.scheduler, tokenizer, self.limits, self.info, self.metrics)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # Every generation holds an RPC thread; the pool also covers refusals, health and reflection.
        workers = runtime.max_batch + options.max_queue + 16
        interceptors = []
        if options.api_keys:
            interceptors.append(ApiKeyInterceptor(options.api_keys, on_reject=lambda method: self.metrics.requests
                                                  .labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sc2deploy-rpc"),
            interceptors=interceptors, maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", options.max_message_bytes),
                     ("grpc.max_send_message_length", options.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port: int | None = None
        self._metrics_http: tuple | None = None
        self.metrics_port: int | None = None

    def start(self) -> int:
        o = self.options
        host = o.host.strip("[]")
        address = f"[{host}]:{o.port}" if ":" in host else f"{host}:{o.port}"
        if o.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise UserError(f"cannot listen on {address}: the port is taken or the host is not local")
        if o.metrics_port is not None:
            http_server, thread = self.metrics.serve(o.metrics_port, o.metrics_host)
            self._metrics_http = (http_server, thread)
            self.metrics_port = http_server.server_port
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", SERVICE, o.host, self.port)
        return self.port

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for `grace` seconds, cancel the rest, stop."""
        self.health.enter_graceful_shutdown()
        self.scheduler.close()
        stopped = self.server.stop(grace)
        if not self.scheduler.wait_idle(max(grace - 0.5, 0.0)):
            self.scheduler.cancel_all()  # streams still open get a last chunk with finish reason CANCELLED
            self.scheduler.wait_idle(0.5)
        stopped.wait(grace + 1.0)
        self.scheduler.stop()
        if self._metrics_http is not None:
            server, _thread = self._metrics_http
            server.shutdown()
            server.server_close()
