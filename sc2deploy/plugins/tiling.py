"""How the sliding-window GQA kernels tile the work: block sizes and which key blocks a tile visits.

Plain Python (torch only for dtypes and tensors, no triton), so TensorRT's aot_impl and the tests
can use it anywhere. `KernelConfig` holds the block sizes (`default_config` picks one; an autotune
hook can sweep). An attention tile packs `group_tile` query heads of one kv head and
block_m // group_tile query columns (see `triton_kernel`). `key_block_range` is the specification
of the key blocks a tile visits, which the kernels compute the same way; `expected_visits`
predicts from it what `triton_attention.launch(..., count_visits=True)` counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["KernelConfig", "default_config", "expected_visits", "key_block_range"]

# Tunable defaults (an `autotune` hook picks among KernelConfig values).
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 64
DECODE_BLOCK_N = 64
ROPE_BLOCK_S = 16
COPY_BLOCK = 64


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch knobs; block_m, block_n, rope_block_s, copy_block: powers of two >= 16.

    group_tile: query heads of one kv head packed into an attention tile (None: all G, capped
    at block_m); block_m // group_tile query columns share each K/V block.
    """

    block_m: int = PREFILL_BLOCK_M
    block_n: int = PREFILL_BLOCK_N
    group_tile: int | None = None
    num_warps: int = 8
    num_stages: int = 2
    rope_block_s: int = ROPE_BLOCK_S
    copy_block: int = COPY_BLOCK
    rope_num_warps: int = 4

    def resolved_group_tile(self, groups: int) -> int:
        gt = groups if self.group_tile is None else self.group_tile
        return max(1, min(gt, groups, self.block_m))

    def columns_per_tile(self, groups: int) -> int:
        return self.block_m // self.resolved_group_tile(groups)

    def replace(self, **changes: Any) -> KernelConfig:
        return replace(self, **changes)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_config(seq_len: int, num_heads: int, kv_num_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float16, *, fused: bool = True) -> KernelConfig:
    """An untuned config: decode packs all G query heads of a kv head in one tile.

    Checked by compiling for sm_90 with ptxas (H=128, Nq/Nkv 48/4), all without register spills:
    fused decode (16, 32) 8 warps, fused prefill (64, 32) 8 warps; unfused decode (16, 64) 4
    warps, unfused prefill (128, 64) 8 warps (the TensorRT decode and prefill tactics). The
    fused kernel's in-loop RoPE of new keys needs the smaller key blocks (with 64 it spills).
    fp32 (tests) uses small tiles: (64, 64) fp32 spills and wants > 100 KiB of shared memory.
    """
    groups = num_heads // kv_num_heads
    if dtype == torch.float32:
        return KernelConfig(block_m=min(64, max(16, _next_pow2(groups))), block_n=32, num_warps=4, num_stages=1)
    if seq_len <= 4:
        block_m = min(128, max(16, _next_pow2(groups * seq_len)))
        if fused or head_dim > 128:
            return KernelConfig(block_m=block_m, block_n=32, num_warps=8, num_stages=2)
        return KernelConfig(block_m=block_m, block_n=DECODE_BLOCK_N, num_warps=4, num_stages=3)
    if fused:
        return KernelConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return KernelConfig(block_m=128, block_n=PREFILL_BLOCK_N, num_warps=4, num_stages=3)
    return KernelConfig(block_m=PREFILL_BLOCK_M, block_n=PREFILL_BLOCK_N, num_warps=8, num_stages=2)


def key_block_range(q_start: int, q_end: int, window: int, block: int, lowest: int = 0,
                    highest: int | None = None) -> tuple[int, int]:
    """Key blocks [first, end) that queries at positions [q_start, q_end) must visit.

    Keys are blocked by coordinate (block b = keys [b*block, (b+1)*block)). A query at i sees
    keys j in [i - window + 1, i] (window <= 0: [0, i]); only keys in [lowest, highest) exist
    (highest=None: no bound but causality). Nothing to visit gives first == end. The kernel
    uses the same arithmetic (`triton_kernel._key_block_range`); this function is the
    specification its block visits are tested against.
    """
    lo = max(lowest, 0)
    if window > 0:
        lo = max(lo, q_start - window + 1)
    hi = q_end if highest is None else min(q_end, highest)
    first = lo // block
    if q_end <= q_start or hi <= lo:
        return first, first
    return first, (hi + block - 1) // block


def expected_visits(seqlens_k: Tensor, seq_len: int, total_sequence_length: int, capacity: int, window: int,
                    num_heads: int, kv_num_heads: int, config: KernelConfig) -> Tensor:
    """Host-side prediction of `launch(..., count_visits=True)`'s visits, from `key_block_range` alone."""
    groups = num_heads // kv_num_heads
    gt = config.resolved_group_tile(groups)
    qpb = config.block_m // gt
    ngt = math.ceil(groups / gt)
    n_tiles = math.ceil(seq_len / qpb)
    rows = []
    for total in (seqlens_k.to(torch.int64) + 1).tolist():
        past_len, n_new = (0, total) if seq_len == total_sequence_length else (total - seq_len, seq_len)
        lowest = max(past_len - capacity, 0)
        counts = []
        for i in range(n_tiles):
            q_start, q_end = past_len + i * qpb, past_len + min(i * qpb + qpb, n_new)
            a, b = key_block_range(q_start, q_end, window, config.block_n, lowest, past_len)
            c, e = key_block_range(q_start - past_len, q_end - past_len, window, config.block_n, 0, n_new)
            counts.append((b - a) + (e - c))
        rows.extend([counts] * (kv_num_heads * ngt))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, n_tiles)
