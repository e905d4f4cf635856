"""The sliding-window GQA contract: one function through which all StarCoder2 attention goes.

`sc2deploy::sliding_window_gqa` is a torch custom op with the semantics of ONNX Runtime's
`com.microsoft::GroupQueryAttention` (do_rotary=1, rotary_interleaved=0), so the export maps
it one to one, and the TensorRT plugin implements the same contract.

Inputs
  query           (B, S, Nq*H)   before RoPE
  key, value      (B, S, Nkv*H)  before RoPE
  past_key/value  (B, Nkv, C, H) the cache: rotated keys and values, C slots per row
  seqlens_k       int32 (B,)     total length of each row (past + new) minus one
  total_sequence_length          int32 scalar tensor, the attention_mask width
  cos_cache/sin_cache (max_pos, H/2) float32
Attributes: num_heads (Nq), kv_num_heads (Nkv), local_window_size (W; <= 0 means none), scale.

Rows (per-row lengths, right padding):
  * first prompt (S == total_sequence_length): row b has seqlens_k[b]+1 real tokens at
    positions 0.. of the S columns; the remaining columns are padding.
  * otherwise: row b already holds seqlens_k[b]+1-S positions and all S tokens are new, at the
    positions that follow (S > 1 with a past is a chunk of a longer prompt).
Attention: the query at position i sees the key at position j iff 0 <= i - j < W.
Cache: the key and value of position p live in slot p % C. With C >= the row's total that is
a plain linear cache (ONNX Runtime's layout); with W <= C it is a ring that never holds more
than C positions, so a 16,384-token context needs only W slots. Outputs:
  output (B, S, Nq*H) (zeros in padded columns), present_key/value (B, Nkv, C, H).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_cache", "sliding_window_gqa", "sliding_window_gqa_", "sliding_window_gqa_reference",
           "sliding_window_gqa_inplace_reference"]

QUERY_CHUNK = 512  # queries per block of attention scores in the reference


def rope_cache(head_dim: int, theta: float, max_positions: int,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_positions, head_dim/2) in float32, computed exactly as transformers does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).to(torch.float32)
    freqs = (inv_freq[:, None] @ positions[None, :]).t()
    return freqs.cos(), freqs.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX RoPE. x (B, N, S, H); cos/sin (B, S, H/2) float32, applied in x's dtype as transformers does."""
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _row_layout(seqlens_k: Tensor, seq_len: int, total_sequence_length: int) -> tuple[Tensor, Tensor]:
    """(past length per row, new real tokens per row) from the contract's row rules."""
    total = seqlens_k.to(torch.int64) + 1
    if seq_len == total_sequence_length:
        return torch.zeros_like(total), total
    return total - seq_len, torch.full_like(total, seq_len)


CacheWrites = tuple[Tensor, Tensor, Tensor, Tensor] | None  # (rows, slots, keys, values) to store


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total_sequence_length: Tensor,
    cos_cache: Tensor,
    sin_cache: Tensor,
    num_heads: int,
    kv_num_heads: int,
    local_window_size: int,
    scale: float,
) -> tuple[Tensor, CacheWrites]:
    """The contract's output in plain torch (scores, softmax and the weighted sum in float32), and the cache
    writes it implies; the caller applies them to a copy of the cache (functional) or to the cache itself."""
    batch, seq_len, _ = query.shape
    head_dim = query.shape[-1] // num_heads
    capacity = past_key.shape[2]
    groups = num_heads // kv_num_heads
    past_len, n_new = _row_layout(seqlens_k, seq_len, int(total_sequence_length))
    if bool((past_len < 0).any()):
        raise ValueError(f"seqlens_k {seqlens_k.tolist()} is shorter than the {seq_len} new tokens of a chunk with a past")

    device = query.device
    columns = torch.arange(seq_len, device=device)
    q_pos = past_len[:, None] + columns  # (B, S)
    q_real = columns[None, :] < n_new[:, None]
    safe_pos = torch.where(q_real, q_pos, 0)
    cos, sin = cos_cache[safe_pos], sin_cache[safe_pos]

    q = _rotate(query.view(batch, seq_len, num_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(key.view(batch, seq_len, kv_num_heads, head_dim).transpose(1, 2), cos, sin)
    v = value.view(batch, seq_len, kv_num_heads, head_dim).transpose(1, 2)

    # Cached slots hold the latest position p < past_len with p % C == slot (none if p < 0).
    # Only the slots a row can have written are visited: a short row in a big ring costs little.
    used = min(capacity, int(past_len.max()))
    slots = torch.arange(used, device=device)
    slot_pos = past_len[:, None] - 1 - torch.remainder(past_len[:, None] - 1 - slots, capacity)
    keys = torch.cat((past_key[:, :, :used], k), dim=2)
    values = torch.cat((past_value[:, :, :used], v), dim=2)
    k_pos = torch.cat((slot_pos, q_pos), dim=1)  # (B, used + S)
    k_real = torch.cat((slot_pos >= 0, q_real), dim=1)

    qf = q.float().view(batch, kv_num_heads, groups, seq_len, head_dim)
    kf, vf = keys.float().unsqueeze(2), values.float().unsqueeze(2)  # (B, Nkv, 1, T, H)
    out = torch.empty(batch, kv_num_heads, groups, seq_len, head_dim, device=device)
    for start in range(0, seq_len, QUERY_CHUNK):  # bounds the (S, T) scores of long prompts
        end = min(start + QUERY_CHUNK, seq_len)
        distance = q_pos[:, start:end, None] - k_pos[:, None, :]  # (B, s, T)
        visible = k_real[:, None, :] & (distance >= 0)
        if local_window_size > 0:
            visible &= distance < local_window_size
        scores = qf[:, :, :, start:end] @ kf.transpose(-1, -2) * scale  # (B, Nkv, G, s, T)
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        # a padded query row sees no key: its softmax is 0/0, made 0 here (not nan_to_num: a NaN from the
        # weights must stay NaN, as in transformers)
        probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1)[:, None, None, :, None], 0.0)
        out[:, :, :, start:end] = probs @ vf
    out = out.view(batch, num_heads, seq_len, head_dim).transpose(1, 2).reshape(batch, seq_len, -1)
    out = out.masked_fill(~q_real[:, :, None], 0.0).to(query.dtype)

    if not capacity:
        return out, None
    total = past_len + n_new
    kept = q_real & (q_pos >= (total - capacity)[:, None])  # the last C positions of each row
    rows, cols = kept.nonzero(as_tuple=True)
    slot = torch.remainder(q_pos[rows, cols], capacity)
    return out, (rows, slot, k[rows, :, cols], v[rows, :, cols])


def _write(past_key: Tensor, past_value: Tensor, writes: CacheWrites) -> None:
    if writes is not None:
        rows, slot, k, v = writes
        past_key[rows, :, slot] = k.to(past_key.dtype)
        past_value[rows, :, slot] = v.to(past_value.dtype)


def sliding_window_gqa_reference(
    query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor,
    total_sequence_length: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int, kv_num_heads: int,
    local_window_size: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The contract in plain torch, functional: (output, present_key, present_value), the past untouched."""
    out, writes = _attend(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                          sin_cache, num_heads, kv_num_heads, local_window_size, scale)
    present_key, present_value = past_key.clone(), past_value.clone()
    _write(present_key, present_value, writes)
    return out, present_key, present_value


def sliding_window_gqa_inplace_reference(
    query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor,
    total_sequence_length: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int, kv_num_heads: int,
    local_window_size: int, scale: float,
) -> Tensor:
    """The contract with the cache updated in place: past_key/past_value become the presents."""
    out, writes = _attend(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                          sin_cache, num_heads, kv_num_heads, local_window_size, scale)
    _write(past_key, past_value, writes)
    return out


@torch.library.custom_op("sc2deploy::sliding_window_gqa", mutates_args=())
def sliding_window_gqa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total_sequence_length: Tensor,
    cos_cache: Tensor,
    sin_cache: Tensor,
    num_heads: int,
    kv_num_heads: int,
    local_window_size: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return sliding_window_gqa_reference(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
        cos_cache, sin_cache, num_heads, kv_num_heads, local_window_size, scale,
    )


@sliding_window_gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
      cos_cache, sin_cache, num_heads, kv_num_heads, local_window_size, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("sc2deploy::sliding_window_gqa_", mutates_args=("past_key", "past_value"))
def sliding_window_gqa_(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total_sequence_length: Tensor,
    cos_cache: Tensor,
    sin_cache: Tensor,
    num_heads: int,
    kv_num_heads: int,
    local_window_size: int,
    scale: float,
) -> Tensor:
    """sliding_window_gqa writing the new keys and values into past_key/past_value (the eager runtime's cache)
    instead of returning updated copies: one contract, two call forms; the export uses the functional one."""
    return sliding_window_gqa_inplace_reference(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
        cos_cache, sin_cache, num_heads, kv_num_heads, local_window_size, scale,
    )


@sliding_window_gqa_.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
      cos_cache, sin_cache, num_heads, kv_num_heads, local_window_size, scale):
    return torch.empty_like(query)
