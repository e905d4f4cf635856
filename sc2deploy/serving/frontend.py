"""What every front end (gRPC, HTTP) does with a completion request: build its Job off the event loop, submit it
to the one Scheduler, follow its events, and count and log the call once under the status it ends with.

Refusals carry a gRPC status code: the one vocabulary both front ends share (http_api maps it to HTTP statuses).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from sc2deploy.errors import UserError
from sc2deploy.serving.jobs import Job, Limits, build_job
from sc2deploy.serving.metrics import Metrics
from sc2deploy.serving.scheduler import (Finished, HeadRequest, HeadScheduler, QueueFull, Request, Scheduler,
                                         ShuttingDown, Step)
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tasks import CLASSIFIERS, FEATURE_EXTRACTION, TASKS, TEXT_GENERATION
from sc2deploy.tokenizer import Tokenizer, validate_text

COMPLETION_METHODS = ("Complete", "CompleteStream")
CLASSIFIER_TASKS = tuple(TASKS[a] for a in CLASSIFIERS)
# The RPCs of each task (GetModelInfo besides), for ModelInfo.methods and the FAILED_PRECONDITION messages.
METHODS_OF_TASK = {TEXT_GENERATION: COMPLETION_METHODS, FEATURE_EXTRACTION: ("Embed",),
                   **{task: ("Classify",) for task in CLASSIFIER_TASKS}}

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

    def __init__(self, scheduler: Scheduler | HeadScheduler, tokenizer: Tokenizer, limits: Limits, metrics: Metrics,
                 max_preparing: int, task: str = TEXT_GENERATION):
        self.scheduler, self.tokenizer, self.limits, self.metrics = scheduler, tokenizer, limits, metrics
        scheduler.after_events = wake_loops  # events() and done() wait on the loop for what the engine emits
        self.task = task  # what the served model does (sc2deploy/tasks.py); it decides which methods run
        self.model_vocab_size = tokenizer.vocab_size  # the model's, when smaller (set by the server)
        self.max_preparing = max_preparing
        self.preparing = 0  # requests being tokenized; touched on the event loop only
        self.tokenize_pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sc2deploy-tokenize")

    async def prepare(self, request: pb.CompleteRequest, prompt_tokens: list[int] | None = None,
                      fim: bool | None = None, parse_special: bool = False) -> Job:
        """The request's Job (see build_job), built on the tokenize pool; a bounded number at a time."""
        self.require("Complete")
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
        assert isinstance(self.scheduler, Scheduler), "prepare refuses completions on a head model"
        with _refused_when_full():
            return self.scheduler.submit(job, deadline, request_id=call.request_id)

    def require(self, method: str) -> None:
        """FAILED_PRECONDITION unless the served model's task serves `method`."""
        served = METHODS_OF_TASK[self.task]
        if method in served:
            return
        if method in COMPLETION_METHODS:
            needs = "completion needs a causal LM artifact"
        elif method == "Classify":
            needs = "Classify needs a sequence-classification or token-classification artifact"
        else:
            needs = "Embed needs a feature-extraction (Starcoder2Model) artifact"
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"this model is a {self.task} model: it serves {' and '.join(served)}; {needs}")

    async def prompt_ids(self, method: str, prompt: str, token_ids) -> list[int]:
        """A Classify or Embed request's prompt tokens (text tokenized on the tokenize pool), within the context
        and the vocabulary; INVALID_ARGUMENT otherwise."""
        self.require(method)
        if prompt and token_ids:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "give one of prompt or token_ids, not both")
        if prompt:
            context = self.limits.context_length
            if len(prompt) > context * self.tokenizer.max_token_bytes:  # cannot fit whatever it tokenizes to
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the prompt has {len(prompt)} characters, more "
                              f"than fit the model's context of {context} tokens; shorten it")
            if self.preparing >= self.max_preparing:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.preparing} requests are being prepared; retry later")
            self.preparing += 1
            try:
                ids = await asyncio.get_running_loop().run_in_executor(
                    self.tokenize_pool, lambda: self.tokenizer.encode(validate_text(prompt, "prompt")))
            except UserError as e:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            finally:
                self.preparing -= 1
        else:
            ids = list(token_ids)
        if not ids:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty; give prompt text or token_ids")
        if len(ids) > self.limits.context_length:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the prompt has {len(ids)} tokens, more than the "
                          f"model's context of {self.limits.context_length}; shorten it")
        vocab = min(self.tokenizer.vocab_size, self.model_vocab_size)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    def submit_prompt(self, ids: list[int], call: Call, deadline: float | None = None) -> HeadRequest:
        call.prompt_tokens = len(ids)
        assert isinstance(self.scheduler, HeadScheduler)
        with _refused_when_full():
            return self.scheduler.submit(ids, deadline, request_id=call.request_id)

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


@contextmanager
def _refused_when_full() -> Iterator[None]:
    """A scheduler's refusals as the front ends' statuses: a full queue, a server shutting down."""
    try:
        yield
    except QueueFull as e:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    except ShuttingDown as e:
        raise Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from None


async def events(handle: Request) -> AsyncIterator[Step | Finished]:
    """The request's events as the engine thread emits them, waking this coroutine through the event loop."""
    ready = _wake_on_event(handle)
    while True:
        ready.clear()
        event = handle.next_event(0)
        if event is None:
            await ready.wait()
            continue
        yield event
        if isinstance(event, Finished):
            return


async def done(handle: HeadRequest) -> HeadRequest:
    """The prefill-only request once the engine thread has finished it, waking this coroutine through the loop."""
    ready = _wake_on_event(handle)
    if not handle.done.is_set():
        await ready.wait()
    return handle


def _wake_on_event(handle: Request | HeadRequest) -> asyncio.Event:
    """An event of the running loop that is set after each event of `handle`, once the engine thread has called
    wake_loops() (the schedulers' after_events)."""
    loop = asyncio.get_running_loop()
    with _WAKERS_LOCK:
        waker = _WAKERS.get(loop)
        if waker is None:
            waker = _WAKERS[loop] = _LoopWaker(loop)
    ready = asyncio.Event()
    handle.on_event = lambda: waker.note(ready)
    return ready


def wake_loops() -> None:
    """Wake each event loop once for the events noted since the last call; called on the engine thread."""
    with _WAKERS_LOCK:
        wakers = list(_WAKERS.values())
    for waker in wakers:
        waker.flush()


class _LoopWaker:
    """Sets events of one loop from the engine thread, one wake-up of the loop for all the requests a step
    served: a decode step of 16 streams wrote 16 times to the loop's self-pipe, 2.5 % of the engine thread's
    time, and waking at the first event of a step does not coalesce (the loop drains it at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # not kept alive by its entry in _WAKERS
        self.lock = threading.Lock()
        self.pending: list[asyncio.Event] = []
        self.scheduled = False

    def note(self, ready: asyncio.Event) -> None:
        with self.lock:
            self.pending.append(ready)

    def flush(self) -> None:
        with self.lock:
            if not self.pending or self.scheduled:
                return
            self.scheduled = True
        loop = self.loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self._set_pending)
        except RuntimeError:  # the loop is closed: the server is gone
            with self.lock:
                self.pending.clear()
                self.scheduled = False

    def _set_pending(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for ready in pending:
            ready.set()


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()
_WAKERS_LOCK = threading.Lock()
