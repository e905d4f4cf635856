"""The eager runtime: the reference model itself, with a window-bounded ring cache per slot."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sc2deploy.checkpoint import TensorSource, load_model
from sc2deploy.runtime.base import PaddedPrefill


class EagerRuntime(PaddedPrefill):
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

    supports_extend = supports_prefix_reuse = True

    @torch.inference_mode()
    def extend(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_extend(slot, token_ids)
        total = self._lengths[slot] + len(token_ids)
        logits = self._run(self._tensor([list(token_ids)]), self._mask([total]), slice(slot, slot + 1), fresh=False)
        self._lengths[slot] = total
        return logits[0] if all_logits else logits[0, -1]

    def _cache_rows(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        return [(k[slot], v[slot]) for k, v in self.cache]

    def _prefill_rows(self, prompts: list[list[int]], first_slot: int, all_logits: bool) -> Tensor:
        lengths = [len(p) for p in prompts]
        batch = self._tensor([p + [0] * (max(lengths) - len(p)) for p in prompts])
        return self._run(batch, self._mask(lengths), slice(first_slot, first_slot + len(prompts)), fresh=True)

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
