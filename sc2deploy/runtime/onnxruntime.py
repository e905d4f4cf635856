"""The ONNX Runtime runtime: an `sc2deploy export --target ort` artifact behind the Runtime interface. The
artifact is checked and its session made by the loaders of runtime/ort_artifact.py; this module runs them.

One session, IOBinding, and per-layer KV buffers of shape (max_batch, kv_heads, C, head_dim)
allocated once and bound as both past and present (ONNX Runtime updates them in place):
a prefill binds its slot's row, a decode the rows of its slots; nothing is copied per step
but the token ids, the mask and the logits.

The cache. With a sliding window the export's GroupQueryAttention nodes run with
sliding_window_cache=1: the buffers are window-sized and ONNX Runtime keeps the most recent
L(T) positions of a row of T tokens at rows [0, L) in order, evicting G = C - W + 1 positions
at once when the row would overflow (L(T) = T up to C, then T - G*ceil((T-C)/G); always
>= min(T, W), so the window is resident). That is a compacting layout, not the contract's
ring (slot = position % C), but the attention output is the contract's: measured equal to
sliding_window_gqa_reference past the wrap, for decode, batched ragged prefill, and prompts
longer than C (tests/export/test_nodes.py). C is max(W, min(wanted, W + slack)) on
CPU (slack amortises the compaction copy over G steps) and W on CUDA (its kernel requires
C == W). Without a window the cache is linear: C = the wanted capacity, as in the contract.

Decode of slots that are not one contiguous range (a finished sequence in the middle): when the
slots between them are free or hold a prompt partly prefilled (Runtime._placeholder_ok), one call
covers the whole range, a placeholder token in each of those rows, whose logits are dropped: no
copy and no allocation. Otherwise, on CPU, the resident rows of those slots are gathered into a staging batch,
run, and scattered back (exact; costs a copy of those rows' resident cache); on other devices the
slots run as one call per contiguous run. The order of `slots` is free: logits come back in that order.
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sc2deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, past_name, present_name
from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.runtime.ort_artifact import (NUMPY_DTYPES, PROVIDERS, OrtArtifact, choose_provider, load_ort_artifact,
                                            ort_session)


class OrtRuntime(Runtime):
    name = "ort"

    def __init__(self, artifact: OrtArtifact | str | Path, max_batch: int = 1, capacity: int | None = None, *,
                 threads: int | None = None, provider: str | None = None, verify: bool = True,
                 optimization: str = "all", cache_slack: int | None = None, torch_threads: int | None = 1):
        """Run `artifact`: a loaded OrtArtifact, or the folder of one (made by `sc2deploy export --target ort`),
        loaded here by `load_ort_artifact(artifact, verify=verify)`.

        threads: intra-op threads (default: ONNX Runtime's, one per core). provider: "cpu", "cuda", or None
        for CUDA when onnxruntime-gpu offers it, else CPU. verify: check the sha256 of every file against the
        manifest, except those unchanged (size, mtime, inode) since they last passed (False: sizes only).
        optimization: ONNX Runtime graph optimization level, one of disable/basic/extended/all. cache_slack:
        positions beyond the window in each cache row (CPU; default max(16, window/8)). torch_threads: on CPU,
        torch's intra-op threads are set to this (None: left alone). Callers post-process logits with torch
        (sampling, argmax), and torch's OpenMP workers spin after each parallel op, taking the cores ONNX
        Runtime's threads need next: with 2 cores, batch-8 decode of the bench preset went from ~325 to ~470
        tok/s with torch on 1 thread. Note that this is process-wide.
        """
        if not isinstance(artifact, OrtArtifact):
            artifact = load_ort_artifact(artifact, verify=verify)
        self.artifact = artifact.folder
        self.config, self.dtype, self.windowed = artifact.config, artifact.dtype, artifact.windowed
        self.quantization = artifact.quantization
        self.max_batch = max_batch
        self.provider = choose_provider(provider)
        self.threads = threads
        if self.provider == "cpu" and torch_threads:
            torch.set_num_threads(torch_threads)
        self.capacity = self._capacity(capacity, cache_slack)
        self.session = ort_session(artifact.model_path, self.provider, threads, optimization)
        # An input with a default (an overridable initializer): IOBinding takes it as an OrtValue only.
        self._logits_to_keep: dict[int, Any] | None = None  # keep -> its OrtValue, made as needed
        if any(i.name == LOGITS_TO_KEEP for i in self.session.get_overridable_initializers()):
            self._logits_to_keep = {}
        self._allocate_cache()
        self._bindings: dict[tuple[int, int], Any] = {}  # onnxruntime.IOBinding
        self._init_slots()

    # ---------------------------------------------------------------- setup
    def _capacity(self, wanted: int | None, slack: int | None) -> int:
        c = self.config
        wanted = c.max_position_embeddings if wanted is None else min(wanted, c.max_position_embeddings)
        if not self.windowed:
            return max(1, wanted)
        window = c.window
        if self.provider != "cpu":
            return window
        slack = max(16, window // 8) if slack is None else slack
        return max(window, min(wanted, window + slack))

    def _allocate_cache(self) -> None:
        import onnxruntime as ort

        c = self.config
        shape = (self.max_batch, c.num_key_value_heads, self.capacity, c.head_dim)
        np_dtype = NUMPY_DTYPES[self.dtype]
        self._np_dtype = np_dtype
        self._row_bytes = c.num_key_value_heads * self.capacity * c.head_dim * np.dtype(np_dtype).itemsize
        self._cache: list[tuple[Any, Any]]  # numpy arrays on CPU, OrtValues on a device
        if self.provider == "cpu":
            self._device = ("cpu", 0)
            self._cache = [(_zeros(shape, np_dtype), _zeros(shape, np_dtype)) for _ in range(c.num_hidden_layers)]
            self._pointers = [(k.ctypes.data, v.ctypes.data) for k, v in self._cache]
        else:
            self._device = (self.provider, 0)
            self._cache = [(ort.OrtValue.ortvalue_from_shape_and_type(shape, np_dtype, self.provider, 0),
                            ort.OrtValue.ortvalue_from_shape_and_type(shape, np_dtype, self.provider, 0))
                           for _ in range(c.num_hidden_layers)]
            self._pointers = [(k.data_ptr(), v.data_ptr()) for k, v in self._cache]
        self._decode_logits = np.empty((self.max_batch, 1, c.vocab_size), np_dtype)  # host memory on any provider

    def describe(self) -> dict:
        return {**super().describe(), "provider": PROVIDERS[self.provider], "artifact": str(self.artifact),
                "threads": self.threads, "window_cache": self.windowed,
                "quantization": self.quantization.to_manifest() if self.quantization else None}

    # ---------------------------------------------------------------- interface
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_prefill(slot, token_ids)
        self._check_room(len(token_ids))
        ids = np.asarray([list(token_ids)], dtype=np.int64)
        logits = self._run(ids, np.ones_like(ids), self._row_pointers(slot), keep=0 if all_logits else 1)
        self._lengths[slot] = len(token_ids)
        return _to_torch(logits[0] if all_logits else logits[0, -1], copied=True)

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        logits = self._prefill_rows(list(range(len(prompts))), prompts)
        return [_to_torch(logits[row, :len(p)], copied=True) for row, p in enumerate(prompts)]

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[Tensor]:
        if len(slots) < 2 or list(slots) != list(range(slots[0], slots[0] + len(slots))):
            return super().prefill_many(slots, prompts)
        # The rows end at different columns: the logits of the last positions from the shortest row's end on
        # (without them the vocabulary projection of every position cost as much as the rest of a prefill).
        longest = max(len(p) for p in prompts)
        spread = longest - min(len(p) for p in prompts) + 1
        keep = min(longest, 1 << (spread - 1).bit_length()) if self._logits_to_keep is not None else 0  # a power of 2
        logits = self._prefill_rows(list(slots), prompts, keep)
        first = longest - keep if keep else 0  # the column of logits[:, 0]
        return [_to_torch(logits[row, len(p) - 1 - first]) for row, p in enumerate(prompts)]

    def _prefill_rows(self, slots: list[int], prompts: Sequence[Sequence[int]], keep: int = 0) -> np.ndarray:
        """Fresh prompts into the contiguous `slots`, right-padded in one call; the logits of the last `keep`
        positions (0: every position)."""
        for slot, prompt in zip(slots, prompts):
            self._check_prefill(slot, prompt)
            self._check_room(len(prompt))
        longest = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), longest), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = p
            mask[row, :len(p)] = 1
        logits = self._run(ids, mask, self._row_pointers(slots[0]), keep=keep)
        for slot, p in zip(slots, prompts):
            self._lengths[slot] = len(p)
        return logits

    supports_extend = True

    def extend(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> Tensor:
        self._check_extend(slot, token_ids)
        total = self._lengths[slot] + len(token_ids)
        self._check_room(total)
        ids = np.asarray([list(token_ids)], dtype=np.int64)
        logits = self._run(ids, np.ones((1, total), dtype=np.int64), self._row_pointers(slot),
                            keep=0 if all_logits else 1)
        self._lengths[slot] = total
        return _to_torch(logits[0] if all_logits else logits[0, -1], copied=True)

    @property
    def supports_prefix_reuse(self) -> bool:  # type: ignore[override]
        return self.provider == "cpu"  # the cache is numpy arrays; on a device it is OrtValues

    def _cache_rows(self, slot: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.provider != "cpu":
            raise UserError(f"prefix reuse needs the CPU provider; this runtime runs on {self.provider}")
        return [(k[slot], v[slot]) for k, v in self._cache]

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Tensor:
        self._check_decode(slots, token_ids)
        for s in slots:
            self._check_room(self._lengths[s] + 1)
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        ordered = [slots[i] for i in order]
        covering = list(range(ordered[0], ordered[-1] + 1))
        if ordered == covering:
            logits = self._decode_rows(ordered, [token_ids[i] for i in order], self._row_pointers(ordered[0]))
        elif all(self._placeholder_ok(s) for s in set(covering) - set(ordered)):
            logits = self._decode_covering(ordered, [token_ids[i] for i in order], covering)
        elif self.provider == "cpu":
            logits = self._decode_gathered(ordered, [token_ids[i] for i in order])
        else:
            logits = np.concatenate([
                self._decode_rows(run, [token_ids[slots.index(s)] for s in run], self._row_pointers(run[0]))
                for run in _contiguous_runs(ordered)])
        for s in slots:
            self._lengths[s] += 1
        if order == sorted(order):
            return _to_torch(logits)
        return _to_torch(logits[np.argsort(order)], copied=True)

    # ---------------------------------------------------------------- running
    def _decode_rows(self, slots: list[int], token_ids: list[int], pointers, reuse: bool = True) -> np.ndarray:
        totals = np.asarray([self._lengths[s] + 1 for s in slots])
        mask = (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)
        ids = np.asarray(token_ids, dtype=np.int64)[:, None]
        return self._run(ids, mask, pointers, keep=1, reuse=reuse)[:, 0]

    def _decode_covering(self, slots: list[int], token_ids: list[int], covering: list[int]) -> np.ndarray:
        """Slots with others between them (free, or partly prefilled): one call over the whole range, a
        placeholder token in each of the others at its next position (`_placeholder_ok`); their logits are
        dropped."""
        tokens = dict(zip(slots, token_ids))
        totals = np.asarray([self._lengths[s] + 1 for s in covering])
        mask = (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)
        ids = np.asarray([tokens.get(s, 0) for s in covering], dtype=np.int64)[:, None]
        logits = self._run(ids, mask, self._row_pointers(covering[0]), keep=1, reuse=True)[:, 0]
        return logits[[s - covering[0] for s in slots]]

    def _decode_gathered(self, slots: list[int], token_ids: list[int]) -> np.ndarray:
        """Non-contiguous slots on CPU: copy their resident cache rows into a staging batch and back."""
        n = len(slots)
        before = [self._resident(self._lengths[s]) for s in slots]
        after = [self._resident(self._lengths[s] + 1) for s in slots]
        staging = []
        for k, v in self._cache:
            sk, sv = np.empty((n,) + k.shape[1:], k.dtype), np.empty((n,) + v.shape[1:], v.dtype)
            for row, (slot, used) in enumerate(zip(slots, before)):
                sk[row, :, :used] = k[slot, :, :used]
                sv[row, :, :used] = v[slot, :, :used]
            staging.append((sk, sv))
        logits = self._decode_rows(slots, token_ids, [(sk.ctypes.data, sv.ctypes.data) for sk, sv in staging],
                                   reuse=False)
        for (k, v), (sk, sv) in zip(self._cache, staging):
            for row, (slot, used) in enumerate(zip(slots, after)):
                k[slot, :, :used] = sk[row, :, :used]
                v[slot, :, :used] = sv[row, :, :used]
        return logits

    def _resident(self, total: int) -> int:
        """Cache rows holding positions for a sequence of `total` tokens (ONNX Runtime's L(T))."""
        c = self.capacity
        if not self.windowed or total <= c:
            return min(total, c)
        evict = c - self.config.window + 1
        return total - evict * -(-(total - c) // evict)

    def _row_pointers(self, first_row: int) -> list[tuple[int, int]]:
        offset = first_row * self._row_bytes
        return [(k + offset, v + offset) for k, v in self._pointers]

    def _run(self, ids: np.ndarray, mask: np.ndarray, pointers, keep: int, reuse: bool = False) -> np.ndarray:
        """One session run with the cache rows at `pointers` bound as past and present (in place).

        A decode step (one token per row, preallocated logits) keeps its IOBinding for the next step over the
        same rows (`reuse`), so that only the token ids and the mask are bound again.
        """
        batch, seq = ids.shape
        if self._logits_to_keep is None:
            keep = 0
        # A decode step writes into the runtime's own buffer (callers get a copy); a prefill into memory
        # ONNX Runtime allocates (its arena: a fresh numpy array of S x vocab costs ~15% in page faults at
        # batch 8 x 2000 tokens), handed out as numpy views, without a copy.
        logits = self._decode_logits[:batch] if seq == 1 and keep == 1 else None
        key = (pointers[0][0], batch) if reuse and logits is not None else None
        io = self._bindings.get(key) if key else None
        if io is None:
            io = self._bind(pointers, batch, keep, logits)
            if key:
                self._bindings[key] = io
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(ATTENTION_MASK, mask)
        self.session.run_with_iobinding(io)
        return logits if logits is not None else io.get_outputs()[0].numpy()

    def _bind(self, pointers, batch: int, keep: int, logits: np.ndarray | None):
        c = self.config
        io = self.session.io_binding()
        if self._logits_to_keep is not None:
            if keep not in self._logits_to_keep:
                import onnxruntime as ort

                self._logits_to_keep[keep] = ort.OrtValue.ortvalue_from_numpy(np.asarray([keep], dtype=np.int64))
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._logits_to_keep[keep])
        if logits is not None:
            io.bind_output(LOGITS, "cpu", 0, self._np_dtype, list(logits.shape), logits.ctypes.data)
        else:
            io.bind_output(LOGITS, "cpu")  # bound first: get_outputs()[0] is the logits
        device, device_id = self._device
        shape = [batch, c.num_key_value_heads, self.capacity, c.head_dim]
        for layer, (k, v) in enumerate(pointers):
            for kind, ptr in (("key", k), ("value", v)):
                io.bind_input(past_name(layer, kind), device, device_id, self._np_dtype, shape, ptr)
                io.bind_output(present_name(layer, kind), device, device_id, self._np_dtype, shape, ptr)
        return io

    def _check_room(self, total: int) -> None:
        if not self.windowed and total > self.capacity:
            raise UserError(f"a sequence of {total} tokens does not fit the cache of {self.capacity} positions "
                            "(the model has no sliding window); open the runtime with a larger capacity")


def _contiguous_runs(slots: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for s in slots:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose memory becomes resident a small page at a time, as it is written. numpy backs large
    arrays with transparent huge pages, so the few positions a short sequence writes in each (row, head) of a
    cache made whole 2 MiB pages resident: 15b int4 serving with --max-batch 4 held 1.56 GiB of KV cache after
    21 tokens a slot."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is None or nbytes == 0:
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, nbytes)  # anonymous: zeroed by the kernel page by page on first touch
    memory.madvise(advice)
    return np.frombuffer(memory, dtype).reshape(shape)


def _to_torch(array: np.ndarray, copied: bool = False) -> Tensor:
    """float32 logits the caller owns: a copy of the runtime's reused decode buffer, else (`copied`) a view."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32) if copied else np.array(array, dtype=np.float32))
