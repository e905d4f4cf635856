"""The Triton sliding-window GQA op on torch tensors: checks the inputs, makes the outputs, launches.

`launch` runs the fused kernel or the two-kernel path, optionally in place (present is past) and
counting the key blocks each tile visits; `sliding_window_gqa_triton` is a drop-in for
`sc2deploy.attention.sliding_window_gqa_reference`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sc2deploy.plugins import triton_kernel as kernels
from sc2deploy.plugins.tiling import KernelConfig, default_config
from sc2deploy.plugins.triton_launch import TRITON_DTYPES, attention_launch_params, rope_launch_params

__all__ = ["launch", "sliding_window_gqa_triton"]


def launch(
    query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor,
    seqlens_k: Tensor, total_sequence_length: Tensor, cos_cache: Tensor, sin_cache: Tensor,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    *, fused: bool = True, config: KernelConfig | None = None, present_key: Tensor | None = None,
    present_value: Tensor | None = None, count_visits: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The op; returns (output, present_key, present_value, visits).

    fused=True: one launch of `sliding_window_gqa_kernel`; False: `rope_cache_kernel` then the
    unfused attention. present_key/value: output buffers (default: new ones); passing
    past_key/past_value makes the call in place (no copy of the past; exact only under the
    condition in `triton_kernel`'s docstring). visits (count_visits=True): int32
    (B*Nkv*ceil(G/GT), ceil(S/QPB)), the key blocks each attention tile visited (compare with
    `tiling.expected_visits`).
    """
    batch, seq_len, q_width = query.shape
    if q_width % num_heads:
        raise ValueError(f"query width {q_width} is not a multiple of num_heads {num_heads}")
    head_dim = q_width // num_heads
    capacity = past_key.shape[2]
    if key.shape != (batch, seq_len, kv_num_heads * head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match the query")
    if past_key.shape != (batch, kv_num_heads, capacity, head_dim) or past_value.shape != past_key.shape:
        raise ValueError(f"past_key/value shape {tuple(past_key.shape)} is not (B, Nkv, C, H)")
    if query.dtype not in TRITON_DTYPES:
        raise TypeError(f"unsupported dtype {query.dtype}")
    for name, t in (("key", key), ("value", value), ("past_key", past_key), ("past_value", past_value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from the query dtype {query.dtype}")
    if cos_cache.shape[-1] * 2 != head_dim or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"cos/sin caches {tuple(cos_cache.shape)} do not match head_dim {head_dim}")
    if config is None:
        config = default_config(seq_len, num_heads, kv_num_heads, head_dim, query.dtype, fused=fused)

    device = query.device
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    past_key, past_value = past_key.contiguous(), past_value.contiguous()
    seqlens = seqlens_k.to(device=device, dtype=torch.int32).contiguous()
    total = total_sequence_length.to(device=device, dtype=torch.int32).reshape(())
    cos = cos_cache.to(device=device, dtype=torch.float32).contiguous()
    sin = sin_cache.to(device=device, dtype=torch.float32).contiguous()

    in_place = present_key is not None and present_key.data_ptr() == past_key.data_ptr()
    if present_value is not None and in_place != (present_value.data_ptr() == past_value.data_ptr()):
        raise ValueError("present_key and present_value must both alias the past, or neither")
    present_key = torch.empty_like(past_key) if present_key is None else present_key
    present_value = torch.empty_like(past_value) if present_value is None else present_value
    for name, t in (("present_key", present_key), ("present_value", present_value)):
        if t.shape != past_key.shape or t.dtype != past_key.dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor like past_key")

    output = torch.empty_like(query)
    attn = attention_launch_params(batch, seq_len, capacity, num_heads, kv_num_heads, head_dim, local_window_size,
                                   scale, config, query.dtype, fused=fused, copy_past=not in_place)
    visits = None
    if count_visits:
        visits = torch.full((attn["grid"][1], attn["query_tiles"]), -1, dtype=torch.int32, device=device)
    if batch == 0 or attn["grid"][0] == 0:
        return output, present_key, present_value, visits
    if fused:
        kernels.sliding_window_gqa_kernel[attn["grid"]](
            query, key, value, past_key, past_value, seqlens, total, cos, sin,
            seq_len, capacity,
            output, present_key, present_value,
            visits,
            num_warps=attn["num_warps"], num_stages=attn["num_stages"], **attn["constexprs"],
        )
        return output, present_key, present_value, visits
    q_rot, k_rot = torch.empty_like(query), torch.empty_like(key)
    rope = rope_launch_params(batch, seq_len, capacity, num_heads, kv_num_heads, head_dim, config,
                              copy_past=not in_place)
    kernels.rope_cache_kernel[rope["grid"]](
        query, key, value, past_key, past_value, seqlens, total, cos, sin,
        seq_len, capacity,
        q_rot, k_rot, present_key, present_value,
        num_warps=rope["num_warps"], num_stages=rope["num_stages"], **rope["constexprs"],
    )
    if seq_len:
        kernels.sliding_window_gqa_kernel[attn["grid"]](
            q_rot, k_rot, value, past_key, past_value, seqlens, total, None, None,
            seq_len, capacity,
            output, None, None,
            visits,
            num_warps=attn["num_warps"], num_stages=attn["num_stages"], **attn["constexprs"],
        )
    return output, present_key, present_value, visits


def sliding_window_gqa_triton(
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
    """Drop-in for `sc2deploy.attention.sliding_window_gqa_reference`: same arguments, same outputs."""
    out, present_key, present_value, _ = launch(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        num_heads, kv_num_heads, local_window_size, scale,
    )
    return out, present_key, present_value
