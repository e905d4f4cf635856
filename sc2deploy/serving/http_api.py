"""The HTTP front end beside gRPC: OpenAI's /v1/completions and /v1/models, llama.cpp's /infill, /health and
/metrics, on the gRPC server's event loop, feeding the same scheduler through the same Frontend.

Starlette routes the requests and uvicorn (its h11 protocol) speaks HTTP/1.1; both are small, typed, widely used
and asyncio-native, so they share the grpc.aio event loop with no thread hand-off. Every request is counted under
its method and HTTP status in the gRPC side's registry and gets one access-log line. The same limits hold: the
request body is bounded by --max-message-mb (413 beyond it, checked from Content-Length before reading) and must
arrive within --read-timeout (408), the API key is checked before the body is read (401), a full queue is 429 and a
draining server 503. A client that closes its connection frees its slot before the next decode step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sc2deploy.errors import UserError
from sc2deploy.serving import infill, openai_api
from sc2deploy.serving.auth import KeyRing, key_from_metadata
from sc2deploy.serving.frontend import Call, Frontend, Refused, events
from sc2deploy.serving.json_body import HttpError, parse_object
from sc2deploy.serving.logs import REQUEST_ID_KEY, request_id
from sc2deploy.serving.scheduler import Finished, Request as Handle, Step

log = logging.getLogger("sc2deploy.serving")

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
               grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.INTERNAL: 500,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
              429: "rate_limit_error", 500: "server_error", 503: "unavailable_error", 504: "timeout_error"}
CLIENT_CLOSED = "499"  # the access-log code of a request whose client went away (nginx's)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               dialect: str = "openai") -> dict:
    """OpenAI's error object, or llama.cpp's (its code is the HTTP status)."""
    kind = ERROR_TYPE.get(status, "invalid_request_error")
    if dialect == "llama.cpp":
        return {"error": {"code": status, "message": message, "type": kind}}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _json(data) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _sse(data) -> str:
    return f"data: {_json(data)}\n\n"


class HttpApi:
    """The Starlette application over a Frontend."""

    def __init__(self, frontend: Frontend, model_name: str, keys: KeyRing | None, max_body_bytes: int,
                 read_timeout: float):
        self.frontend, self.model_name, self.keys = frontend, model_name, keys
        self.max_body_bytes, self.read_timeout = max_body_bytes, read_timeout
        self.created = int(time.time())
        self.draining = False
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/infill", self.infill, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})

    # ---- GET ----
    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return await self._get(request, "GET /v1/models",
                               lambda: JSONResponse(openai_api.models(self.model_name, self.created)))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]

        def answer() -> Response:
            if name != self.model_name:
                raise HttpError(404, f"The model `{name}` does not exist: this server serves `{self.model_name}`",
                                param="model", code="model_not_found")
            return JSONResponse(openai_api.model_object(self.model_name, self.created))
        return await self._get(request, "GET /v1/models/{model}", answer)

    async def metrics(self, request: Request) -> Response:
        return await self._get(request, "GET /metrics", lambda: Response(
            generate_latest(self.frontend.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}))

    async def _get(self, request: Request, method: str, answer: Callable[[], Response]) -> Response:
        call = Call(method, request_id(_headers(request)))
        try:
            self._authorize(request)
            response = answer()
        except HttpError as e:
            return self._refuse(call, e)
        self.frontend.count(call, str(response.status_code))
        response.headers[REQUEST_ID_KEY] = call.request_id
        return response

    # ---- POST ----
    async def completions(self, request: Request) -> Response:
        vocab = self.frontend.tokenizer.vocab_size

        async def start(data: dict, call: Call):
            spec = openai_api.parse_completion(data, self.model_name, vocab)
            job = await self.frontend.prepare(spec.request, spec.prompt_tokens, fim=spec.fim, parse_special=True)
            output = openai_api.CompletionOutput(spec, self.model_name, call.request_id, self.frontend.tokenizer,
                                                 job.prompt_ids)
            return spec.stream, job, output

        return await self._post(request, "POST /v1/completions", "openai", start)

    async def infill(self, request: Request) -> Response:
        async def start(data: dict, call: Call):
            spec = infill.parse_infill(data)
            job = await self.frontend.prepare(spec.request, fim=True)
            return spec.stream, job, infill.InfillOutput(spec, self.model_name, len(job.prompt_ids))

        return await self._post(request, "POST /infill", "llama.cpp", start)

    async def _post(self, request: Request, method: str, dialect: str,
                    start: Callable[[dict, Call], Awaitable[tuple]]) -> Response:
        """Authorize, read and parse the body, build and submit the job; then stream or answer at once."""
        call = Call(method, request_id(_headers(request)))
        try:
            self._authorize(request)
            if self.draining:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            data = parse_object(await self._body(request))
            stream, job, output = await start(data, call)
            handle = self.frontend.submit(job, call)
        except (HttpError, Refused) as e:
            return self._refuse(call, e, dialect)
        except ClientDisconnect:
            self.frontend.count(call, CLIENT_CLOSED, "the client closed the connection")
            return Response(status_code=400)  # nobody reads it
        headers = {REQUEST_ID_KEY: call.request_id}
        if stream:
            return StreamingResponse(self._stream(call, handle, output, dialect), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        return await self._answer(request, call, handle, output, dialect, headers)

    async def _answer(self, request: Request, call: Call, handle: Handle, output, dialect: str,
                      headers: dict) -> Response:
        """The whole completion as one JSON object; the request is cancelled if the client goes away first."""
        steps: list[Step] = []
        collect = asyncio.ensure_future(_collect(handle, steps, call))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()  # a no-op once finished
            gone.cancel()
        if not collect.done():
            collect.cancel()
            self.frontend.count(call, CLIENT_CLOSED, "the client closed the connection")
            return Response(status_code=499)  # nobody reads it
        finished = collect.result()
        failure = _failure(finished)
        if failure is not None:
            return self._refuse(call, failure, dialect)
        self.frontend.count(call, "200")
        if dialect == "openai":
            body = output.response(steps, finished)
        else:
            body = output.response(steps, finished, _timings(call, finished, handle))
        return JSONResponse(body, headers=headers)

    async def _stream(self, call: Call, handle: Handle, output, dialect: str) -> AsyncIterator[str]:
        """Server-sent events: a chunk per step, the last chunk(s), and OpenAI's `data: [DONE]`. A failure after
        the headers went out is an error event, as OpenAI sends it. Counted once, when the stream ends."""
        ids: list[int] = []
        code, detail = CLIENT_CLOSED, "the client closed the connection"
        try:
            async for event in events(handle):
                if isinstance(event, Step):
                    call.completion_tokens += len(event.token_ids)
                    ids += event.token_ids
                    chunk = output.chunk(event)
                    if chunk is not None:
                        yield _sse(chunk)
                    continue
                call.prompt_tokens, call.completion_tokens = event.prompt_tokens, event.completion_tokens
                failure = _failure(event)
                if failure is not None:
                    status = HTTP_STATUS[failure.code]
                    code, detail = str(status), failure.message[:200]
                    _log_error(call, status, failure.message)
                    yield _sse(error_body(status, failure.message, dialect=dialect))
                elif dialect == "openai":
                    for chunk in output.last_chunks(event):
                        yield _sse(chunk)
                else:
                    yield _sse(output.final("", ids, event, _timings(call, event, handle)))
            if dialect == "openai":
                yield "data: [DONE]\n\n"
            if code == CLIENT_CLOSED:
                code, detail = "200", ""
        finally:
            handle.cancel()
            self.frontend.count(call, code, detail)

    # ---- shared ----
    async def _body(self, request: Request) -> bytes:
        """The body, at most max_body_bytes, arriving within read_timeout seconds."""
        length = request.headers.get("content-length")
        too_big = HttpError(413, f"the request body is over {self.max_body_bytes} bytes (--max-message-mb); send a "
                                 f"smaller prompt")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise too_big
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.read_timeout)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {self.read_timeout:g} s") from None
        return b"".join(chunks)

    def _authorize(self, request: Request) -> None:
        if self.keys is None:
            return
        given = key_from_metadata(_headers(request))
        if not self.keys.allows(given):
            raise HttpError(401, self.keys.refusal(given), code="invalid_api_key")

    def _refuse(self, call: Call, error: HttpError | Refused, dialect: str = "openai") -> Response:
        if isinstance(error, Refused):
            error = HttpError(HTTP_STATUS[error.code], error.message)
        _log_error(call, error.status, error.message)
        self.frontend.count(call, str(error.status), error.message[:200])
        headers = {REQUEST_ID_KEY: call.request_id}
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="sc2deploy"'
        return JSONResponse(error_body(error.status, error.message, error.param, error.code, dialect), error.status,
                            headers=headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such path, wrong method) as JSON errors."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/completions, POST /infill",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(status, "request failed")
        return JSONResponse(error_body(status, message), status, headers=getattr(exc, "headers", None))


def _log_error(call: Call, status: int, message: str) -> None:
    if status >= 500 and status != 503:
        log.error("%s failed: %s", call.method, message, extra={"request_id": call.request_id})


def _failure(finished: Finished) -> Refused | None:
    """The status a request that ended without completing gets."""
    if finished.reason == "cancelled":
        return Refused(grpc.StatusCode.UNAVAILABLE, "the server shut down before the completion finished; retry")
    if finished.reason == "error":
        return Refused(grpc.StatusCode.INTERNAL, finished.error)
    return None


def _timings(call: Call, finished: Finished, handle: Handle) -> dict:
    first = (handle.first_token_at or time.monotonic()) - call.started
    return infill.timings(finished.prompt_tokens, finished.completion_tokens, first, time.monotonic() - call.started)


async def _collect(handle: Handle, steps: list[Step], call: Call) -> Finished:
    async for event in events(handle):
        if isinstance(event, Finished):
            call.prompt_tokens, call.completion_tokens = event.prompt_tokens, event.completion_tokens
            return event
        steps.append(event)
    raise AssertionError("events() ends with a Finished")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _headers(request: Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw]


class HttpServer:
    """uvicorn serving an HttpApi on a socket this class binds, as a task on the caller's event loop."""

    def __init__(self, api: HttpApi, host: str, port: int, tls: ssl.SSLContext | None):
        import uvicorn

        logging.getLogger("uvicorn").setLevel(logging.WARNING)  # its start/stop lines; the access log is ours
        self.api = api
        self.socket = _bind(host, port)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(api.app, lifespan="off", log_config=None, access_log=False, http="h11",
                                timeout_graceful_shutdown=2, server_header=False)
        config.load()
        config.ssl = tls  # the context the gRPC side checked; uvicorn would otherwise build one from file paths
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise UserError(f"the HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the listener and idle connections; responses in flight have 2 s to finish."""
        self.server.should_exit = True
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping: nothing left to tell the client
                log.warning("the HTTP server did not stop cleanly within 5 s")
        self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on such sockets' connections; without it a
        # stream's small first write on a kept-alive connection waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, OverflowError, UnicodeError) as e:
        if sock is not None:
            sock.close()
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot serve HTTP on {host}:{port} ({reason}); choose a free --http-port and an "
                        f"--http-host of this machine") from None
    sock.setblocking(False)
    return sock
