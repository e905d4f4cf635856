"""The reference of a parity check: the eager model in float32, prefilling long prompts in chunks."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from sc2deploy.runtime.eager import EagerRuntime

PREFILL_CHUNK = 512  # prompt tokens the eager reference prefills at a time (ChunkedReference)


class ChunkedReference(EagerRuntime):
    """The eager reference model (float32), prefilling prompts `chunk` tokens at a time through its KV cache.

    A one-shot prefill of an S-token prompt holds every layer's (S, hidden) and (S, intermediate) activations
    and (S, vocab) logits at once: 8,205 positions of the bench preset reached a 10 GiB peak. In chunks, a prefill
    holds one chunk's activations and logits besides the (S, vocab) result. It is exact, not an approximation:
    the cache keeps the last W positions (the ring of attention.py) and a chunk's queries see exactly the keys
    of their window, cached or new, as in one pass (the contract's "chunk of a longer prompt" rows). Batches of
    prompts longer than a chunk are prefilled row by row, each in chunks.
    """

    def __init__(self, source, max_batch: int = 1, chunk: int = PREFILL_CHUNK, device: torch.device | str = "cpu"):
        super().__init__(source, dtype="fp32", max_batch=max_batch, device=device)
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = chunk

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        self._check_prefill(slot, token_ids)
        ids, n = list(token_ids), len(token_ids)
        rows = slice(slot, slot + 1)
        out = torch.empty((n, self.config.vocab_size), dtype=torch.float32) if all_logits else None
        last = None
        for start in range(0, n, self.chunk):
            piece = self._tensor([ids[start:start + self.chunk]])
            end = start + piece.shape[1]
            # mask width = past + new: the first chunk is a first prompt, the others continue the row
            mask = torch.ones((1, end), dtype=torch.int64, device=self.device)
            logits = self._run(piece, mask, rows, keep=0 if out is not None else 1)[0]
            if out is not None:
                out[start:end] = logits.cpu()
            last = logits[-1]
            del logits
        self._lengths[slot] = n
        if out is not None:
            return out
        assert last is not None  # _check_prefill refuses empty prompts
        return last

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if max(len(p) for p in prompts) <= self.chunk:
            return super().prefill_batch(prompts)
        for slot, prompt in enumerate(prompts):
            self._check_prefill(slot, prompt)
        return [self.prefill(slot, prompt, all_logits=True) for slot, prompt in enumerate(prompts)]

