"""The two call forms of the attention contract: in place (the eager runtime's cache) equals functional (the
export's) exactly, for first prompts, chunks with a past, decode steps, ragged rows and a wrapped ring."""
from __future__ import annotations

import pytest
import torch

from sc2deploy.attention import rope_cache, sliding_window_gqa_, sliding_window_gqa_reference

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


@pytest.mark.parametrize("seq, seqlens, total, capacity, window", [
    (5, [4, 2], 5, 8, 4),       # first prompt, right-padded rows
    (3, [9, 5], 10, 6, 5),      # a chunk of 3 after a past that wrapped the ring of 6
    (1, [30, 0], 31, 8, 8),     # a decode step, one row far past the window, one fresh
    (7, [20, 6], 21, 16, 0),    # no window, a linear cache
])
def test_in_place_equals_functional(seq, seqlens, total, capacity, window):
    gen = torch.Generator().manual_seed(seq + capacity)
    batch = len(seqlens)
    query = torch.randn(batch, seq, HEADS * HEAD_DIM, generator=gen)
    key, value = (torch.randn(batch, seq, KV_HEADS * HEAD_DIM, generator=gen) for _ in range(2))
    past_key, past_value = (torch.randn(batch, KV_HEADS, capacity, HEAD_DIM, generator=gen) for _ in range(2))
    cos, sin = rope_cache(HEAD_DIM, 10000.0, 64)
    args = (torch.tensor(seqlens, dtype=torch.int32), torch.tensor(total, dtype=torch.int32), cos, sin, HEADS,
            KV_HEADS, window, HEAD_DIM**-0.5)
    out, present_key, present_value = sliding_window_gqa_reference(query, key, value, past_key, past_value, *args)
    cache_key, cache_value = past_key.clone(), past_value.clone()
    in_place = sliding_window_gqa_(query, key, value, cache_key, cache_value, *args)
    assert torch.equal(in_place, out)
    assert torch.equal(cache_key, present_key) and torch.equal(cache_value, present_value)
    assert not torch.equal(cache_key, past_key)  # it did write
