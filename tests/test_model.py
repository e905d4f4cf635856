"""The reference model against transformers' Starcoder2ForCausalLM, the independent oracle."""
from __future__ import annotations

import torch

from sc2deploy.checkpoint import CheckpointSource, load_model
from sc2deploy.runtime.eager import EagerRuntime


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == n
    return tokens


def eager_greedy(runtime: EagerRuntime, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Prefill all prompts in one right-padded batch, then decode them together."""
    logits = runtime.prefill_batch(prompts)
    tokens = [[int(row[-1].argmax())] for row in logits]
    slots = list(range(len(prompts)))
    for _ in range(n - 1):
        step = runtime.decode(slots, [t[-1] for t in tokens])
        for seq, row in zip(tokens, step):
            seq.append(int(row.argmax()))
    return tokens


def test_logits_match_transformers_past_the_window(hf_checkpoint):
    folder, hf = hf_checkpoint
    model = load_model(CheckpointSource(folder))
    window = model.config.sliding_window
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * window + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = model(ids, torch.ones_like(ids), model.empty_cache(2, window))
    assert (got - expected).abs().max().item() < 1e-5


def test_greedy_tokens_through_the_cache_match_transformers(hf_checkpoint):
    folder, hf = hf_checkpoint
    source = CheckpointSource(folder)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3 * source.config.sliding_window, 5, 11)]
    expected = [hf_greedy(hf, p, 32) for p in prompts]
    runtime = EagerRuntime(source, max_batch=len(prompts))
    assert runtime.capacity == source.config.sliding_window
    assert eager_greedy(runtime, prompts[:1], 32) == expected[:1]
    assert eager_greedy(runtime, prompts, 32) == expected  # a batch of unequal lengths


def test_long_generation_keeps_window_cache_and_equals_recomputation(tmp_path):
    from tests.conftest import make_hf_model

    make_hf_model(tmp_path, sliding_window=8)
    source = CheckpointSource(tmp_path)
    window = source.config.sliding_window
    runtime = EagerRuntime(source)
    prompt = [1, 2, 3]
    tokens = eager_greedy(runtime, [prompt], 3 * window)[0]
    assert all(k.shape[2] == window for k, _ in runtime.cache)
    # recompute every step from scratch, no cache reuse
    model = runtime.model
    seq = list(prompt)
    for _ in range(3 * window):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits, _ = model(ids, torch.ones_like(ids), model.empty_cache(1, 0))
        seq.append(int(logits[0, -1].argmax()))
    assert seq[len(prompt):] == tokens


def test_half_precision_logits_close_to_fp32(hf_checkpoint):
    folder, _ = hf_checkpoint
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    fp32 = load_model(CheckpointSource(folder))
    ref, _ = fp32(ids, torch.ones_like(ids), fp32.empty_cache(1, 0))
    for dtype, tol in (("fp16", 2e-2), ("bf16", 1e-1)):
        model = load_model(CheckpointSource(folder), dtype)
        got, _ = model(ids, torch.ones_like(ids), model.empty_cache(1, model.config.window))
        assert got.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
        assert (got.float() - ref).abs().max().item() < tol * ref.abs().max().item()
