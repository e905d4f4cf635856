"""What every front end (gRPC, HTTP) does with a completion request: build its Job off the event loop, submit it
to the one Scheduler, follow its events, and count and log the call once under the status it ends with.

Refusals carry a gRPC status code: the one vocabulary both front ends share (http_api maps it to HTTP statuses).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from sc2deploy.errors import UserError
from sc2deploy.serving.jobs import Job, Limits, build_job
from sc2deploy.serving.metrics import Metrics
from sc2deploy.serving.scheduler import Finished, QueueFull, Request, Scheduler, ShuttingDown, Step
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tokenizer import Tokenizer

log = logging.getLogger("sc2deploy.serving")


class Refused(Exception):
    """A request the server will not run; `code` says why in gRPC's terms."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Call:
    """One call, for its access-log line: method, request id, start, and the tokens it got to."""

    method: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Frontend:
    """The request path shared by the front ends; every method runs on the server's event loop."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, limits: Limits, metrics: Metrics,
                 max_preparing: int):
        self.scheduler, self.tokenizer, self.limits, self.metrics = scheduler, tokenizer, limits, metrics
        self.max_preparing = max_preparing
        self.preparing = 0  # requests being tokenized; touched on the event loop only
        self.tokenize_pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sc2deploy-tokenize")

    async def prepare(self, request: pb.CompleteRequest, prompt_tokens: list[int] | None = None,
                      fim: bool | None = None, parse_special: bool = False) -> Job:
        """The request's Job (see build_job), built on the tokenize pool; a bounded number at a time."""
        if self.preparing >= self.max_preparing:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.preparing} requests are being prepared; retry later")
        self.preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.tokenize_pool, build_job, request, self.tokenizer, self.limits, prompt_tokens, fim, parse_special)
        except UserError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        finally:
            self.preparing -= 1

    def submit(self, job: Job, call: Call, deadline: float | None = None) -> Request:
        call.prompt_tokens = len(job.prompt_ids)
        try:
            return self.scheduler.submit(job, deadline, request_id=call.request_id)
        except QueueFull as e:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except ShuttingDown as e:
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from None

    def count(self, call: Call, code: str, detail: str = "") -> None:
        """Count the call under its final status and write its access-log line."""
        self.metrics.requests.labels(call.method, code).inc()
        ms = (time.monotonic() - call.started) * 1000
        log.info("%s %s in %.1f ms: prompt %d tokens, completion %d tokens%s", call.method, code, ms,
                 call.prompt_tokens, call.completion_tokens, f" ({detail})" if detail else "",
                 extra={"request_id": call.request_id, "method": call.method, "code": code,
                        "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                        "duration_ms": round(ms, 3), **({"detail": detail} if detail else {})})

    def close(self) -> None:
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)


async def events(handle: Request) -> AsyncIterator[Step | Finished]:
    """The request's events as the engine thread emits them, waking this coroutine through the event loop."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    handle.on_event = wake
    while True:
        ready.clear()
        event = handle.next_event(0)
        if event is None:
            await ready.wait()
            continue
        yield event
        if isinstance(event, Finished):
            return
