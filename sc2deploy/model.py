"""The reference StarCoder2 in PyTorch: the truth every runtime is checked against.

forward(input_ids, attention_mask, past_key_values) follows the I/O convention of
onnxruntime-genai and optimum: attention_mask is (B, total_sequence) and only its row sums
matter (the number of real tokens per row, past and new); past_key_values are per-layer
(key, value) caches of shape (B, Nkv, C, H). See attention.py for the row and cache rules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sc2deploy.attention import rope_cache, sliding_window_gqa, sliding_window_gqa_
from sc2deploy.config import Config

KVCache = list[tuple[Tensor, Tensor]]


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        bias = config.use_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor], seqlens_k: Tensor, total: Tensor,
                cos: Tensor, sin: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """in_place: write the new keys and values into `past` (which then are the presents) instead of
        returning updated copies of it."""
        c = self.config
        args = (self.q_proj(x), self.k_proj(x), self.v_proj(x), past[0], past[1], seqlens_k, total, cos, sin,
                c.num_attention_heads, c.num_key_value_heads, c.sliding_window or 0, c.head_dim**-0.5)
        if in_place:
            return self.o_proj(sliding_window_gqa_(*args)), past[0], past[1]
        out, present_key, present_value = sliding_window_gqa(*args)
        return self.o_proj(out), present_key, present_value


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past, seqlens_k, total, cos, sin, in_place: bool = False):
        attn, present_key, present_value = self.self_attn(self.input_layernorm(x), past, seqlens_k, total, cos, sin,
                                                          in_place)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_key, present_value


class Backbone(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, past_key_values: KVCache, cos: Tensor,
                      sin: Tensor, in_place: bool = False) -> tuple[Tensor, KVCache]:
        """The body with the I/O convention of Starcoder2.forward: (the final LayerNorm's output, the caches)."""
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        total = torch.scalar_tensor(attention_mask.shape[1], dtype=torch.int32, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        presents: KVCache = []
        for layer, past in zip(self.layers, past_key_values):
            x, present_key, present_value = layer(x, past, seqlens_k, total, cos, sin, in_place)
            presents.append((present_key, present_value))
        return self.norm(x), presents


class Starcoder2(nn.Module):
    """Parameter names equal the Hugging Face checkpoint's (model.*, lm_head.weight)."""

    cos_cache: Tensor  # buffers, registered in __init__
    sin_cache: Tensor

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_cache(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    @property
    def head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def empty_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        weight = self.model.embed_tokens.weight
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        return [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past_key_values: KVCache, *,
                in_place: bool = False, logits_to_keep: int = 0) -> tuple[Tensor, KVCache]:
        """in_place: update past_key_values in place (the eager runtime's cache; the export traces the
        functional form). logits_to_keep: the logits of the last this many columns only (0: all), as in
        transformers, which spares a prefill the vocabulary projection of every position."""
        hidden, presents = self.model.hidden_states(input_ids, attention_mask, past_key_values, self.cos_cache,
                                                    self.sin_cache, in_place)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.head_weight)
        return logits, presents
