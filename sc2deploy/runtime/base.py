"""The interface every runtime offers: slots of KV cache, prefill into a slot, decode a step.

A runtime owns `max_batch` cache slots of `capacity` positions each (at most the window:
older positions are never needed). The parity checker, the generation loop and the server's
continuous-batching scheduler use only these methods, so they never care which runtime they
hold. Logits come back as float32 torch tensors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sc2deploy.config import Config
from sc2deploy.errors import UserError
from sc2deploy.quantization import QuantScheme


@dataclass
class KVState:
    """A detached copy of the cache of a sequence's first `length` tokens, for prefix reuse: per layer the
    (key, value) rows that hold them, (kv_heads, rows, head_dim), in the runtime's own array type."""

    length: int
    layers: list[tuple[Any, Any]]
    nbytes: int


class Runtime(ABC):
    name: str
    config: Config
    dtype: str
    max_batch: int
    capacity: int
    quantization: QuantScheme | None = None  # the weights' block quantization (an `export --quant` artifact)

    @abstractmethod
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        """Start a new sequence in `slot` with `token_ids`.

        Returns the logits of the last token (vocab,), or of every token (S, vocab).
        """

    @abstractmethod
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Tensor:
        """Append one token to each of `slots` (distinct); returns logits (len(slots), vocab)."""

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        """Prefill prompts of unequal lengths into slots 0..n-1; all logits per prompt.

        Runtimes that batch prompts in one call (right padding) override this.
        """
        return [self.prefill(slot, ids, all_logits=True) for slot, ids in enumerate(prompts)]

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        """Start a sequence in each of `slots`; the logits of each prompt's last token. Runtimes that run
        prompts for a range of slots in one call (right padding) override this."""
        return [self.prefill(slot, ids) for slot, ids in zip(slots, prompts)]

    supports_extend = False  # whether extend() works: chunked prefill and prefix reuse need it

    def extend(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        """Append `token_ids` to the sequence in `slot` in one call (a chunk of a longer prompt, or the rest of
        a prompt whose prefix was restored); logits as prefill returns them."""
        raise UserError(f"the {self.name} runtime cannot extend a sequence by several tokens; prefill it whole")

    # Prefix reuse: a sequence's cache, copied out, restores any prefix of it into a slot as long as the
    # sequence never held more tokens than the cache has positions (before that nothing was evicted or
    # overwritten, so positions 0.. sit in rows 0..), or the whole of it. Runtimes that can do it override
    # `_cache_rows` and `_resident`, and support extend().
    supports_prefix_reuse = False

    def reusable(self, state_length: int, prefix: int) -> bool:
        """Whether a sequence that held `state_length` tokens can give back its first `prefix` tokens."""
        return 0 < prefix <= state_length and (state_length <= self.capacity or prefix == state_length)

    def snapshot(self, slot: int, length: int | None = None) -> KVState:
        """A detached copy of the cache of the first `length` (default: all) tokens of the sequence in `slot`."""
        total = self._lengths[slot]
        length = total if length is None else length
        if not self.reusable(total, length):
            raise ValueError(f"slot {slot} holds {total} tokens: its first {length} cannot be copied out")
        rows = self._resident(length)
        layers = [(_copy(k[:, :rows]), _copy(v[:, :rows])) for k, v in self._cache_rows(slot)]
        return KVState(length, layers, sum(k.nbytes + v.nbytes for k, v in layers))

    def restore(self, slot: int, state: KVState, length: int) -> None:
        """Start the sequence in `slot` as the first `length` tokens of `state`'s; extend() goes on from there."""
        self._check_slot(slot)
        if not self.reusable(state.length, length):
            raise ValueError(f"a state of {state.length} tokens cannot give back its first {length}")
        rows = self._resident(length)
        for (k, v), (sk, sv) in zip(self._cache_rows(slot), state.layers):
            k[:, :rows] = sk[:, :rows]
            v[:, :rows] = sv[:, :rows]
        self._lengths[slot] = length

    def _cache_rows(self, slot: int) -> list[tuple[Any, Any]]:
        """Per layer, views of the (key, value) cache of `slot`: (kv_heads, capacity, head_dim)."""
        raise UserError(f"the {self.name} runtime does not reuse prompt prefixes")

    def _resident(self, total: int) -> int:
        """Cache rows that hold the positions of a sequence of `total` tokens."""
        return min(total, self.capacity)

    def _placeholder_ok(self, slot: int) -> bool:
        """Whether a decode step over a range of slots may also run `slot`, which it does not decode, on a
        placeholder token. That writes the slot's next position without counting it: harmless when the write
        takes a fresh cache row, evicting and overwriting nothing (a free slot, or most prompts partly
        prefilled), since whatever the slot runs next writes that position again."""
        held = self._lengths[slot]
        return self._resident(held + 1) == self._resident(held) + 1

    def release(self, slot: int) -> None:
        """The sequence in `slot` is over: the slot may serve as scratch until the next prefill."""
        self._lengths[slot] = 0

    def length(self, slot: int) -> int:
        """Tokens the sequence in `slot` holds (prompt and generated)."""
        return self._lengths[slot]

    def describe(self) -> dict:
        return {"runtime": self.name, "dtype": self.dtype, "max_batch": self.max_batch, "capacity": self.capacity}

    # ---- shared bookkeeping for subclasses ----
    def _init_slots(self) -> None:
        self._lengths = [0] * self.max_batch

    def _check_prefill(self, slot: int, token_ids: Sequence[int]) -> None:
        self._check_slot(slot)
        if not token_ids:
            raise UserError("the prompt is empty; give at least one token")
        if len(token_ids) > self.config.max_position_embeddings:
            raise UserError(f"the prompt has {len(token_ids)} tokens, more than the model's context of "
                            f"{self.config.max_position_embeddings}; shorten it")
        vocab = self.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    def _check_extend(self, slot: int, token_ids: Sequence[int]) -> None:
        self._check_prefill(slot, token_ids)
        if self._lengths[slot] == 0:
            raise ValueError(f"slot {slot} holds no sequence; prefill it first")
        total = self._lengths[slot] + len(token_ids)
        if total > self.config.max_position_embeddings:
            raise UserError(f"the sequence would hold {total} tokens, more than the model's context of "
                            f"{self.config.max_position_embeddings}; shorten it")

    def _check_decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> None:
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots):
            raise ValueError("decode needs one token per slot and distinct slots")
        for slot in slots:
            self._check_slot(slot)
            if self._lengths[slot] == 0:
                raise ValueError(f"slot {slot} holds no sequence; prefill it first")
            if self._lengths[slot] >= self.config.max_position_embeddings:
                raise UserError(f"slot {slot} reached the context of {self.config.max_position_embeddings} tokens")
            if self.capacity < min(self.config.window - 1, self._lengths[slot]):
                raise UserError(f"slot {slot} holds {self._lengths[slot]} tokens but its cache only {self.capacity} "
                                f"positions, fewer than the window needs; open the runtime with a larger capacity")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} outside [0, {self.max_batch})")


class PaddedPrefill(Runtime):
    """A runtime that prefills any number of fresh prompts in one call over right-padded rows (`_prefill_rows`);
    the checks and bookkeeping of `prefill` and `prefill_batch` around that call."""

    @abstractmethod
    def _prefill_rows(self, prompts: list[list[int]], first_slot: int, all_logits: bool) -> Tensor:
        """Logits (len(prompts), S, vocab) of `prompts`, right-padded to S, prefilled into slots first_slot..;
        without `all_logits`, S may be 1: the logits of each row's last token."""

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_prefill(slot, token_ids)
        logits = self._prefill_rows([list(token_ids)], slot, all_logits)
        self._lengths[slot] = len(token_ids)
        return logits[0] if all_logits else logits[0, -1]

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        for slot, prompt in enumerate(prompts):
            self._check_prefill(slot, prompt)
        logits = self._prefill_rows([list(p) for p in prompts], 0, all_logits=True)
        for slot, p in enumerate(prompts):
            self._lengths[slot] = len(p)
        return [logits[row, :len(p)] for row, p in enumerate(prompts)]

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        if len(slots) < 2 or list(slots) != list(range(slots[0], slots[0] + len(slots))):
            return super().prefill_many(slots, prompts)
        for slot, prompt in zip(slots, prompts):
            self._check_prefill(slot, prompt)
        logits = self._prefill_rows([list(p) for p in prompts], slots[0], all_logits=False)
        for slot, p in zip(slots, prompts):
            self._lengths[slot] = len(p)
        return [logits[row, -1] for row in range(len(prompts))]


def _copy(array: Any) -> Any:
    """A detached copy of a torch tensor or a numpy array."""
    return array.clone() if isinstance(array, Tensor) else array.copy()
