"""Runtimes of the other heads (sc2deploy/tasks.py): one prefill of a batch, no cache, behind one interface.

`forward` takes a batch as transformers' classes take it (input_ids and a 0/1 attention_mask, left or right
padding) and returns the graph's output in float32: pooled logits (B, num_labels), per-token logits
(B, S, num_labels) or last_hidden_state (B, S, hidden). `run` pads prompts of unequal lengths into one batch
with pad_token_id, as a transformers tokenizer would, and returns each prompt's part. The eager runtime is the
reference model (sc2deploy/heads.py); ONNX Runtime's is runtime/ort_heads.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from sc2deploy.config import Config
from sc2deploy.errors import UserError
from sc2deploy.tasks import NO_PAD_TOKEN_MESSAGE, SEQUENCE_TASK, BatchWithoutPadToken, Head

PADDING_SIDES = ("right", "left")


class HeadRuntime(ABC):
    name: str
    config: Config
    dtype: str

    @property
    def head(self) -> Head:
        return self.config.head

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The head's output (float32) for int64 input_ids and attention_mask of shape (B, S)."""
        check_batch(self.config, input_ids, attention_mask)
        return self._forward(input_ids, attention_mask)

    @abstractmethod
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """forward, after check_batch."""

    def run(self, prompts: Sequence[Sequence[int]], padding: str = "right") -> list[np.ndarray]:
        """Each prompt's output, from one batch padded on `padding` with pad_token_id (0 without one): pooled
        logits (num_labels,), or one row per token (n, num_labels or hidden)."""
        if not prompts:
            raise ValueError("run needs at least one prompt")
        for prompt in prompts:
            check_prompt(self.config, prompt)
        pad = self.head.pad_token_id
        ids, mask = pad_batch(prompts, 0 if pad is None else pad, padding)
        out = self.forward(ids, mask)
        if self.head.task == SEQUENCE_TASK:
            return list(out)
        return [out[row][mask[row].astype(bool)] for row in range(len(prompts))]

    def describe(self) -> dict:
        return {"runtime": self.name, "dtype": self.dtype, "task": self.head.task}


def pad_batch(prompts: Sequence[Sequence[int]], pad: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 of `prompts` padded with `pad` on `side` to the longest."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side {side!r} is not one of {PADDING_SIDES}")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        columns = slice(0, len(prompt)) if side == "right" else slice(width - len(prompt), width)
        ids[row, columns] = prompt
        mask[row, columns] = 1
    return ids, mask


def check_batch(config: Config, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
    """A batch the heads compute as transformers does: (B, S) ids in the vocabulary and S within the context, a
    0/1 mask with one run of ones per row (left, right or no padding), one row for a sequence classifier without
    a pad_token_id."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or 0 in input_ids.shape:
        raise UserError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must have the same "
                        "non-empty (batch, sequence) shape")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise UserError(f"the batch has {input_ids.shape[1]} columns, more than the model's context of "
                        f"{config.max_position_embeddings}; shorten it")
    if input_ids.min() < 0 or input_ids.max() >= config.vocab_size:
        bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)][0]
        raise UserError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    starts = np.diff(np.pad(attention_mask != 0, ((0, 0), (1, 0))).astype(np.int8), axis=1) == 1
    if not np.isin(attention_mask, (0, 1)).all() or (starts.sum(axis=1) != 1).any():
        raise UserError("attention_mask must be 0/1 with one run of ones per row (left, right or no padding)")
    if config.head.task == SEQUENCE_TASK and config.head.pad_token_id is None and input_ids.shape[0] > 1:
        raise BatchWithoutPadToken(NO_PAD_TOKEN_MESSAGE)  # transformers' rule: no row could be pooled


def check_prompt(config: Config, token_ids: Sequence[int]) -> None:
    """The prompt rules of the causal LM's runtimes (runtime/base.py): not empty, within the context and vocabulary."""
    if not token_ids:
        raise UserError("the prompt is empty; give at least one token")
    if len(token_ids) > config.max_position_embeddings:
        raise UserError(f"the prompt has {len(token_ids)} tokens, more than the model's context of "
                        f"{config.max_position_embeddings}; shorten it")
    bad = next((t for t in token_ids if not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


class EagerHeads(HeadRuntime):
    """The reference head model (sc2deploy/heads.py) on a checkpoint or random weights."""

    name = "eager"

    def __init__(self, source, dtype: str = "fp32", threads: int | None = None, device="cpu"):
        import torch

        from sc2deploy.heads import load_head_model

        if threads:
            torch.set_num_threads(threads)
        self.config, self.dtype, self.device = source.config, dtype, torch.device(device)
        self.model = load_head_model(source, dtype, self.device)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device),
                             torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device))
        return out.float().cpu().numpy()


def scores(logits: np.ndarray, function: str) -> np.ndarray:
    """transformers' pipelines' scores: softmax, sigmoid or the logits (regression), along the last axis."""
    x = logits.astype(np.float64)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if function == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x
