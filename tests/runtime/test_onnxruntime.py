"""The ONNX Runtime runtime against the eager one, through the Runtime interface and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource
from sc2deploy.cli import main
from sc2deploy.errors import UserError
from sc2deploy.runtime import open_runtime
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.runtime.onnxruntime import OrtRuntime


def greedy(runtime, prompts: list[list[int]], n: int, schedule=None) -> list[list[int]]:
    """Prefill `prompts` in one right-padded batch, then decode; schedule(step) picks the slots of a step."""
    tokens = [[int(row[-1].argmax())] for row in runtime.prefill_batch(prompts)]
    for step in range(n - 1):
        slots = schedule(step) if schedule else list(range(len(prompts)))
        logits = runtime.decode(slots, [tokens[s][-1] for s in slots])
        for slot, row in zip(slots, logits):
            tokens[slot].append(int(row.argmax()))
    return tokens


@pytest.fixture(scope="module")
def tiny(store, helpers):
    folder, _ = store.checkpoint()
    source = CheckpointSource(folder)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3 * 8, 5, 11, 17)]
    return source, store.artifact(), prompts


def test_64_greedy_tokens_through_the_cache_equal_eager(tiny):
    source, artifact, prompts = tiny
    ort_rt = OrtRuntime(artifact, max_batch=4)
    eager = EagerRuntime(source, max_batch=4)
    assert greedy(ort_rt, prompts[:1], 64) == greedy(eager, prompts[:1], 64)
    assert greedy(ort_rt, prompts, 64) == greedy(eager, prompts, 64)  # unequal lengths, past the window


def test_prefill_and_decode_logits_match_eager(tiny):
    source, artifact, prompts = tiny
    ort_rt, eager = OrtRuntime(artifact, max_batch=4), EagerRuntime(source, max_batch=4)
    for slot, prompt in enumerate(prompts):
        assert (ort_rt.prefill(slot, prompt, all_logits=True) - eager.prefill(slot, prompt, all_logits=True)).abs().max() < 1e-4
        assert (ort_rt.prefill(slot, prompt) - eager.prefill(slot, prompt)).abs().max() < 1e-4
    worst = 0.0
    for step in range(30):
        slots = [3, 0, 2] if step % 2 else [1, 2]  # out of order, not contiguous, and contiguous
        tokens = [(7 * step + s) % 1000 for s in slots]
        got, expected = ort_rt.decode(slots, tokens), eager.decode(slots, tokens)
        worst = max(worst, (got - expected).abs().max().item())
    assert worst < 1e-4
    assert [ort_rt.length(s) for s in range(4)] == [eager.length(s) for s in range(4)]


def test_scattered_slots_give_the_same_tokens(tiny):
    source, artifact, prompts = tiny

    def schedule(step):  # slot 1 pauses now and then: slots 0, 2, 3 are then not contiguous
        return [0, 2, 3] if step % 3 == 0 else [0, 1, 2, 3]

    ort_tokens = greedy(OrtRuntime(artifact, max_batch=4), prompts, 40, schedule)
    assert ort_tokens == greedy(EagerRuntime(source, max_batch=4), prompts, 40, schedule)


def test_fp16_runtime_greedy_matches_eager_fp16(store, tiny):
    source, _, prompts = tiny
    ort_rt = OrtRuntime(store.artifact(dtype="fp16"), max_batch=2)
    eager = EagerRuntime(source, dtype="fp16", max_batch=2)
    got, expected = greedy(ort_rt, prompts[:2], 24), greedy(eager, prompts[:2], 24)
    # fp16 rounding may flip a near-tie: require the first tokens and most of the rest to agree
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / sum(len(e) for e in expected)
    assert [g[:4] for g in got] == [e[:4] for e in expected] and agree > 0.9


def test_window_cache_capacity_and_describe(tiny):
    _, artifact, _ = tiny
    runtime = open_runtime("ort", artifact=artifact, max_batch=2, capacity=100, threads=1)
    info = runtime.describe()
    assert info["provider"] == "CPUExecutionProvider" and info["runtime"] == "ort" and info["threads"] == 1
    assert runtime.capacity == 8 + 16  # window + slack on CPU
    assert runtime._logits_to_keep is not None  # a prefill computes the head for its last position only
    assert OrtRuntime(artifact, capacity=5).capacity == 8  # never below the window (ONNX Runtime requires it)
    assert OrtRuntime(artifact, cache_slack=0).capacity == 8


def test_model_without_window_uses_a_linear_cache(store, helpers):
    folder, _ = store.checkpoint("no-window", num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    artifact = store.artifact("no-window")
    source = CheckpointSource(folder)
    prompts = [helpers.random_ids(1000, (n,), seed=n).tolist() for n in (12, 5)]
    runtime = OrtRuntime(artifact, max_batch=2, capacity=40)
    assert runtime.capacity == 40 and not runtime.describe()["window_cache"]
    assert greedy(runtime, prompts, 20) == greedy(EagerRuntime(source, max_batch=2, capacity=40), prompts, 20)
    with pytest.raises(UserError, match="does not fit the cache of 40"):
        runtime.prefill(0, list(range(41)))


def test_bad_options(tiny):
    _, artifact, _ = tiny
    with pytest.raises(UserError, match="unknown optimization level"):
        OrtRuntime(artifact, optimization="max")
    with pytest.raises(UserError, match="no CUDAExecutionProvider"):
        OrtRuntime(artifact, provider="cuda")


def generate_json(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]])
def test_generate_cli_prints_the_same_fields_and_tokens_as_eager(store, capsys, sampling):
    folder, _ = store.checkpoint()
    artifact = store.artifact()
    common = ["--prompt-ids", ",".join(str(i) for i in range(100, 130)), "--max-new-tokens", "40", *sampling]
    ort_out = generate_json(capsys, "--backend", "ort", "--artifact", str(artifact), *common)
    eager_out = generate_json(capsys, "--checkpoint", str(folder), *common)
    assert set(ort_out) == set(eager_out) and ort_out["backend"] == "ort"
    assert ort_out["output_ids"] == eager_out["output_ids"]


def test_generate_cli_names_a_truncated_artifact(store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(store.artifact(), copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    code = main(["generate", "--backend", "ort", "--artifact", str(copy), "--prompt-ids", "1,2,3"])
    err = capsys.readouterr().err
    assert code == 2 and "model.onnx.data is truncated" in err and "Traceback" not in err


def test_released_slots_between_running_ones_decode_as_one_range(tiny):
    source, artifact, prompts = tiny
    runtimes = [OrtRuntime(artifact, max_batch=4), EagerRuntime(source, max_batch=4)]
    tokens = [greedy(rt, prompts, 6) for rt in runtimes]
    assert tokens[0] == tokens[1]
    for rt in runtimes:
        rt.release(1)  # finished: its row is scratch for the placeholder of the decodes over slots 0..3
    runtimes[0]._bindings.clear()
    for step in range(12):
        logits = [rt.decode([3, 0, 2], [tokens[0][s][-1] for s in (3, 0, 2)]) for rt in runtimes]
        assert (logits[0] - logits[1]).abs().max() < 1e-4
        for slot, row in zip((3, 0, 2), logits[0]):
            tokens[0][slot].append(int(row.argmax()))
    assert runtimes[0].length(1) == 0 and runtimes[0].length(0) == len(prompts[0]) + 5 + 12
    assert list(runtimes[0]._bindings) == [(runtimes[0]._row_pointers(0)[0][0], 4)]  # one call over 0..3, reused
    # the scratch row takes a new sequence as any free slot does
    fresh = [rt.prefill(1, prompts[2]) for rt in runtimes]
    assert (fresh[0] - fresh[1]).abs().max() < 1e-4
    both = [rt.decode([0, 1, 2, 3], [5, 6, 7, 8]) for rt in runtimes]
    assert (both[0] - both[1]).abs().max() < 1e-4


def test_the_window_cache_takes_memory_as_it_is_written():
    from sc2deploy.runtime.onnxruntime import _zeros

    def resident_mib() -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) / 1024

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to read resident memory")
    before = resident_mib()
    cache = _zeros((4, 4, 4608, 128), np.float32)  # 36 MiB: a 15b layer's keys for 4 slots
    cache[:, :, :21] = 1.0  # 21 positions of each (slot, head)
    grown = resident_mib() - before
    assert not cache[:, :, 21:].any() and cache.flags.writeable
    assert grown < 8, f"{grown:.1f} MiB resident for 0.7 MiB written: whole huge pages were taken"
