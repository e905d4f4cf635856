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
        tokens = dict(zip(slots, token_ids))
        covering = list(range(min(slots), max(slots) + 1))
        if all(s in tokens or self._placeholder_ok(s) for s in covering):  # one call over the range
            rows = covering
            where: slice | Tensor = slice(covering[0], covering[-1] + 1)
        else:
            rows = list(slots)
            where = self._tensor(rows)
        mask = self._mask([self._lengths[s] + 1 for s in rows])
        ids = self._tensor([tokens.get(s, 0) for s in rows])[:, None]
        logits = self._run(ids, mask, where)[:, -1]
        for s in slots:
            self._lengths[s] += 1
        return logits if rows == list(slots) else logits[[rows.index(s) for s in slots]]

    supports_extend = supports_prefix_reuse = True

    @torch.inference_mode()
    def extend(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_extend(slot, token_ids)
        total = self._lengths[slot] + len(token_ids)
        logits = self._run(self._tensor([list(token_ids)]), self._mask([total]), slice(slot, slot + 1),
                           keep=0 if all_logits else 1)
        self._lengths[slot] = total
        return logits[0] if all_logits else logits[0, -1]

    def _cache_rows(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        return [(k[slot], v[slot]) for k, v in self.cache]

    def _prefill_rows(self, prompts: list[list[int]], first_slot: int, all_logits: bool) -> Tensor:
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        batch = self._tensor([p + [0] * (longest - len(p)) for p in prompts])
        keep = 0 if all_logits else longest - min(lengths) + 1  # the columns from the shortest row's end on
        logits = self._run(batch, self._mask(lengths), slice(first_slot, first_slot + len(prompts)), keep)
        if all_logits or keep == 1:
            return logits
        last = self._tensor(lengths) - 1 - (longest - keep)  # each row's last token, within the kept columns
        return logits[torch.arange(len(prompts), device=self.device), last][:, None]

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _mask(self, lengths: list[int]) -> Tensor:
        """(B, max length) attention mask of right-padded rows."""
        columns = torch.arange(max(lengths), device=self.device)
        return (columns[None, :] < self._tensor(lengths)[:, None]).to(torch.int64)

    def _run(self, ids: Tensor, mask: Tensor, rows: slice | Tensor, keep: int = 0) -> Tensor:
        """The model over cache rows `rows`: a range is updated in place (views of the cache); scattered rows
        (a tensor of indices) are gathered, run, and written back."""
        if isinstance(rows, slice):
            past = [(k[rows], v[rows]) for k, v in self.cache]
            logits, _ = self.model(ids, mask, past, in_place=True, logits_to_keep=keep)
            return logits.float()
        logits, presents = self.model(ids, mask, [(k[rows], v[rows]) for k, v in self.cache], logits_to_keep=keep)
        for (k, v), (pk, pv) in zip(self.cache, presents):
            k[rows] = pk
            v[rows] = pv
        return logits.float()
