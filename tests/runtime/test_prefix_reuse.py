"""Chunked prefill (extend) and prefix reuse (snapshot, restore) against a cold prefill, for the eager and the
ONNX Runtime runtimes, across the sliding window (the store's tiny checkpoint has a window of 8 tokens)."""
from __future__ import annotations

import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.runtime.onnxruntime import OrtRuntime

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=["eager", "ort"])
def make(request, store):
    folder, _ = store.checkpoint()
    if request.param == "eager":
        source = CheckpointSource(folder)
        return lambda: EagerRuntime(source, max_batch=3, capacity=8)
    artifact = store.artifact()
    return lambda: OrtRuntime(artifact, max_batch=3)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_tail(runtime, slot: int, logits, n: int) -> list[int]:
    tokens = [int(logits.argmax())]
    for _ in range(n - 1):
        tokens.append(int(runtime.decode([slot], [tokens[-1]])[0].argmax()))
    return tokens


@pytest.mark.parametrize("chunks", [[1, 29], [7, 8, 9, 6], [16, 14], [29, 1]])
def test_chunked_prefill_equals_one_prefill(make, chunks):
    runtime, prompt = make(), ids(sum(chunks), 1)  # 30 tokens: nearly four windows
    cold = runtime.prefill(0, prompt, all_logits=True)
    got = [runtime.prefill(1, prompt[:chunks[0]], all_logits=True)]
    start = chunks[0]
    for size in chunks[1:]:
        got.append(runtime.extend(1, prompt[start:start + size], all_logits=True))
        start += size
    assert (torch.cat(got) - cold).abs().max() < TOLERANCE
    assert runtime.length(1) == len(prompt)
    assert greedy_tail(runtime, 1, got[-1][-1], 12) == greedy_tail(runtime, 0, cold[-1], 12)


def test_a_restored_prefix_continues_as_a_cold_prompt(make):
    runtime = make()
    shared = ids(6, 2)  # within the cache: nothing evicted yet
    first, second = shared + ids(2, 3), shared + ids(20, 4)  # the second runs far past the window
    runtime.prefill(0, first)
    state = runtime.snapshot(0)
    assert state.length == 8 and state.nbytes > 0
    runtime.restore(1, state, len(shared))
    warm = runtime.extend(1, second[len(shared):], all_logits=True)
    cold = runtime.prefill(2, second, all_logits=True)
    assert (warm - cold[len(shared):]).abs().max() < TOLERANCE
    assert greedy_tail(runtime, 1, warm[-1], 10) == greedy_tail(runtime, 2, cold[-1], 10)


def test_a_whole_sequence_past_the_window_restores(make):
    runtime = make()
    prompt = ids(25, 5)
    logits = runtime.prefill(0, prompt)
    state = runtime.snapshot(0)  # 25 tokens: more than the cache holds, so only all of them come back
    with pytest.raises(ValueError):
        runtime.restore(1, state, 20)
    runtime.restore(1, state, 25)
    token = int(logits.argmax())
    assert (runtime.decode([1], [token]) - runtime.decode([0], [token])).abs().max() < TOLERANCE


def test_extend_checks_its_slot(make):
    runtime = make()
    with pytest.raises(ValueError, match="prefill it first"):
        runtime.extend(0, [1, 2])


@pytest.mark.parametrize("lengths", [(5, 12, 3), (10, 12, 11)])  # ragged past the window; close together
def test_prefill_many_equals_one_by_one(make, lengths):
    runtime, alone = make(), make()
    prompts = [ids(n, 10 + n) for n in lengths]
    together = runtime.prefill_many([0, 1, 2], prompts)
    for slot, (prompt, logits) in enumerate(zip(prompts, together)):
        assert (logits - alone.prefill(slot, prompt)).abs().max() < TOLERANCE
    assert [runtime.length(s) for s in range(3)] == list(lengths)
    assert greedy_tail(runtime, 1, together[1], 8) == greedy_tail(alone, 1, alone.prefill(1, prompts[1]), 8)
    scattered = runtime.prefill_many([2, 0], prompts[:2])  # not a range: one by one
    assert (scattered[0] - together[0]).abs().max() < TOLERANCE


# Its next position in a fresh row (5; 30 in ORT's compacting cache), or one that evicts (24: ORT's 24 rows are
# full) or overwrites (24 and 30 in eager's ring of 8): decoded around, or gathered.
@pytest.mark.parametrize("partial", [5, 24, 30])
def test_decode_around_a_partly_prefilled_slot_leaves_it_exact(make, partial):
    runtime, alone = make(), make()
    prompt, others = ids(partial + 9, 6), [ids(4, 7), ids(11, 8)]
    last = [int(runtime.prefill(slot, p).argmax()) for slot, p in zip((0, 2), others)]
    runtime.prefill(1, prompt[:partial])  # a chunk of a prompt, the rest to come
    for _ in range(6):  # decode steps over slots 0 and 2, with slot 1 between them
        logits = runtime.decode([0, 2], last)
        last = [int(row.argmax()) for row in logits]
    assert runtime.length(1) == partial
    if isinstance(runtime, OrtRuntime):  # one call over slots 0..2, not a gathered batch
        assert ((runtime._row_pointers(0)[0][0], 3) in runtime._bindings) == (partial != 24)
    warm = runtime.extend(1, prompt[partial:], all_logits=True)
    cold = alone.prefill(1, prompt, all_logits=True)
    assert (warm - cold[partial:]).abs().max() < TOLERANCE
    assert greedy_tail(runtime, 1, warm[-1], 8) == greedy_tail(alone, 1, cold[-1], 8)
