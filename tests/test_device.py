"""Every tensor follows the device of its inputs (a first GPU run failed on tensors made on the CPU).

With meta as torch's default device, a tensor made without device= lands on meta: each part runs on CPU
inputs under that default and must give CPU outputs and caches, equal to the same run without it.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from sc2deploy.attention import rope_cache, sliding_window_gqa_, sliding_window_gqa_reference
from sc2deploy.checkpoint import RandomSource, load_model, random_model
from sc2deploy.config import preset
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.sampling import Sampler, SamplingParams, top_logprobs

TINY = preset("tiny")


@contextmanager
def meta_default():
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


def assert_same_on_cpu(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(g, torch.Tensor):
            assert g.device.type == "cpu"
            assert torch.equal(g, e)
        else:
            assert g == e


def on_meta_default(run):
    """run() without and with meta as the default device: the same values, on the CPU."""
    expected = run()
    with meta_default():
        got = run()
    assert_same_on_cpu(got, expected)


@pytest.fixture(scope="module")
def model():
    return load_model(RandomSource(TINY, seed=1))


def test_model_prefill_and_decode(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    step_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    @torch.inference_mode()
    def run():
        logits, cache = model(ids, mask, model.empty_cache(2, 8))
        step, cache = model(ids[:, :1], step_mask, cache)
        return [logits, step, *(t for kv in cache for t in kv)]

    on_meta_default(run)


def test_reference_op_with_a_ring_cache():
    gen = torch.Generator().manual_seed(0)
    batch, seq, heads, kv_heads, head_dim, capacity = 2, 3, 4, 2, 8, 6
    query = torch.randn(batch, seq, heads * head_dim, generator=gen)
    key, value = (torch.randn(batch, seq, kv_heads * head_dim, generator=gen) for _ in range(2))
    past_key, past_value = (torch.randn(batch, kv_heads, capacity, head_dim, generator=gen) for _ in range(2))
    seqlens_k = torch.tensor([6, 9], dtype=torch.int32)  # 4 and 7 past positions (a full ring), then 3 new
    total = torch.tensor(10, dtype=torch.int32)
    cos, sin = rope_cache(head_dim, 10000.0, 32)

    def run():
        return list(sliding_window_gqa_reference(query, key, value, past_key, past_value, seqlens_k, total,
                                                 cos, sin, heads, kv_heads, 5, head_dim**-0.5))

    on_meta_default(run)


def test_eager_runtime_with_non_contiguous_slots():
    runtime = EagerRuntime(RandomSource(TINY, seed=1), max_batch=3, capacity=16)

    def run():
        out = runtime.prefill_batch([[1, 2, 3], [4, 5, 6, 7, 8], [9]])
        out.append(runtime.prefill(1, [10, 11, 12, 13], all_logits=True))
        out.append(runtime.decode([0, 2], [14, 15]))
        out.append(runtime.decode([2, 1, 0], [16, 17, 18]))
        return out + [t.clone() for kv in runtime.cache for t in kv]

    on_meta_default(run)


def test_loading_on_an_explicit_device():
    expected = EagerRuntime(RandomSource(TINY, seed=1), max_batch=2, capacity=16)
    with meta_default():
        runtime = EagerRuntime(RandomSource(TINY, seed=1), max_batch=2, capacity=16, device="cpu")
        model = random_model(TINY, dtype="fp32", device="cpu")
    assert_same_on_cpu([*runtime.model.state_dict().values(), runtime.model.cos_cache, runtime.model.sin_cache,
                        *(t for kv in runtime.cache for t in kv)],
                       [*expected.model.state_dict().values(), expected.model.cos_cache, expected.model.sin_cache,
                        *(t for kv in expected.cache for t in kv)])
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "cpu" and bool(t.isfinite().all()) for t in tensors)
    assert torch.equal(model.cos_cache, expected.model.cos_cache)


def test_sampling_and_logprobs():
    logits = torch.randn(TINY.vocab_size, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=4)]

    def run():
        samples = []
        for p in params:
            sampler = Sampler(p)
            samples += [sampler(logits) for _ in range(4)]
        return [*samples, top_logprobs(logits, samples[0], 5)]

    on_meta_default(run)


def test_in_place_op_with_a_ring_cache():
    gen = torch.Generator().manual_seed(0)
    batch, seq, heads, kv_heads, head_dim, capacity = 2, 3, 4, 2, 8, 6
    query = torch.randn(batch, seq, heads * head_dim, generator=gen)
    key, value = (torch.randn(batch, seq, kv_heads * head_dim, generator=gen) for _ in range(2))
    cos, sin = rope_cache(head_dim, 10000.0, 32)

    empty = torch.zeros(batch, kv_heads, capacity, head_dim)
    seqlens_k, total = torch.tensor([6, 9], dtype=torch.int32), torch.tensor(10, dtype=torch.int32)

    def run():
        past_key, past_value = empty.clone(), empty.clone()  # the op writes into them
        out = sliding_window_gqa_(query, key, value, past_key, past_value, seqlens_k, total, cos, sin, heads,
                                  kv_heads, 5, head_dim**-0.5)
        return [out, past_key, past_value]

    on_meta_default(run)
