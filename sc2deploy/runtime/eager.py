"""The eager runtime: the reference model itself, with a window-bounded ring cache per slot."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sc2deploy.checkpoint import TensorSource, load_model
from sc2deploy.runtime.base import Runtime


class EagerRuntime(Runtime):
    name = "eager"

    def __init__(self, source: TensorSource, dtype: str = "fp32", max_batch: int = 1, capacity: int | None = None,
                 threads: int | None = None, device: torch.device | str = "cpu"):
        if threads:
            torch.set_num_threads(threads)
        self.config, self.dtype, self.max_batch = source.config, dtype, max_batch
        self.device = torch.device(device)
        self.capacity = self.config.cache_positions(capacity)
        self.model = load_model(source, dtype, self.device)
        self.cache = self.model.empty_cache(max_batch, self.capacity)
        self._init_slots()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_prefill(slot, token_ids)
        ids = self._tensor([list(token_ids)])
        logits = self._run(ids, torch.ones_like(ids), slice(slot, slot + 1), fresh=True)
        self._lengths[slot] = len(token_ids)
        return logits[0] if all_logits else logits[0, -1]

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        for slot, prompt in enumerate(prompts):
            self._check_prefill(slot, prompt)
        lengths = [len(p) for p in prompts]
        batch = self._tensor([list(p) + [0] * (max(lengths) - len(p)) for p in prompts])
        logits = self._run(batch, self._mask(lengths), slice(0, len(prompts)), fresh=True)
        for slot, p in enumerate(prompts):
            self._lengths[slot] = len(p)
        return [logits[row, :len(p)] for row, p in enumerate(prompts)]

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Tensor:
        self._check_decode(slots, token_ids)
        mask = self._mask([self._lengths[s] + 1 for s in slots])
        ids = self._tensor(list(token_ids))[:, None]
        contiguous = list(slots) == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if contiguous else self._tensor(list(slots))
        logits = self._run(ids, mask, rows, fresh=False)
        for s in slots:
            self._lengths[s] += 1
        return logits[:, -1]

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _mask(self, lengths: list[int]) -> Tensor:
        """(B, max length) attention mask of right-padded rows."""
        columns = torch.arange(max(lengths), device=self.device)
        return (columns[None, :] < self._tensor(lengths)[:, None]).to(torch.int64)

    def _run(self, ids: Tensor, mask: Tensor, rows, fresh: bool) -> Tensor:
        batch = ids.shape[0]
        past = self.model.empty_cache(batch, self.capacity) if fresh else [(k[rows], v[rows]) for k, v in self.cache]
        logits, presents = self.model(ids, mask, past)
        for (k, v), (pk, pv) in zip(self.cache, presents):
            k[rows] = pk
            v[rows] = pv
        return logits.float()
