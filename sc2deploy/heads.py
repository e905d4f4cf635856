"""The reference model's other heads (sc2deploy/tasks.py): sequence and token classification, and the base
model's last_hidden_state, on the one body (model.Backbone) and the one attention contract.

forward(input_ids, attention_mask) takes what transformers' classes take: (B, S) ids and a 0/1 mask whose ones
are contiguous in each row (left padding, right padding or none). The contract's rows are right-padded
(attention.py), so each row is rotated left by its leading zeros before the body and back after it. A
left-padded row's real tokens thus sit at positions 0.. (transformers numbers them from their column: equal
under RoPE, up to rounding). Outputs at padded columns are not transformers' and mean nothing.

Sequence classification pools as transformers does: at the rightmost column whose id is not pad_token_id (a
prompt whose last token is pad_token_id is pooled at an earlier one, in transformers too), or at the last
column when pad_token_id is unset, where a batch of several rows is transformers' error. The score is applied
to the pooled rows only: the same numbers as scoring every position and pooling after.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sc2deploy.attention import rope_cache
from sc2deploy.checkpoint import TensorSource, load_weights
from sc2deploy.config import Config
from sc2deploy.model import Backbone, KVCache
from sc2deploy.tasks import (BASE_MODEL, HEAD_TASKS, NO_PAD_TOKEN_MESSAGE, SEQUENCE_CLASSIFICATION,
                             BatchWithoutPadToken, require_task)


def pooled_index(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """(B,) the column transformers pools each row at: the rightmost id that is not pad_token_id (the first
    column when every id is), or the last column without a pad_token_id."""
    batch, columns = input_ids.shape
    if pad_token_id is None:
        return torch.full((batch,), columns - 1, dtype=torch.int64, device=input_ids.device)
    position = torch.arange(columns, dtype=torch.int32, device=input_ids.device)
    return (position * (input_ids != pad_token_id).to(torch.int32)).argmax(-1).to(torch.int64)


def leading_padding(attention_mask: Tensor) -> Tensor:
    """(B,) the zeros before each row's first one: a left-padded row's padding, 0 for a right-padded row."""
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)


def _wrap(index: Tensor, columns: int) -> Tensor:
    """index modulo `columns` for -columns <= index < 2 * columns (no remainder by a symbolic size: it does not
    export)."""
    index = torch.where(index >= columns, index - columns, index)
    return torch.where(index < 0, index + columns, index)


def _rotate(x: Tensor, shift: Tensor) -> Tensor:
    """Row b of x (B, S, ...) rotated left by shift[b] columns (|shift| < S)."""
    columns = x.shape[1]
    index = _wrap(torch.arange(columns, device=x.device)[None, :] + shift[:, None], columns)
    if x.dim() == 3:
        index = index[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, index)


class _Heads(nn.Module):
    """What the heads share: the RoPE tables and the body's last_hidden_state of a first prompt."""

    config: Config
    cos_cache: Tensor
    sin_cache: Tensor

    def _init_rope(self, config: Config) -> None:
        cos, sin = rope_cache(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def _hidden(self, body: Backbone, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(last_hidden_state with each row rotated to right padding, the rotation of each row)."""
        c = self.config
        shift = leading_padding(attention_mask)
        weight = body.embed_tokens.weight
        empty = weight.new_zeros((input_ids.shape[0], c.num_key_value_heads, 0, c.head_dim))  # a first prompt
        past: KVCache = [(empty, empty)] * c.num_hidden_layers
        hidden, _ = body.hidden_states(_rotate(input_ids, shift), attention_mask, past, self.cos_cache, self.sin_cache)
        return hidden, shift


class Starcoder2Classifier(_Heads):
    """Starcoder2ForSequenceClassification or ForTokenClassification; parameter names equal the checkpoint's
    (model.*, score.*). forward: logits (B, num_labels) pooled, or (B, S, num_labels) per token."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.score = nn.Linear(config.hidden_size, len(config.head.labels), bias=config.head.score_bias)
        self._init_rope(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        head = self.config.head
        if head.architecture != SEQUENCE_CLASSIFICATION:
            hidden, shift = self._hidden(self.model, input_ids, attention_mask)
            return self.score(_rotate(hidden, -shift))
        if head.pad_token_id is None and not torch.compiler.is_exporting() and input_ids.shape[0] > 1:
            raise BatchWithoutPadToken(NO_PAD_TOKEN_MESSAGE)
        hidden, shift = self._hidden(self.model, input_ids, attention_mask)
        column = _wrap(pooled_index(input_ids, head.pad_token_id) - shift, input_ids.shape[1])
        pooled = hidden.gather(1, column[:, None, None].expand(-1, 1, hidden.shape[2]))[:, 0]
        return self.score(pooled)


class Starcoder2Base(Backbone, _Heads):
    """Starcoder2Model; parameter names equal its checkpoint's (embed_tokens.*, layers.*, norm.*).
    forward: last_hidden_state (B, S, hidden)."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.config = config
        self._init_rope(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden, shift = self._hidden(self, input_ids, attention_mask)
        return _rotate(hidden, -shift)


def head_model_class(config: Config) -> type[nn.Module]:
    require_task(config.head, HEAD_TASKS, "this config")
    return Starcoder2Base if config.head.architecture == BASE_MODEL else Starcoder2Classifier


def load_head_model(source: TensorSource, dtype: str = "fp32", device: torch.device | str | None = None) -> nn.Module:
    """The head model of `source` (a classifier or base-model checkpoint) on `device`, one tensor at a time."""
    from sc2deploy.checkpoint import CheckpointSource

    rerun = f"--checkpoint {source.folder}" if isinstance(source, CheckpointSource) else ""
    require_task(source.config.head, HEAD_TASKS, source.description, rerun)
    return load_weights(head_model_class(source.config), source, dtype, device)
