"""Continuous batching over any Runtime: one engine thread owns the runtime and its cache slots.

Policy, one iteration of the engine loop:
  1. reap    - running sequences whose client cancelled or whose deadline passed leave now, freeing
               their slot (so a cancel takes effect within one decode step); so do such waiting requests;
  2. admit   - waiting requests take free slots (lowest slot first), first come first served. A prompt
               that starts like a stored or running sequence restores that prefix's cache (prefix_cache.py)
               and prefills only the rest;
  3. prefill - a budget of prompt tokens per iteration: `prefill_tokens`, and while sequences decode
               only as many as take about one decode step (both rates measured as it runs; at least
               MIN_CHUNK), so a running stream's next token waits about two steps, not a whole long
               prompt (Sarathi-Serve's stall-free batching). The shortest rests go first, so a short
               request is not queued behind a long prompt; the oldest prompt still gets MIN_CHUNK
               tokens each iteration. The fresh prompts that fit go in one call (right-padded, for a
               range of slots), a long prompt in chunks. A request whose prompt is complete yields its
               first token;
  4. decode  - one runtime.decode step for every running sequence together; each sequence accepts its
               logits, its new text goes to its client, and finished sequences leave at once (their cache
               goes to the prefix cache, and their slot is released).
Requests wait in a bounded queue (`max_queue`); a full queue is refused (RESOURCE_EXHAUSTED).
Each request owns its Sequence and seeded Sampler, so its tokens do not depend on what else runs.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sc2deploy.generation import FINISH_CANCELLED, FINISH_STOP, Sequence
from sc2deploy.runtime.base import Runtime
from sc2deploy.serving.jobs import Job
from sc2deploy.serving.metrics import Metrics
from sc2deploy.serving.prefix_cache import PrefixCache
from sc2deploy.tokenizer import Tokenizer, Trimmed

log = logging.getLogger("sc2deploy.serving")

DEADLINE = "deadline"  # Finished.reason when the request's deadline passed (not a Sequence finish reason)
MIN_CHUNK = 16  # prompt tokens an iteration prefills at least while sequences decode
RATE_WEIGHT = 0.3  # of the newest measurement in the running averages of decode and prefill speed


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Step:
    """Output of one engine step for one request: new text, new tokens and their logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]  # (token, logprob, top alternatives)


@dataclass
class Finished:
    reason: str  # length, eos, stop, cancelled, deadline, error
    stop_sequence: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    trimmed: Trimmed | None = None  # what was dropped from an over-long prompt


@dataclass(eq=False)
class Request:
    job: Job
    seq: Sequence
    deadline: float | None  # time.monotonic() value
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    id: int = 0
    request_id: str = ""  # the server's id of the call, for log lines
    slot: int | None = None
    cursor: int = 0  # prompt tokens in the cache (restored or prefilled)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False  # set by any thread; read by the engine each iteration
    sent_ids: int = 0
    sent_logprobs: int = 0
    on_event: Callable[[], None] | None = None  # called (on the engine thread) after each new event

    def emit(self, event: Step | Finished) -> None:
        self.events.put(event)
        if self.on_event is not None:
            self.on_event()

    def cancel(self) -> None:
        """Stop this generation (client gone); the engine frees its slot before its next decode step."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def rest(self) -> int:
        """Prompt tokens not yet in the cache."""
        return len(self.job.prompt_ids) - self.cursor

    def next_event(self, timeout: float | None = None) -> Step | Finished | None:
        """The next event; None when none came within `timeout` seconds (0: do not wait)."""
        try:
            return self.events.get(block=timeout != 0, timeout=timeout or None)
        except queue.Empty:
            return None


class _Engine:
    """The admission, shutdown and idle protocol both schedulers share. A subclass holds `_lock` (a Condition),
    its `_waiting` queue, `_ids`, `max_batch`, `max_queue`, `metrics`, `_busy` (requests waiting or running), the
    flags `_closed`, `_cancel_all`, `_stopped`, its engine `_thread`, and says how many requests it could take
    now (`_places`)."""

    _lock: threading.Condition
    _waiting: deque
    _ids: Iterator[int]
    max_batch: int
    max_queue: int
    metrics: Metrics
    _busy: int
    _closed: bool
    _cancel_all: bool
    _stopped: bool
    _thread: threading.Thread
    # Called on the engine thread once a phase of a step has emitted its events (a front end wakes its event
    # loop once for all of them, not once per event).
    after_events: Callable[[], None] | None = None

    def _events_out(self) -> None:
        if self.after_events is not None:
            self.after_events()

    def _places(self) -> int:
        """Requests the engine could take now without queueing them (called under the lock)."""
        raise NotImplementedError

    def _enqueue(self, request: Request | HeadRequest, room: str) -> None:
        """Queue `request`, unless the server is closing or `max_queue` requests already wait beyond the engine's
        places (`room` says what those are, for the refusal)."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._waiting) - self._places() >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting {room}); retry later")
            request.id = next(self._ids)
            self._waiting.append(request)
            self._busy += 1
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._lock:
            while self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
            return True

    def close(self) -> None:
        """Refuse new requests; the ones already in keep running."""
        with self._lock:
            self._closed = True

    def cancel_all(self) -> None:
        """End every request at its next step with finish reason `cancelled` (shutdown grace period over); a
        step already running finishes."""
        with self._lock:
            self._cancel_all = True
            self._lock.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        self.close()
        self.cancel_all()
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout)


class Scheduler(_Engine):
    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, max_queue: int = 64, prefill_tokens: int = 256,
                 metrics: Metrics | None = None, prefix_cache_bytes: int = 0,
                 clock: Callable[[], float] = time.perf_counter):
        """clock: what times the runtime's calls (for the prefill budget and the step metrics)."""
        self.runtime, self.tokenizer, self.clock = runtime, tokenizer, clock
        self.max_batch, self.max_queue, self.prefill_tokens = runtime.max_batch, max_queue, max(prefill_tokens, 1)
        self.metrics = metrics or Metrics()
        self.prefix_cache = PrefixCache(runtime, prefix_cache_bytes, self.metrics)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: dict[int, Request] = {}  # slot -> request whose prompt is partly in the cache
        self._running: dict[int, Request] = {}  # slot -> request; engine thread only
        self._decode_seconds = 0.0  # running averages: seconds per decode step, prompt tokens per second
        self._prefill_rate = 0.0
        self._free = list(range(self.max_batch))  # a heap: lowest free slot first
        self._ids = itertools.count(1)
        self._closed = False  # no new requests
        self._stopped = False  # engine loop ends
        self._busy = 0  # requests waiting or running, for idle()/stats()
        self._cancel_all = False
        self._thread = threading.Thread(target=self._loop, name="sc2deploy-engine", daemon=True)
        self._thread.start()

    # ---- called from RPC threads ----
    def submit(self, job: Job, deadline: float | None = None, request_id: str = "") -> Request:
        seq = Sequence(self.tokenizer, list(job.prompt_ids), job.params, job.stop_ids, logprobs=job.logprobs)
        request = Request(job, seq, deadline, request_id=request_id)
        self._enqueue(request, f"for {self.max_batch} slots")
        return request

    def _places(self) -> int:
        return len(self._free)

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": self._busy - len(self._waiting),
                    "free_slots": self._places(), "max_batch": self.max_batch}

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._running and not self._prefilling:
                    self._lock.wait()
                if self._stopped and not self._waiting and not self._running and not self._prefilling:
                    return
            try:
                self._reap()
                self._admit()
                self._prefill()
                self._events_out()  # first tokens go out before the decode step
                if self._running:
                    self._decode()
            except Exception:  # a bug or a runtime failure: fail what is running, keep serving
                log.exception("engine step failed; ending the running requests")
                for request in list(self._running.values()) + list(self._prefilling.values()):
                    self._finish(request, Finished("error", error="the engine failed on this request"))
            finally:
                self._events_out()

    def _reap(self) -> None:
        now = time.monotonic()
        if self._cancel_all:
            with self._lock:
                for request in list(self._waiting) + list(self._running.values()) + list(self._prefilling.values()):
                    request.cancel()
        for request in list(self._running.values()) + list(self._prefilling.values()):
            if request.cancelled or request.expired(now):
                self._end_early(request, now)
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled or r.expired(now)]
            for request in gone:
                self._waiting.remove(request)
            if gone:
                self.metrics.queue_depth.set(len(self._waiting))
        for request in gone:
            self._end_early(request, now)

    def _end_early(self, request: Request, now: float) -> None:
        request.seq.cancel()
        reason = DEADLINE if request.expired(now) else FINISH_CANCELLED
        self._finish(request, Finished(reason))

    def _admit(self) -> None:
        """Waiting requests take the free slots, restoring the longest reusable prefix of their prompt."""
        while True:
            with self._lock:
                if not self._free or not self._waiting:
                    break
                request = self._waiting.popleft()
                request.slot = slot = heapq.heappop(self._free)
                self.metrics.queue_depth.set(len(self._waiting))
            self._prefilling[slot] = request
            match = self.prefix_cache.lookup(request.job.prompt_ids, self._live())
            if match is not None:
                state = match.state
                if state is None:  # a running sequence's: copied out of its slot
                    assert match.slot is not None
                    state = self.runtime.snapshot(match.slot, match.length)
                self.runtime.restore(slot, state, match.length)
                request.cursor = match.length

    def _live(self):
        """(tokens in the cache, slot) of the sequences holding a slot, as prefix sources."""
        for slot, request in self._running.items():
            yield (request.seq.prompt_ids + request.seq.output_ids)[:self.runtime.length(slot)], slot
        for slot, request in self._prefilling.items():
            if request.cursor:
                yield request.job.prompt_ids[:request.cursor], slot

    def _prefill_budget(self) -> int:
        """Prompt tokens for this iteration (see the module's policy, step 3)."""
        if not self._running or not self._decode_seconds or not self._prefill_rate:
            return self.prefill_tokens
        return min(self.prefill_tokens, max(MIN_CHUNK, int(self._decode_seconds * self._prefill_rate)))

    def _prefill(self) -> None:
        """This iteration's budget of prompt tokens: the shortest rests first, MIN_CHUNK at least for the oldest,
        at least one chunk; the fresh prompts that fit in one call, and those that would fit a whole budget are
        not cut."""
        budget, floor = self._prefill_budget(), min(MIN_CHUNK, self.prefill_tokens)
        oldest = next(iter(self._prefilling), None)  # dicts keep admission order
        spent = 0
        whole: list[tuple[int, Request]] = []
        for slot, request in sorted(self._prefilling.items(), key=lambda item: item[1].rest):
            room = max(budget - spent, floor) if slot == oldest else budget - spent
            if room <= 0:
                continue
            left = request.rest
            if request.cursor == 0 and left <= room:
                whole.append((slot, request))
                spent += left
                continue
            if request.cursor == 0 and left <= budget and slot != oldest:
                continue  # whole in a later iteration rather than cut into pieces
            if self.runtime.supports_extend:
                size = min(left, room)
            elif spent:
                continue  # this runtime prefills whole prompts only; one at least per iteration
            else:
                size = left
            spent += size
            self._prefill_chunk(slot, request, size)
        if whole:
            self._prefill_whole(sorted(whole))  # in slot order: one call for a range of slots

    def _prefill_chunk(self, slot: int, request: Request, size: int) -> None:
        chunk = request.job.prompt_ids[request.cursor:request.cursor + size]
        self.metrics.prompt_tokens.inc(size)
        start = self.clock()
        try:
            if request.cursor:
                logits = self.runtime.extend(slot, chunk)
            else:
                logits = self.runtime.prefill(slot, chunk)
        except Exception:
            log.exception("prefill failed for request %d", request.id, extra={"request_id": request.request_id})
            self._finish(request, Finished("error", error="prefill failed on this request"))
            return
        self._measure_prefill(size, self.clock() - start)
        request.cursor += size
        if not request.rest:
            self._start(slot, request, logits)

    def _prefill_whole(self, whole: list[tuple[int, Request]]) -> None:
        prompts = [request.job.prompt_ids for _, request in whole]
        tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens.inc(tokens)
        start = self.clock()
        try:
            logits = self.runtime.prefill_many([slot for slot, _ in whole], prompts)
        except Exception:
            log.exception("prefill failed for requests %s", [r.id for _, r in whole])
            for _, request in whole:
                self._finish(request, Finished("error", error="prefill failed on this request"))
            return
        self._measure_prefill(tokens, self.clock() - start)
        for (slot, request), row in zip(whole, logits):
            request.cursor = len(request.job.prompt_ids)
            self._start(slot, request, row)

    def _measure_prefill(self, tokens: int, seconds: float) -> None:
        self._prefill_rate = _average(self._prefill_rate, tokens / max(seconds, 1e-6))

    def _start(self, slot: int, request: Request, logits) -> None:
        """The prompt is in the cache: the request runs, and its first token goes out."""
        self._running[slot] = self._prefilling.pop(slot)
        self._deliver(request, request.seq.accept(logits))

    def _decode(self) -> None:
        slots = sorted(self._running)
        tokens = [self._running[s].seq.last_token for s in slots]
        start = self.clock()
        logits = self.runtime.decode(slots, tokens)
        seconds = self.clock() - start
        self.metrics.observe_step(len(slots), seconds)
        self._decode_seconds = _average(self._decode_seconds, seconds)
        greedy = [row for row, slot in enumerate(slots) if self._running[slot].seq.params.greedy]
        rows = logits if len(greedy) == len(slots) else logits[greedy]  # (indexing copies the rows)
        chosen = dict(zip(greedy, rows.argmax(dim=-1).tolist()))  # one argmax for all greedy rows
        for row, slot in enumerate(slots):
            request = self._running[slot]
            self._deliver(request, request.seq.accept(logits[row], chosen.get(row)))

    def _deliver(self, request: Request, text: str) -> None:
        seq, now = request.seq, time.monotonic()
        ids = seq.output_ids[request.sent_ids:]
        shown = min(len(seq.token_logprobs), len(seq.output_ids))  # logprobs of output tokens only
        logprobs = [(seq.output_ids[i], *seq.token_logprobs[i]) for i in range(request.sent_logprobs, shown)]
        request.sent_ids, request.sent_logprobs = len(seq.output_ids), shown
        if request.last_token_at is None:
            request.first_token_at = now
            self.metrics.time_to_first_token.observe(now - request.submitted)
        else:
            self.metrics.inter_token_latency.observe(now - request.last_token_at)
        request.last_token_at = now
        self.metrics.tokens.inc(len(ids))
        if text or ids:
            request.emit(Step(text, ids, logprobs))
        if seq.done:
            self._finish(request, Finished(seq.finish_reason or "length", self._stop_sequence(seq)))

    def _keep_prefix(self, request: Request, slot: int, finished: Finished) -> None:
        """The finished sequence's cache goes to the prefix cache (not after a failure: it may be partial)."""
        held = self.runtime.length(slot)
        length = held if request.cursor == len(request.job.prompt_ids) else request.cursor
        if not self.prefix_cache.enabled or finished.reason == "error" or not length:
            return
        if not self.runtime.reusable(held, length):
            return
        tokens = (request.seq.prompt_ids + request.seq.output_ids)[:length]
        self.prefix_cache.store(tokens, self.runtime.snapshot(slot, length))

    def _stop_sequence(self, seq: Sequence) -> str:
        if seq.finish_reason != FINISH_STOP:
            return ""
        full = self.tokenizer.decode(seq.output_ids)
        found = [s for s in seq.params.stop if full.startswith(s, len(seq.text))]
        return max(found, key=len, default="")

    def _finish(self, request: Request, finished: Finished) -> None:
        finished.prompt_tokens = len(request.job.prompt_ids)
        finished.completion_tokens = len(request.seq.output_ids)
        finished.trimmed = request.job.trimmed
        slot = request.slot
        if slot is not None:
            if self._running.get(slot) is request:
                del self._running[slot]
            else:
                del self._prefilling[slot]
            self._keep_prefix(request, slot, finished)
            self.runtime.release(slot)
            with self._lock:
                heapq.heappush(self._free, slot)
            request.slot = None
            self.metrics.running.set(len(self._running))
        request.emit(finished)
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()


def _average(average: float, value: float) -> float:
    return value if not average else (1 - RATE_WEIGHT) * average + RATE_WEIGHT * value


@dataclass(eq=False)
class HeadRequest:
    """A prefill-only request (Classify, Embed): a prompt in, the head's output for it out (`result`, a float32
    array: pooled logits, or one row per token), or `reason` cancelled, deadline or error."""

    prompt_ids: list[int]
    deadline: float | None
    request_id: str = ""
    id: int = 0
    submitted: float = field(default_factory=time.monotonic)
    result: object = None
    reason: str = ""  # "" until done; "ok", "cancelled", DEADLINE or "error"
    error: str = ""
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    on_event: Callable[[], None] | None = None  # called (on the engine thread) once it is done

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, reason: str, result: object = None, error: str = "") -> None:
        self.result, self.reason, self.error = result, reason, error
        self.done.set()
        if self.on_event is not None:
            self.on_event()


class HeadScheduler(_Engine):
    """The Scheduler's sibling for the prefill-only heads (runtime/heads.py): the same bounded queue, refusals
    (QueueFull, ShuttingDown), close/cancel_all/wait_idle/stop and metrics, without cache slots. Each engine step
    takes up to `max_batch` waiting requests, first come first served, and runs them in one padded
    `runtime.run` call (right padding with pad_token_id, as transformers pads); each gets its own rows back. A
    sequence classifier without a pad_token_id cannot pool a padded batch (transformers' rule): it runs one
    request per step."""

    def __init__(self, runtime, max_batch: int = 8, max_queue: int = 64, metrics: Metrics | None = None):
        from sc2deploy.tasks import SEQUENCE_TASK

        head = runtime.head
        self.runtime = runtime
        self.max_batch = 1 if head.task == SEQUENCE_TASK and head.pad_token_id is None else max(max_batch, 1)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._waiting: deque[HeadRequest] = deque()
        self._running = 0  # requests in the current step
        self._ids = itertools.count(1)
        self._closed = self._stopped = self._cancel_all = False
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name="sc2deploy-heads", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], deadline: float | None = None, request_id: str = "") -> HeadRequest:
        request = HeadRequest(list(prompt_ids), deadline, request_id=request_id)
        self._enqueue(request, f"beyond a batch of {self.max_batch}")
        return request

    def _places(self) -> int:
        return self.max_batch - self._running

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": self._running,
                    "free_slots": self._places(), "max_batch": self.max_batch}

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting:
                    self._lock.wait()
                if self._stopped and not self._waiting:
                    return
                now = time.monotonic()
                batch: list[HeadRequest] = []
                gone: list[HeadRequest] = []
                while self._waiting and len(batch) < self.max_batch:
                    request = self._waiting.popleft()
                    (gone if self._cancel_all or request.cancelled or request.expired(now) else batch).append(request)
                self._running = len(batch)
                self.metrics.queue_depth.set(len(self._waiting))
            try:
                for request in gone:
                    self._done(request, DEADLINE if request.expired(now) else FINISH_CANCELLED)
                if batch:
                    self._step(batch)
            finally:
                self._events_out()

    def _step(self, batch: list[HeadRequest]) -> None:
        prompts = [request.prompt_ids for request in batch]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        start = time.perf_counter()
        try:
            outputs = self.runtime.run(prompts)
        except Exception:  # a bug or a runtime failure: fail this step's requests, keep serving
            log.exception("head step failed for requests %s", [r.id for r in batch])
            outputs = None
        self.metrics.observe_step(len(batch), time.perf_counter() - start)
        with self._lock:
            self._running = 0
        for i, request in enumerate(batch):
            if outputs is None:
                self._done(request, "error", error="the engine failed on this request")
            else:
                self._done(request, "ok", outputs[i])

    def _done(self, request: HeadRequest, reason: str, result: object = None, error: str = "") -> None:
        request.finish(reason, result, error)
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()
