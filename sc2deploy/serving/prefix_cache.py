"""Prefix caching: the KV cache of finished sequences, kept within a byte budget, so that a new prompt that
starts like one of them (an editor's next request: the same file, a few characters changed near the cursor)
restores the shared part and prefills only the rest.

A stored sequence of T tokens serves any prefix of itself while T fits the runtime's cache (before that
nothing was evicted or overwritten, in the ring of the eager runtime as in ONNX Runtime's compacting window
cache), and otherwise only the whole of it (Runtime.reusable). Running sequences serve the same way, copied
from their slot. At least one prompt token is always prefilled, for the logits of the first new token.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sc2deploy.runtime.base import KVState, Runtime
from sc2deploy.serving.metrics import Metrics

MIN_REUSE = 8  # tokens: a shorter shared prefix is cheaper to prefill than to look up and copy


@dataclass
class Match:
    length: int  # prompt tokens whose cache is reused
    state: KVState | None = None  # from the store, or ...
    slot: int | None = None  # ... copied from the running sequence in this slot


class PrefixCache:
    """An LRU of (tokens, KVState) within `budget_bytes`; its methods run on the engine thread only."""

    def __init__(self, runtime: Runtime, budget_bytes: int, metrics: Metrics):
        self.runtime, self.budget, self.metrics = runtime, budget_bytes, metrics
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, KVState]] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0 and self.runtime.supports_prefix_reuse

    def lookup(self, prompt: list[int], live: Iterable[tuple[list[int], int]] = ()) -> Match | None:
        """The longest reusable prefix of `prompt` (at most all but its last token) among the stored sequences
        and the `live` (tokens in the cache, slot) ones."""
        if not self.enabled:
            return None
        self.metrics.prefix_lookups.inc()
        query = np.asarray(prompt[:-1], dtype=np.int64)
        best: Match | None = None
        for key, (tokens, state) in self._entries.items():
            length = self._usable(query, tokens, state.length)
            if length and (best is None or length > best.length):
                best = Match(length, state=state)
                best_key = key
        for held, slot in live:
            length = self._usable(query, np.asarray(held, dtype=np.int64), len(held))
            if length and (best is None or length > best.length):
                best = Match(length, slot=slot)
        if best is None:
            return None
        if best.state is not None:
            self._entries.move_to_end(best_key)
        self.metrics.prefix_hits.inc()
        self.metrics.prefix_reused_tokens.inc(best.length)
        return best

    def _usable(self, query: np.ndarray, tokens: np.ndarray, stored: int) -> int:
        """Tokens of `query` a sequence of `stored` tokens (`tokens` first) can give back; 0 below MIN_REUSE."""
        n = min(len(query), len(tokens))
        differ = np.flatnonzero(query[:n] != tokens[:n])
        shared = int(differ[0]) if len(differ) else n
        return shared if shared >= MIN_REUSE and self.runtime.reusable(stored, shared) else 0

    def store(self, tokens: list[int], state: KVState) -> None:
        """Keep `state` (the cache of `tokens`), evicting the least recently used beyond the budget."""
        if not self.enabled or state.nbytes > self.budget or len(tokens) < MIN_REUSE:
            return
        key = tuple(tokens)
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1].nbytes
        self._entries[key] = (np.asarray(tokens, dtype=np.int64), state)
        self.bytes += state.nbytes
        while self.bytes > self.budget:
            self.bytes -= self._entries.popitem(last=False)[1][1].nbytes
        self.metrics.prefix_cache_bytes.set(self.bytes)
