"""The ort target's attention node, exported through the real translation, against the contract's reference.

ONNX Runtime's GroupQueryAttention with sliding_window_cache=1 keeps a compacting window cache,
not the contract's ring: rows [0, L(T)) hold the last L(T) positions in order, with
L(T) = T up to the capacity C, then T - G * ceil((T - C) / G), G = C - W + 1. These tests pin
that layout and show the attention output equals sliding_window_gqa_reference anyway: past the
wrap, for one-token decode, a prompt longer than C, and right-padded batches.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sc2deploy.attention import rope_cache, sliding_window_gqa, sliding_window_gqa_reference
from sc2deploy.config import Config

NQ, NKV, H, W = 4, 2, 16, 6
CONFIG = Config(hidden_size=NQ * H, intermediate_size=4, num_hidden_layers=1, num_attention_heads=NQ,
                num_key_value_heads=NKV, rope_theta=10000.0, vocab_size=8, max_position_embeddings=128,
                sliding_window=W)


class OneAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        cos, sin = rope_cache(H, CONFIG.rope_theta, CONFIG.max_position_embeddings)
        self.register_buffer("cos_cache", cos)
        self.register_buffer("sin_cache", sin)

    def forward(self, query, key, value, past_key, past_value, attention_mask):
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        total = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
        return sliding_window_gqa(query, key, value, past_key, past_value, seqlens_k, total,
                                  self.cos_cache, self.sin_cache, NQ, NKV, W, H**-0.5)


@pytest.fixture(scope="module")
def session():
    import onnxruntime as ort

    from sc2deploy.export.graph import _quiet_exporter
    from sc2deploy.export.nodes import attention_translation

    b, s, p = 2, 3, 5
    args = (torch.zeros(b, s, NQ * H), torch.zeros(b, s, NKV * H), torch.zeros(b, s, NKV * H),
            torch.zeros(b, NKV, p, H), torch.zeros(b, NKV, p, H), torch.ones(b, p + s, dtype=torch.int64))
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch"), dim("seq"), dim("past"), dim("total")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 2: past}, {0: batch, 2: past},
              {0: batch, 1: total})
    with _quiet_exporter():
        program = torch.onnx.export(OneAttention(), args, dynamo=True, optimize=False, opset_version=20,
                                    dynamic_shapes=shapes,
                                    custom_translation_table=attention_translation(CONFIG, "fp32", "ort"))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def resident(total: int, capacity: int) -> int:
    if total <= capacity:
        return total
    evict = capacity - W + 1
    return total - evict * math.ceil((total - capacity) / evict)


def run(session, q, k, v, past_k, past_v, totals, width):
    mask = (np.arange(width)[None, :] < np.asarray(totals)[:, None]).astype(np.int64)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (q, k, v, past_k, past_v, mask))))


def sequence(n: int, seed: int):
    g = np.random.default_rng(seed)
    return [g.standard_normal((1, n, d)).astype(np.float32) for d in (NQ * H, NKV * H, NKV * H)]


def reference_linear(q, k, v):
    """The contract with a linear cache as long as the sequence: outputs and the keys of every position."""
    n = q.shape[1]
    empty = torch.zeros(1, NKV, n, H)
    cos, sin = rope_cache(H, CONFIG.rope_theta, CONFIG.max_position_embeddings)
    out, keys, _ = sliding_window_gqa_reference(*(torch.from_numpy(x) for x in (q, k, v)), empty, empty.clone(),
                                                torch.tensor([n - 1], dtype=torch.int32), torch.tensor(n),
                                                cos, sin, NQ, NKV, W, H**-0.5)
    return out.numpy(), keys.numpy()


@pytest.mark.parametrize("capacity", [W, W + 3])
@pytest.mark.parametrize("prompt", [3, 11, 25])
def test_decode_past_the_wrap_equals_reference(session, capacity, prompt):
    n = 40
    q, k, v = sequence(n, seed=prompt)
    expected, keys = reference_linear(q, k, v)
    past_k = np.zeros((1, NKV, capacity, H), np.float32)
    past_v = past_k.copy()
    out, past_k, past_v = run(session, q[:, :prompt], k[:, :prompt], v[:, :prompt], past_k, past_v, [prompt], prompt)
    assert np.abs(out - expected[:, :prompt]).max() < 1e-5  # a prompt longer than the cache included
    for t in range(prompt, n):
        out, past_k, past_v = run(session, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], past_k, past_v, [t + 1], t + 1)
        assert np.abs(out[:, 0] - expected[:, t]).max() < 1e-5
        held = resident(t + 1, capacity)
        assert held >= min(t + 1, W)
        # the layout: rows [0, L) hold positions T-L .. T-1, in order
        assert np.abs(past_k[:, :, :held] - keys[:, :, t + 1 - held:t + 1]).max() < 1e-5


def test_below_capacity_the_cache_is_the_contracts(session):
    """With C >= every total (no eviction), present buffers equal the reference op's exactly as a linear cache."""
    n, capacity = 9, 12
    q, k, v = sequence(n, seed=5)
    zeros = np.zeros((1, NKV, capacity, H), np.float32)
    out, pk, pv = run(session, q, k, v, zeros, zeros.copy(), [n], n)
    cos, sin = rope_cache(H, CONFIG.rope_theta, CONFIG.max_position_embeddings)
    ref_out, ref_k, ref_v = sliding_window_gqa_reference(
        *(torch.from_numpy(x) for x in (q, k, v, zeros, zeros)), torch.tensor([n - 1], dtype=torch.int32),
        torch.tensor(n), cos, sin, NQ, NKV, W, H**-0.5)
    assert np.abs(out - ref_out.numpy()).max() < 1e-5
    assert np.abs(pk[:, :, :n] - ref_k.numpy()[:, :, :n]).max() < 1e-5
    assert np.abs(pv[:, :, :n] - ref_v.numpy()[:, :, :n]).max() < 1e-5


@pytest.mark.parametrize("capacity", [W, W + 4])
def test_right_padded_batch_then_ragged_decode(session, capacity):
    lengths, n = [3, 17, 9], 24
    seqs = [sequence(n, seed=10 + i) for i in range(3)]
    expected = [reference_linear(*s)[0] for s in seqs]
    longest = max(lengths)
    q, k, v = (np.zeros((3, longest, d), np.float32) for d in (NQ * H, NKV * H, NKV * H))
    for row, (length, s) in enumerate(zip(lengths, seqs)):
        for dst, src in zip((q, k, v), s):
            dst[row, :length] = src[0, :length]
    past_k = np.zeros((3, NKV, capacity, H), np.float32)
    out, past_k, past_v = run(session, q, k, v, past_k, past_k.copy(), lengths, longest)
    for row, length in enumerate(lengths):
        assert np.abs(out[row, :length] - expected[row][0, :length]).max() < 1e-5
    totals = list(lengths)
    for _ in range(n - longest):
        step = [np.stack([s[i][0, t:t + 1] for s, t in zip(seqs, totals)]) for i in range(3)]
        totals = [t + 1 for t in totals]
        out, past_k, past_v = run(session, *step, past_k, past_v, totals, max(totals))
        for row, t in enumerate(totals):
            assert np.abs(out[row, 0] - expected[row][0, t - 1]).max() < 1e-5
