"""The gRPC completion server: CompletionService, health, reflection, API keys, TLS, limits, metrics.

Status codes: INVALID_ARGUMENT for a request that can never succeed (empty prompt, prompt plus
max_tokens over the context, bad sampling values, invalid UTF-8, bytes that are not the message),
RESOURCE_EXHAUSTED when the queue is full (or a message is over the size limit), UNAUTHENTICATED for a
missing or wrong API key, DEADLINE_EXCEEDED when the client's deadline passes or its request message does
not arrive within `read_timeout`, UNAVAILABLE while shutting down.

Every call runs as a coroutine on one asyncio event loop (grpc.aio, in its own thread), not on a thread of
a pool: a call waiting for its message, an idle stream or a health probe costs a coroutine, so slow or
idle clients cannot starve health checks or other callers. A call without a valid key is refused from its
metadata before its message is read. Prompts are tokenized on a small thread pool (the tokenizer releases
the GIL), and a prompt that cannot fit the context is refused before it is tokenized in full. The engine
thread (Scheduler) wakes a call's coroutine when it has output for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import platform
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sc2deploy import __version__
from sc2deploy.config import PRESETS
from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.runtime.heads import scores
from sc2deploy.serving.auth import ApiKeyInterceptor, KeyRing, server_ssl_context
from sc2deploy.serving.frontend import METHODS_OF_TASK, Call, Frontend, Refused, done, events
from sc2deploy.serving.http_api import HttpApi, HttpServer
from sc2deploy.serving.jobs import Limits
from sc2deploy.serving.logs import REQUEST_ID_KEY, request_id
from sc2deploy.serving.metrics import Metrics
from sc2deploy.serving.scheduler import DEADLINE, Finished, HeadRequest, HeadScheduler, Scheduler, Step
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.serving.wire import BadRequest, parse_model_info_request, parse_prompt_request, parse_request
from sc2deploy.tasks import TEXT_GENERATION
from sc2deploy.tokenizer import Tokenizer

log = logging.getLogger("sc2deploy.serving")

SERVICE = pb.DESCRIPTOR.services_by_name["CompletionService"].full_name  # sc2deploy.v1.CompletionService
FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
          "cancelled": pb.FINISH_REASON_CANCELLED}
MiB = 1 << 20
REQUEST_OVERHEAD_BYTES = 64 << 10  # stop strings (16 x 256 characters), numbers, tags: what is not prompt text
DEFAULT_HOST = "127.0.0.1"  # of `serve --host` too: listening on every interface is a choice (--host 0.0.0.0)


@dataclass
class ServerOptions:
    host: str = DEFAULT_HOST
    port: int = 50051  # 0 picks a free port
    max_queue: int = 64
    prefill_tokens: int = 256
    context_length: int | None = None  # default: the model's max_position_embeddings
    default_max_tokens: int = 128
    max_message_bytes: int = 4 * MiB
    read_timeout: float = 30.0  # seconds a call may take to deliver its request message
    max_streams_per_connection: int = 128  # HTTP/2 streams (calls) one connection may hold open
    tls_cert: bytes | None = None  # PEM
    tls_key: bytes | None = None
    api_keys: list[str] | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  # default: host
    http_port: int | None = None  # the HTTP front end (OpenAI /v1/completions, llama.cpp /infill); None: off
    http_host: str | None = None  # default: host
    model_name: str | None = None  # the HTTP APIs' model id; default: starcoder2-<size>, or the weights' folder name
    trim_prompts: bool = True  # over-long FIM and repo-level prompts lose the text farthest from the cursor
    prefix_cache_bytes: int = 512 * MiB  # KV of finished sequences kept for prompts that start the same; 0: off
    source: str = ""  # where the weights came from, for GetModelInfo
    max_batch: int = 8  # head models (Classify, Embed): requests per padded call; a causal runtime has its own


class CompletionServicer:
    """The CompletionService's methods, as coroutines on the server's event loop."""

    def __init__(self, frontend: Frontend, info: pb.ModelInfo, read_timeout: float):
        self.frontend, self.info, self.read_timeout = frontend, info, read_timeout

    async def GetModelInfo(self, request, context):
        call = self._begin("GetModelInfo", context)
        if isinstance(request, BadRequest):
            await self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        self.frontend.count(call, "OK")
        return self.info

    async def Complete(self, requests, context):
        texts, ids, logprobs = [], [], []
        async with contextlib.aclosing(self._run("Complete", requests, context)) as stream:
            async for event in stream:
                if isinstance(event, Step):
                    texts.append(event.text)
                    ids += event.token_ids
                    logprobs += event.logprobs
                else:
                    return pb.CompleteResponse(text="".join(texts), token_ids=ids, finish_reason=FINISH[event.reason],
                                               stop_sequence=event.stop_sequence, usage=_usage(event),
                                               logprobs=[_logprob(x) for x in logprobs])
        return pb.CompleteResponse()  # not reached: _run ends with a Finished or raises

    async def CompleteStream(self, requests, context):
        async with contextlib.aclosing(self._run("CompleteStream", requests, context)) as stream:
            async for event in stream:
                if isinstance(event, Step):
                    yield pb.CompleteChunk(text=event.text, token_ids=event.token_ids,
                                           logprobs=[_logprob(x) for x in event.logprobs])
                else:
                    yield pb.CompleteChunk(finish_reason=FINISH[event.reason], stop_sequence=event.stop_sequence,
                                           usage=_usage(event))

    async def _run(self, method: str, requests, context):
        """Read, validate, enqueue; yield the request's Steps and its final Finished. Aborts with the status.
        Each call is counted once, under the status it ends with, and logged once (the access log)."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        call = self._begin(method, context)
        try:
            request = await self._read(call, context)
            if isinstance(request, BadRequest):
                await self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            try:
                job = await self.frontend.prepare(request)
                handle = self.frontend.submit(job, call, deadline)
            except Refused as e:
                await self._abort(context, call, e.code, e.message)
            try:
                async for event in events(handle):
                    if isinstance(event, Finished):
                        finished = event
                        break
                    call.completion_tokens += len(event.token_ids)
                    yield event
            finally:
                handle.cancel()  # a no-op once finished; frees the slot if the client went away mid-stream
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
            expired = deadline is not None and time.monotonic() >= deadline - 0.01
            self.frontend.count(call, "DEADLINE_EXCEEDED" if expired else "CANCELLED")
            raise
        call.prompt_tokens, call.completion_tokens = finished.prompt_tokens, finished.completion_tokens
        if finished.reason == DEADLINE:
            await self._abort(context, call, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the deadline passed after {finished.completion_tokens} tokens")
        if finished.reason == "error":
            await self._abort(context, call, grpc.StatusCode.INTERNAL, finished.error)
        self.frontend.count(call, "OK")
        yield finished

    async def Classify(self, requests, context):
        call, request, ids, handle = await self._head_call("Classify", requests, context)
        logits = np.asarray(handle.result, dtype=np.float32)
        rows = logits[None] if logits.ndim == 1 else logits
        head = self.frontend.scheduler.runtime.head  # type: ignore[union-attr]
        probabilities = scores(rows, head.scores)
        self.frontend.count(call, "OK")
        return pb.ClassifyResponse(task=head.task, labels=list(head.labels), token_ids=ids,
                                   logits=[pb.Vector(values=row.tolist()) for row in rows],
                                   scores=[pb.Vector(values=row.tolist()) for row in probabilities])

    async def Embed(self, requests, context):
        call, request, ids, handle = await self._head_call("Embed", requests, context)
        hidden = np.asarray(handle.result, dtype=np.float32)  # (tokens, hidden)
        pooling = request.pooling or "last"
        vectors = {"last": hidden[-1:], "mean": hidden.astype(np.float64).mean(axis=0, keepdims=True),
                   "none": hidden}[pooling].astype(np.float32)
        self.frontend.count(call, "OK")
        return pb.EmbedResponse(pooling=pooling, hidden_size=hidden.shape[-1], token_ids=ids,
                                embeddings=[pb.Vector(values=row.tolist()) for row in vectors])

    async def _head_call(self, method: str, requests, context) -> tuple[Call, object, list[int], HeadRequest]:
        """Read, validate, tokenize, enqueue and wait for a prefill-only request; aborts with the status."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        call = self._begin(method, context)
        request = await self._read(call, context)
        if isinstance(request, BadRequest):
            await self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            if method == "Embed" and request.pooling not in ("", "last", "mean", "none"):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"pooling is {request.pooling[:40]!r}; expected last, mean or none")
            ids = await self.frontend.prompt_ids(method, request.prompt, request.token_ids)
            handle = self.frontend.submit_prompt(ids, call, deadline)
        except Refused as e:
            await self._abort(context, call, e.code, e.message)
        try:
            await done(handle)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            handle.cancel()
            expired = deadline is not None and time.monotonic() >= deadline - 0.01
            self.frontend.count(call, "DEADLINE_EXCEEDED" if expired else "CANCELLED")
            raise
        if handle.reason == DEADLINE:
            await self._abort(context, call, grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed in the queue")
        if handle.reason == "cancelled":
            await self._abort(context, call, grpc.StatusCode.UNAVAILABLE,
                              "the server shut down before the request ran; retry on another replica")
        if handle.reason != "ok":
            await self._abort(context, call, grpc.StatusCode.INTERNAL, handle.error or "the request failed")
        return call, request, ids, handle

    async def _read(self, call: Call, context):
        """The call's one request message, if it arrives within read_timeout seconds."""
        try:
            request = await asyncio.wait_for(context.read(), self.read_timeout)
        except asyncio.TimeoutError:
            await self._abort(context, call, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no request message within {self.read_timeout:g} s")
        if request is grpc.aio.EOF:
            await self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
        return request

    @staticmethod
    def _begin(method: str, context) -> Call:
        """The call's record, with the client's x-request-id or a new one, which goes back as trailing metadata."""
        call = Call(method, request_id(context.invocation_metadata()))
        context.set_trailing_metadata(_trailing(call))
        return call

    async def _abort(self, context, call: Call, code: grpc.StatusCode, message: str):
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", call.method, message, extra={"request_id": call.request_id})
        self.frontend.count(call, code.name, message[:200])
        await context.abort(code, message, trailing_metadata=_trailing(call))


def _trailing(call: Call) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, call.request_id),)


def _usage(finished: Finished) -> pb.Usage:
    usage = pb.Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens)
    if finished.trimmed is not None:
        usage.trimmed.CopyFrom(pb.PromptTrim(**dataclasses.asdict(finished.trimmed)))
    return usage


def _logprob(entry) -> pb.TokenLogprob:
    token, logprob, top = entry
    return pb.TokenLogprob(token_id=token, logprob=logprob, top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in top])


def _service_handler(servicer: CompletionServicer) -> grpc.GenericRpcHandler:
    """The CompletionService's handlers. Complete and CompleteStream take their request as a stream (the wire
    format is the same as a unary call's) so that the servicer reads it itself, within `read_timeout`, and
    parses it with wire.parse_request; GetModelInfo parses with wire.parse_model_info_request.

    A request message longer than the context's tokens at their longest, plus room for stop strings and field
    tags, cannot fit: it is refused before it is parsed."""
    frontend = servicer.frontend
    most = frontend.limits.context_length * frontend.tokenizer.max_token_bytes + REQUEST_OVERHEAD_BYTES

    def parse(data: bytes):
        return parse_request(data, most)

    def parse_classify(data: bytes):
        return parse_prompt_request(pb.ClassifyRequest, data, most)

    def parse_embed(data: bytes):
        return parse_prompt_request(pb.EmbedRequest, data, most)

    handlers = {
        "Complete": grpc.stream_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=parse,
            response_serializer=pb.CompleteResponse.SerializeToString),
        "CompleteStream": grpc.stream_stream_rpc_method_handler(
            servicer.CompleteStream, request_deserializer=parse,
            response_serializer=pb.CompleteChunk.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=parse_model_info_request,
            response_serializer=pb.ModelInfo.SerializeToString),
        "Classify": grpc.stream_unary_rpc_method_handler(
            servicer.Classify, request_deserializer=parse_classify,
            response_serializer=pb.ClassifyResponse.SerializeToString),
        "Embed": grpc.stream_unary_rpc_method_handler(
            servicer.Embed, request_deserializer=parse_embed,
            response_serializer=pb.EmbedResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def model_info(runtime, options: ServerOptions, limits: Limits, max_batch: int | None = None) -> pb.ModelInfo:
    """A causal Runtime's, or a HeadRuntime's (runtime/heads.py; `max_batch` its requests per call)."""
    config = runtime.config
    task = config.head.task
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
                        num_parameters=config.num_parameters,
                        max_batch=runtime.max_batch if max_batch is None else max_batch,
                        max_queue=options.max_queue, default_max_tokens=limits.default_max_tokens,
                        max_logprobs=limits.max_logprobs, versions=versions, source=options.source, task=task,
                        methods=[*METHODS_OF_TASK[task], "GetModelInfo"])


def default_model_name(info: pb.ModelInfo) -> str:
    """starcoder2-<size> for a preset's shape, else the name of the folder the weights came from."""
    if info.size != "custom":
        return f"starcoder2-{info.size}"
    return Path(info.source.rstrip("/")).name or "starcoder2"


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


def head_context_length(runtime, requested: int | None) -> int:
    """A head model's per-request context: the model's, or less (no cache to size)."""
    model = runtime.config.max_position_embeddings
    context = model if requested is None else requested
    if not 1 <= context <= model:
        raise UserError(f"--context {context} is outside [1, {model}] (the model's context)")
    return context


class CompletionServer:
    """Owns the scheduler and a grpc.aio server on its own event-loop thread; start() binds and returns the port.

    A causal LM Runtime serves Complete and CompleteStream (Scheduler); a HeadRuntime (runtime/heads.py) serves
    Classify or Embed (HeadScheduler); the other methods answer FAILED_PRECONDITION."""

    def __init__(self, runtime, tokenizer: Tokenizer, options: ServerOptions | None = None):
        self.options = options = options or ServerOptions()
        self.runtime = runtime
        self.task = task = runtime.config.head.task
        causal = task == TEXT_GENERATION
        context = context_length(runtime, options.context_length) if causal else head_context_length(
            runtime, options.context_length)
        self.limits = Limits(context_length=context,
                             default_max_tokens=options.default_max_tokens, trim=options.trim_prompts)
        self.keys = KeyRing(options.api_keys) if options.api_keys else None
        self.tls = None
        if options.tls_cert is not None or options.tls_key is not None:
            if options.tls_cert is None or options.tls_key is None:
                raise UserError("--tls-cert and --tls-key go together")
            self.tls = server_ssl_context(options.tls_cert, options.tls_key)  # checks the PEM pair before listening
        self.metrics = Metrics()
        self.scheduler: Scheduler | HeadScheduler
        if causal:
            self.scheduler = Scheduler(runtime, tokenizer, max_queue=options.max_queue,
                                       prefill_tokens=options.prefill_tokens, metrics=self.metrics,
                                       prefix_cache_bytes=options.prefix_cache_bytes)
        else:
            self.scheduler = HeadScheduler(runtime, options.max_batch, options.max_queue, self.metrics)
        self.max_batch = self.scheduler.max_batch
        self.info = model_info(runtime, options, self.limits, self.max_batch)
        self.frontend = Frontend(self.scheduler, tokenizer, self.limits, self.metrics,
                                 max_preparing=self.max_batch + options.max_queue, task=task)
        self.frontend.model_vocab_size = runtime.config.vocab_size
        self.servicer = CompletionServicer(self.frontend, self.info, read_timeout=options.read_timeout)
        self.model_name = options.model_name or default_model_name(self.info)
        self.http_api = HttpApi(self.frontend, self.model_name, self.keys, options.max_message_bytes,
                                options.read_timeout)
        self.http: HttpServer | None = None
        self.http_port: int | None = None
        self.health = health.aio.HealthServicer()
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="sc2deploy-grpc", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None

    def _call(self, coroutine):
        """Run `coroutine` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def start(self) -> int:
        o = self.options
        self._loop_thread.start()
        try:
            self.port = self._call(self._start())
            if o.metrics_port is not None:
                self.metrics_http = self.metrics.serve(o.metrics_port, o.metrics_host or o.host, self.keys, self.tls)
                self.metrics_port = self.metrics_http.server_port
        except BaseException:
            self.stop(0)
            raise
        log.info("serving %s on %s:%d", SERVICE, o.host, self.port)
        return self.port

    def _refused(self, method: str) -> None:
        """A call refused for its API key, before it has a request id: counted and logged."""
        name = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(name, "UNAUTHENTICATED").inc()
        log.info("%s UNAUTHENTICATED", name, extra={"method": name, "code": "UNAUTHENTICATED"})

    async def _start(self) -> int:
        o = self.options
        interceptors = []
        if self.keys is not None:
            interceptors.append(ApiKeyInterceptor(self.keys, on_reject=self._refused))
        self.server = server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", o.max_message_bytes),
                     ("grpc.max_send_message_length", o.max_message_bytes),
                     ("grpc.max_concurrent_streams", o.max_streams_per_connection),
                     ("grpc.keepalive_time_ms", 60_000),  # ping idle connections: a vanished peer's calls end
                     ("grpc.keepalive_timeout_ms", 20_000),
                     ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = o.host.strip("[]")
        address = f"[{host}]:{o.port}" if ":" in host else f"{host}:{o.port}"
        try:
            if o.tls_cert is not None:
                port = server.add_secure_port(address, grpc.ssl_server_credentials([(o.tls_key, o.tls_cert)]))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise UserError(f"cannot listen on {address}: the port is taken or the host is not an address of this "
                            f"machine; choose another --port or --host")
        await server.start()
        if o.http_port is not None:
            self.http = HttpServer(self.http_api, o.http_host or o.host, o.http_port, self.tls)
            await self.http.start()
            self.http_port = self.http.port
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self, grace: float = 10.0) -> None:
        """Drain, then stop. Health says NOT_SERVING and new requests get UNAVAILABLE while the port stays open;
        in-flight requests may finish for `grace` seconds, then the rest end with finish reason CANCELLED."""
        if self.loop.is_closed():
            return
        self.http_api.draining = True
        if self.server is not None:
            self._call(self.health.enter_graceful_shutdown())
        self.scheduler.close()
        if not self.scheduler.wait_idle(grace):
            self.scheduler.cancel_all()  # streams still open get a last chunk with finish reason CANCELLED
            self.scheduler.wait_idle(1.0)
        if self.http is not None:
            self._call(self.http.stop())
        if self.server is not None:
            self._call(self.server.stop(1.0))  # the last chunks go out; then the port closes
        self.scheduler.stop()
        self.frontend.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        if self._loop_thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(5.0)
        if not self.loop.is_running():
            self.loop.close()
        else:
            log.warning("the gRPC event loop did not stop within 5 s")
