"""The continuous-batching policy on a fake runtime whose steps the test controls."""
from __future__ import annotations

import threading

import pytest
import torch

from sc2deploy.config import preset
from sc2deploy.generation import FINISH_CANCELLED
from sc2deploy.runtime.base import Runtime
from sc2deploy.sampling import SamplingParams
from sc2deploy.serving.jobs import Job
from sc2deploy.serving.scheduler import DEADLINE, Finished, QueueFull, Scheduler, Step

pytestmark = pytest.mark.timeout(60)


class GatedRuntime(Runtime):
    """Logits that always pick token 100 (never a stop token); each call waits for the test to open the gate."""

    name, dtype = "fake", "fp32"

    def __init__(self, max_batch: int):
        self.config, self.max_batch, self.capacity = preset("tiny"), max_batch, 32
        self._init_slots()
        self.calls: list[tuple[str, list[int]]] = []
        self.gate = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)

    def _logits(self, n: int) -> torch.Tensor:
        logits = torch.zeros(n, self.config.vocab_size)
        logits[:, 100] = 1.0
        return logits

    def prefill(self, slot, token_ids, all_logits=False):
        self.calls.append(("prefill", [slot]))
        self._lengths[slot] = len(token_ids)
        self.entered.release()
        assert self.gate.acquire(timeout=10)
        return self._logits(1)[0]

    def decode(self, slots, token_ids):
        self.calls.append(("decode", list(slots)))
        self.entered.release()
        assert self.gate.acquire(timeout=10)
        return self._logits(len(slots))


def step(runtime: GatedRuntime, n: int = 1) -> None:
    """Let the engine run `n` runtime calls, returning when the n-th has started."""
    for _ in range(n):
        runtime.gate.release()
        assert runtime.entered.acquire(timeout=10)


def job(tokenizer, prompt_len: int = 4, max_tokens: int = 50) -> Job:
    return Job(list(range(1000, 1000 + prompt_len)), SamplingParams(max_new_tokens=max_tokens),
               tokenizer.stop_token_ids)


@pytest.fixture
def gated(tokenizer):
    runtime = GatedRuntime(max_batch=4)
    scheduler = Scheduler(runtime, tokenizer, max_queue=2, prefill_tokens=8)
    yield runtime, scheduler
    scheduler.close()
    scheduler.cancel_all()
    for _ in range(200):
        runtime.gate.release()
    scheduler.stop()


def finish(request) -> tuple[list, Finished]:
    events = []
    while not isinstance(event := request.next_event(timeout=5), Finished):
        assert event is not None, "no event within 5 s"
        events.append(event)
    return events, event


def test_cancel_frees_the_slot_before_the_next_decode_step(gated, tokenizer):
    runtime, scheduler = gated
    a, b = scheduler.submit(job(tokenizer)), scheduler.submit(job(tokenizer))
    assert runtime.entered.acquire(timeout=10)  # prefill a started
    step(runtime, 2)  # prefill b started; then decode [0, 1] started
    assert runtime.calls == [("prefill", [0]), ("prefill", [1]), ("decode", [0, 1])]
    a.cancel()  # while decode [0, 1] is running
    step(runtime)  # the next decode leaves slot 0 out
    assert runtime.calls[-1] == ("decode", [1])
    assert finish(a)[1].reason == FINISH_CANCELLED
    assert scheduler.stats()["free_slots"] == 3
    c = scheduler.submit(job(tokenizer))
    step(runtime)
    assert runtime.calls[-1] == ("prefill", [0]), "the freed slot (the lowest) is reused"
    step(runtime)  # c's prefill returns; the next decode runs slots 0 and 1 together
    assert runtime.calls[-1] == ("decode", [0, 1])
    assert isinstance(c.next_event(timeout=5), Step) and b.next_event(timeout=5) is not None


def test_prefill_budget_keeps_running_streams_decoding(tokenizer):
    runtime = GatedRuntime(max_batch=8)
    scheduler = Scheduler(runtime, tokenizer, max_queue=8, prefill_tokens=8)
    try:
        first = scheduler.submit(job(tokenizer))
        assert runtime.entered.acquire(timeout=10)
        step(runtime)  # decode [0] started
        for _ in range(6):
            scheduler.submit(job(tokenizer, prompt_len=4))
        step(runtime, 12)
        # Between decode steps at most 8 prompt tokens (two prompts of 4) are prefilled.
        kinds = [kind for kind, _ in runtime.calls]
        runs, count = [], 0
        for kind in kinds[2:]:
            if kind == "prefill":
                count += 1
            else:
                runs.append(count)
                count = 0
        assert max(runs) <= 2 and sum(runs) >= 4, kinds
        assert first.next_event(timeout=5) is not None
    finally:
        scheduler.close()
        scheduler.cancel_all()
        for _ in range(500):
            runtime.gate.release()
        scheduler.stop()


def test_queue_bound_and_deadline(gated, tokenizer):
    runtime, scheduler = gated
    running = [scheduler.submit(job(tokenizer)) for _ in range(4)]
    assert runtime.entered.acquire(timeout=10)
    while runtime.calls[-1] != ("prefill", [3]):  # prefills 2 at a time (the 8-token budget), decodes between
        step(runtime)
    assert scheduler.stats()["free_slots"] == 0
    waiting = [scheduler.submit(job(tokenizer), deadline=0.0) for _ in range(2)]  # already expired
    with pytest.raises(QueueFull):
        scheduler.submit(job(tokenizer))
    step(runtime, 2)  # prefill 3 returns, the decode after it returns: the next iteration reaps the queue
    for request in waiting:
        events, finished = finish(request)
        assert finished.reason == DEADLINE and not events
    assert scheduler.stats()["waiting"] == 0
    assert all(r.slot is not None for r in running)


class ClockedRuntime(Runtime):
    """Logits that always pick token 100, on a clock of its own: a decode step costs 1/32 s, a prompt token 1/1024 s
    (so about 32 prompt tokens take as long as a decode step). `during_extend` runs inside each extend."""

    name, dtype = "fake", "fp32"
    supports_extend = True
    DECODE, TOKEN = 1 / 32, 1 / 1024

    def __init__(self, max_batch: int):
        self.config, self.max_batch, self.capacity = preset("tiny"), max_batch, 4096
        self._init_slots()
        self.now = 0.0
        self.calls: list[tuple[str, int, int]] = []  # (kind, slot, tokens)
        self.during_extend = lambda: None

    def clock(self) -> float:
        return self.now

    def _logits(self, n: int) -> torch.Tensor:
        logits = torch.zeros(n, self.config.vocab_size)
        logits[:, 100] = 1.0
        return logits

    def prefill(self, slot, token_ids, all_logits=False):
        self.calls.append(("prefill", slot, len(token_ids)))
        self.now += self.TOKEN * len(token_ids)
        self._lengths[slot] = len(token_ids)
        return self._logits(1)[0]

    def extend(self, slot, token_ids, all_logits=False):
        self.calls.append(("extend", slot, len(token_ids)))
        self.now += self.TOKEN * len(token_ids)
        self._lengths[slot] += len(token_ids)
        self.during_extend()
        return self._logits(1)[0]

    def decode(self, slots, token_ids):
        self.calls.append(("decode", -1, len(slots)))
        self.now += self.DECODE
        for s in slots:
            self._lengths[s] += 1
        return self._logits(len(slots))


def test_while_streams_decode_a_step_prefills_about_one_decode_step_of_prompt(tokenizer):
    runtime = ClockedRuntime(max_batch=4)
    scheduler = Scheduler(runtime, tokenizer, max_queue=4, prefill_tokens=256, clock=runtime.clock)
    try:
        streams = [scheduler.submit(job(tokenizer, prompt_len=4, max_tokens=400)) for _ in range(2)]
        long = scheduler.submit(job(tokenizer, prompt_len=1000, max_tokens=1))
        late: list = []

        def arrive() -> None:  # during the long prompt's fifth chunk, a 40-token prompt
            if sum(kind == "extend" for kind, _, _ in runtime.calls) == 5:
                late.append(scheduler.submit(job(tokenizer, prompt_len=40, max_tokens=1)))

        runtime.during_extend = arrive
        assert finish(long)[1].reason == "length" and finish(late[0])[1].reason == "length"
        assert all(stream.next_event(timeout=5) is not None for stream in streams)
    finally:
        scheduler.close()
        scheduler.cancel_all()
        scheduler.stop()
    # Nothing decodes yet: the first iteration spends the whole budget, 248 tokens of the long prompt (slot 2)
    # and the two short ones in one call.
    assert runtime.calls[:4] == [("prefill", 2, 248), ("prefill", 0, 4), ("prefill", 1, 4), ("decode", -1, 2)]
    steps: list[dict[int, int]] = [{}]  # per iteration after that: slot -> prompt tokens prefilled
    for kind, slot, n in runtime.calls[4:]:
        if kind == "decode":
            steps.append({})
        else:
            steps[-1][slot] = n
    assert sum(step.get(2, 0) for step in steps) == 1000 - 248
    # While streams decode, ~32 prompt tokens per iteration: as long as a decode step takes.
    assert all(30 <= sum(step.values()) <= 32 for step in steps[:4]), steps[:4]
    # The late prompt (slot 3) goes first, the oldest still gets 16; then the late one's rest.
    assert steps[5] == {3: 32, 2: 16}, steps[4:7]
    assert steps[6][3] == 8 and 22 <= steps[6][2] <= 24
    later = [step for step in steps[7:] if step][:-1]  # but the long prompt's remainder
    assert later and all(30 <= sum(step.values()) <= 32 for step in later), steps[7:]


def test_short_prompts_are_prefilled_whole_in_turn_not_cut_to_fill_a_step(tokenizer):
    runtime = ClockedRuntime(max_batch=4)
    scheduler = Scheduler(runtime, tokenizer, max_queue=4, prefill_tokens=256, clock=runtime.clock)
    try:
        stream = scheduler.submit(job(tokenizer, prompt_len=4, max_tokens=400))
        assert stream.next_event(timeout=5) is not None  # decoding: ~32 prompt tokens per iteration now
        with scheduler._lock:  # all three wait when the engine next admits
            shorts = [scheduler.submit(job(tokenizer, prompt_len=20, max_tokens=1)) for _ in range(3)]
        assert all(finish(short)[1].reason == "length" for short in shorts)
    finally:
        scheduler.close()
        scheduler.cancel_all()
        scheduler.stop()
    prefills = [(kind, slot, n) for kind, slot, n in runtime.calls if kind != "decode"]
    assert prefills == [("prefill", 0, 4), ("prefill", 1, 20), ("prefill", 2, 20), ("prefill", 3, 20)]
