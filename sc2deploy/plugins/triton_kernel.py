"""Sliding-window GQA (the `sc2deploy.attention` contract) in Triton.

Kernels (all parameters declared in the calling convention of a TensorRT
`tensorrt.plugin.aot_impl` kernel: input pointers..., int32 scalars..., output pointers...;
attributes and block sizes are constexprs, baked into the PTX as an AOT plugin needs):

* two-kernel path: `rope_cache_kernel` (q_rot, k_rot and the present cache) then
  `sliding_window_gqa_kernel` with FUSED=False (attention of q_rot over past slots + k_rot;
  cos/sin/present passed as None, so they drop out of its signature). These are the kernels of
  the two TensorRT plugins, RopeCache and SlidingWindowGQA (`trt_rules`; an aot_impl embeds
  one kernel per plugin), and the fast prefill: larger key blocks fit without in-loop RoPE.
* `sliding_window_gqa_kernel` with FUSED=True: the whole op in ONE launch -- NeoX RoPE of q
  (per tile) and of the new keys (on the fly, in the key loop, so every query tile rotates
  every key block it visits), windowed flash attention, and the present cache. One launch, but
  its prefill is several times slower (H200, S=4,096: 4.3 ms against 0.84 ms), and nothing
  deploys it: the TensorRT plugins and runtime/cuda.py prefill with the two-kernel path, and
  decode goes through the plugins or `triton_decode`. `launch`'s default, compared by `gpu_check`.

Attention: program (i, j) owns kv head `kvh` of row `b` and a tile of BLOCK_M rows, row m =
(query column i*QPB + m // GT, query head kvh*G + gt*GT + m % GT), G = Nq/Nkv, GT = group_tile
heads packed per tile, QPB = BLOCK_M // GT columns: every K/V block loaded serves GT heads (a
decode reads each kv head's cache once, not G times). Keys come in two phases: past keys from
`past_key/value` (ring slot p % C for p in [max(0, past_len - C), past_len)), then the new keys
(columns of key/k_rot); in each phase only the blocks `key_block_range` returns -- those that
intersect [first query - W + 1, last query] -- are visited, so a prefill costs O(S * (W + QPB)),
not O(S^2). Online softmax in fp32 (running max / running sum, exp2); QK^T and P@V accumulate in
fp32, P is rounded to the value dtype for the 16-bit tensor-core dot (as flash attention does);
fp32 inputs use IEEE fp32 dots (no TF32).

Ring cache, exactly as the reference: attention reads the past from `past_key/value` and the
new keys from the inputs (never from the cache being written), and only each row's last C
positions are written to present at slot p % C. So every case is exact -- chunks longer than
the ring, first prompts longer than C, rings smaller than the window.
  * present != past (default): the untouched past slots are copied to present by extra
    programs along grid axis 0 (ceil(C / copy_block) of them per (row, kv head)); no races.
  * in place, present is past (`launch(..., present_key=past_key, present_value=past_value)`,
    the shared-buffer mode): no copy. Exact only when no slot written by the call holds a key
    one of its queries still sees: C >= W + S - 1 (windowed; always true for a decode with
    C >= W), or C >= every row's total length (linear cache, or W <= 0). The caller
    guarantees it (lengths live on the device and are not checked).

Layouts (all contiguous; strides come from S, C and the head constexprs, as for a TensorRT
plugin's linear tensors): query, q_rot, output (B, S, Nq*H); key, value, k_rot (B, S, Nkv*H);
past/present (B, Nkv, C, H); seqlens_k int32 (B,); total_sequence_length int32 (); cos/sin
(max_pos, H/2) float32. q_rot/k_rot keep the input layout: a tile's G heads of one column are
contiguous. The cache dtype must equal the query dtype.

Numerics: RoPE as the reference does it (cos/sin cast to the input dtype, each multiply and
the add rounded to it), so rotated keys and the present cache are bit-identical to the
reference under the interpreter (on a GPU, fp32 may differ by an ulp through FMA contraction).

Launch helpers: `attention_launch_params` / `rope_launch_params` give grid, num_warps,
num_stages and constexprs using only + * // on the sizes (so symbolic sizes work);
`aot_signature` and `compile_aot` build the PTX without a GPU (checked for sm_90 in the tests).
Block sizes live in `KernelConfig` (`default_config` picks one; an autotune hook can sweep).

`triton` is imported only here. TRITON_INTERPRET=1 (read when this module is imported) runs
the kernels on CPU tensors. The interpreter stores bf16 as uint16 and gets bf16 arithmetic
and fp32->bf16 rounding wrong, so with INTERPRETER (set automatically) the kernels do 16-bit
dots on fp32 copies and round to bf16 by hand (RNE): the same values as on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRET",
    "KernelConfig",
    "aot_signature",
    "attention_launch_params",
    "compile_aot",
    "default_config",
    "expected_visits",
    "key_block_range",
    "launch",
    "rope_cache_kernel",
    "rope_launch_params",
    "sliding_window_gqa_kernel",
    "sliding_window_gqa_triton",
]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""

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
    uses the same arithmetic (`_key_block_range`); this function is the specification its
    block visits are tested against.
    """
    lo = max(lowest, 0)
    if window > 0:
        lo = max(lo, q_start - window + 1)
    hi = q_end if highest is None else min(q_end, highest)
    first = lo // block
    if q_end <= q_start or hi <= lo:
        return first, first
    return first, (hi + block - 1) // block


# --------------------------------------------------------------------------------------------
# Triton code
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_block_range(q_start, q_end, lowest, highest, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    lo = tl.maximum(lowest, 0)
    if WINDOW > 0:
        lo = tl.maximum(lo, q_start - WINDOW + 1)
    hi = tl.minimum(q_end, highest)
    first = lo // BLOCK
    end = tl.where((q_end > q_start) & (hi > lo), (hi + BLOCK - 1) // BLOCK, first)
    return first, end


@triton.jit
def _cast(x, dt: tl.constexpr, INTERPRETER: tl.constexpr):
    """x.to(dt), rounding to nearest even also in the interpreter (whose fp32->bf16 truncates)."""
    if INTERPRETER and dt == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dt)
    return x.to(dt)


@triton.jit
def _load_rotated(row_ptrs, pos, mask, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr, INTERPRETER: tl.constexpr):
    """Rows (R, HEAD_DIM) at row_ptrs with NeoX RoPE at positions pos, in the input dtype.

    x*cos + rotate_half(x)*sin with cos/sin cast to x's dtype and each op rounded to it, as
    the reference (transformers) does; rotate_half is a second load of the partner half.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    m2 = mask[:, None]
    x = tl.load(row_ptrs[:, None] + d[None, :], mask=m2, other=0.0)
    xp = tl.load(row_ptrs[:, None] + ((d + HALF) % HEAD_DIM)[None, :], mask=m2, other=0.0)
    cs = pos[:, None] * HALF + (d % HALF)[None, :]
    cos = tl.load(cos_ptr + cs, mask=m2, other=0.0)
    sin = tl.load(sin_ptr + cs, mask=m2, other=0.0)
    dt: tl.constexpr = x.dtype
    cos = _cast(cos, dt, INTERPRETER).to(tl.float32)
    sin = _cast(sin, dt, INTERPRETER).to(tl.float32)
    xp = xp.to(tl.float32)
    rot = tl.where((d < HALF)[None, :], -xp, xp)
    a = _cast(x.to(tl.float32) * cos, dt, INTERPRETER).to(tl.float32)
    c = _cast(rot * sin, dt, INTERPRETER).to(tl.float32)
    return _cast(a + c, dt, INTERPRETER)


@triton.jit
def _row_layout(seqlens_ptr, total_ptr, b, seq_len):
    """(total, past_len, n_new) of row b, as the contract's _row_layout."""
    total_cols = tl.load(total_ptr)
    row_total = tl.load(seqlens_ptr + b) + 1
    first_prompt = seq_len == total_cols
    past_len = tl.where(first_prompt, 0, row_total - seq_len)
    n_new = tl.where(first_prompt, row_total, seq_len)
    return row_total, past_len, n_new


@triton.jit
def _copy_untouched_slots(past_k_ptr, past_v_ptr, present_k_ptr, present_v_ptr, chunk, past_len, row_total,
                          capacity, HEAD_DIM: tl.constexpr, COPY_BLOCK: tl.constexpr):
    """present[slot] = past[slot] for slots [chunk*COPY_BLOCK, +COPY_BLOCK) this call does not write.

    Pointers are at the (row, kv head) slab. Written slots: the ring interval starting at
    kept_lo % C of the row's kept new positions [kept_lo, row_total).
    """
    cap_safe = tl.maximum(capacity, 1)
    kept_lo = tl.maximum(past_len, row_total - capacity)
    n_kept = row_total - kept_lo
    kept_slot = kept_lo % cap_safe
    d = tl.arange(0, HEAD_DIM)
    slot = chunk * COPY_BLOCK + tl.arange(0, COPY_BLOCK)
    written = (slot - kept_slot + cap_safe) % cap_safe < n_kept
    ok = (slot < capacity) & ~written
    ptrs = slot[:, None] * HEAD_DIM + d[None, :]
    tl.store(present_k_ptr + ptrs, tl.load(past_k_ptr + ptrs, mask=ok[:, None]), mask=ok[:, None])
    tl.store(present_v_ptr + ptrs, tl.load(past_v_ptr + ptrs, mask=ok[:, None]), mask=ok[:, None])


@triton.jit
def rope_cache_kernel(
    # inputs
    q_ptr, k_ptr, v_ptr, past_k_ptr, past_v_ptr, seqlens_ptr, total_ptr, cos_ptr, sin_ptr,
    # int32 scalars
    seq_len, capacity,
    # outputs
    q_rot_ptr, k_rot_ptr, present_k_ptr, present_v_ptr,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, COPY_BLOCK: tl.constexpr, COPY_PAST: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """grid (ceil(S/BLOCK_S) + [COPY_PAST] ceil(C/COPY_BLOCK), Nq + Nkv, B).

    Axis 1 < Nq: rotate query head; else kv head (axis 1 - Nq): rotate k, write k_rot and the
    kept present slots; with COPY_PAST, programs past the column tiles copy the untouched slots.
    """
    pid_s = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    row_total, past_len, n_new = _row_layout(seqlens_ptr, total_ptr, b, seq_len)
    cap_safe = tl.maximum(capacity, 1)
    d = tl.arange(0, HEAD_DIM)
    n_col_tiles = tl.cdiv(seq_len, BLOCK_S)

    c = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    real = c < n_new  # (copy-only programs have c >= S >= n_new)
    pos = past_len + c
    if head < NUM_HEADS:
        rows = ((b64 * seq_len + c) * NUM_HEADS + head) * HEAD_DIM
        x = _load_rotated(q_ptr + rows, pos, real, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
        tl.store(q_rot_ptr + rows[:, None] + d[None, :], x, mask=real[:, None])
    else:
        kvh = head - NUM_HEADS
        cache_base = (b64 * KV_HEADS + kvh) * capacity * HEAD_DIM
        rows = ((b64 * seq_len + c) * KV_HEADS + kvh) * HEAD_DIM
        x = _load_rotated(k_ptr + rows, pos, real, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
        tl.store(k_rot_ptr + rows[:, None] + d[None, :], x, mask=real[:, None])
        keep = real & (pos >= row_total - capacity)  # the row's last C positions
        slots = cache_base + (pos % cap_safe).to(tl.int64) * HEAD_DIM
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        tl.store(present_k_ptr + slots[:, None] + d[None, :], x, mask=keep[:, None])
        tl.store(present_v_ptr + slots[:, None] + d[None, :], v, mask=keep[:, None])
        if COPY_PAST:
            if pid_s >= n_col_tiles:
                _copy_untouched_slots(past_k_ptr + cache_base, past_v_ptr + cache_base, present_k_ptr + cache_base,
                                      present_v_ptr + cache_base, pid_s - n_col_tiles, past_len, row_total,
                                      capacity, HEAD_DIM, COPY_BLOCK)


@triton.jit
def _attend(q, k, v, q_pos, kpos, key_ok, q_real, m_i, l_i, acc, QK_SCALE: tl.constexpr,
            WINDOW: tl.constexpr, INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of a query tile over a key block (fp32 statistics, exp2)."""
    if INTERPRETER:
        s = tl.dot(q, tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    dist = q_pos[:, None] - kpos[None, :]
    visible = q_real[:, None] & key_ok[None, :] & (dist >= 0)
    if WINDOW > 0:
        visible = visible & (dist < WINDOW)
    s = tl.where(visible, s * QK_SCALE, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if INTERPRETER:
        acc += tl.dot(_cast(p, v.dtype, INTERPRETER).to(tl.float32), v.to(tl.float32))
    else:
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def sliding_window_gqa_kernel(
    # inputs
    q_ptr, k_ptr, v_ptr, past_k_ptr, past_v_ptr, seqlens_ptr, total_ptr, cos_ptr, sin_ptr,
    # int32 scalars
    seq_len, capacity,
    # outputs
    out_ptr, present_k_ptr, present_v_ptr,
    # debug output (None in production: a constexpr)
    visits_ptr,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    WINDOW: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_TILE: tl.constexpr, COPY_BLOCK: tl.constexpr,
    FUSED: tl.constexpr, COPY_PAST: tl.constexpr, INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Windowed flash attention; with FUSED, the whole op in one launch.

    FUSED=False: q = q_rot, k = k_rot (from `rope_cache_kernel`), v = value; cos/sin/present
    are None. grid (ceil(S/QPB), B * Nkv * ceil(G/GT)).
    FUSED=True: q = query, k = key (raw; RoPE applied on the fly, on the new keys in the key
    loop), plus the present cache: each tile writes its own columns' kept positions; with
    COPY_PAST, ceil(C/COPY_BLOCK) extra programs along axis 0 copy the untouched past slots.
    grid (ceil(S/QPB) + [COPY_PAST] ceil(C/COPY_BLOCK), B * Nkv * ceil(G/GT)).
    """
    G: tl.constexpr = NUM_HEADS // KV_HEADS
    NGT: tl.constexpr = (G + GROUP_TILE - 1) // GROUP_TILE
    QPB: tl.constexpr = BLOCK_M // GROUP_TILE
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_h // (KV_HEADS * NGT)
    kvh = (pid_h // NGT) % KV_HEADS
    gt = pid_h % NGT
    b64 = b.to(tl.int64)
    row_total, past_len, n_new = _row_layout(seqlens_ptr, total_ptr, b, seq_len)
    lowest = tl.maximum(past_len - capacity, 0)  # oldest past position the ring holds
    cap_safe = tl.maximum(capacity, 1)
    n_q_tiles = tl.cdiv(seq_len, QPB)
    d = tl.arange(0, HEAD_DIM)
    # 64-bit scalar bases, 32-bit offsets inside one (row, kv head) slab: small pointer tensors.
    cache_base = (b64 * KV_HEADS + kvh) * capacity * HEAD_DIM
    past_k_ptr += cache_base
    past_v_ptr += cache_base
    new_base = (b64 * seq_len * KV_HEADS + kvh) * HEAD_DIM
    k_ptr += new_base
    v_ptr += new_base
    if FUSED:
        present_k_ptr += cache_base
        present_v_ptr += cache_base

    if pid_m < n_q_tiles:
        m = tl.arange(0, BLOCK_M)
        col = pid_m * QPB + m // GROUP_TILE
        g = gt * GROUP_TILE + m % GROUP_TILE
        row_ok = (m < QPB * GROUP_TILE) & (col < seq_len) & (g < G)
        q_real = row_ok & (col < n_new)
        q_pos = past_len + col
        q_ptr += b64 * seq_len * NUM_HEADS * HEAD_DIM
        out_ptr += b64 * seq_len * NUM_HEADS * HEAD_DIM
        q_rows = (col * NUM_HEADS + kvh * G + g) * HEAD_DIM
        if FUSED:
            q = _load_rotated(q_ptr + q_rows, q_pos, q_real, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
        else:
            q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_real[:, None], other=0.0)
        if INTERPRETER:
            q = q.to(tl.float32)

        q_first = past_len + pid_m * QPB
        q_end = past_len + tl.minimum(pid_m * QPB + QPB, n_new)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        visits = 0

        # Past keys: absolute positions [lowest, past_len), ring slot = position % C.
        kb_first, kb_end = _key_block_range(q_first, q_end, lowest, past_len, WINDOW, BLOCK_N)
        for kb in range(kb_first, kb_end):
            kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = (kpos >= lowest) & (kpos < past_len)
            ptrs = (kpos % cap_safe)[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(past_k_ptr + ptrs, mask=ok[:, None], other=0.0)
            v = tl.load(past_v_ptr + ptrs, mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _attend(q, k, v, q_pos, kpos, ok, q_real, m_i, l_i, acc,
                                    QK_SCALE, WINDOW, INTERPRETER, DOT_PRECISION)
            visits += 1

        # New keys: columns [0, n_new) of key (rotated here) or k_rot, position past_len + column.
        cb_first, cb_end = _key_block_range(q_first - past_len, q_end - past_len, 0, n_new, WINDOW, BLOCK_N)
        for cb in range(cb_first, cb_end):
            kc = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = kc < n_new
            rows = kc * (KV_HEADS * HEAD_DIM)
            if FUSED:
                k = _load_rotated(k_ptr + rows, past_len + kc, ok, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
            else:
                k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _attend(q, k, v, q_pos, past_len + kc, ok, q_real, m_i, l_i, acc,
                                    QK_SCALE, WINDOW, INTERPRETER, DOT_PRECISION)
            visits += 1

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = tl.where(q_real[:, None], acc / l_safe[:, None], 0.0)  # padded columns: zeros
        tl.store(out_ptr + q_rows[:, None] + d[None, :], _cast(o, out_ptr.dtype.element_ty, INTERPRETER),
                 mask=row_ok[:, None])
        if visits_ptr is not None:
            tl.store(visits_ptr + pid_h * n_q_tiles + pid_m, visits)

        if FUSED:
            if gt == 0:  # this tile's columns that are among the row's last C positions
                c = pid_m * QPB + m
                c_pos = past_len + c
                keep = (m < QPB) & (c < n_new) & (c_pos >= row_total - capacity)
                rows = c * (KV_HEADS * HEAD_DIM)
                slots = (c_pos % cap_safe) * HEAD_DIM
                k_rot = _load_rotated(k_ptr + rows, c_pos, keep, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
                v_new = tl.load(v_ptr + rows[:, None] + d[None, :], mask=keep[:, None], other=0.0)
                tl.store(present_k_ptr + slots[:, None] + d[None, :], k_rot, mask=keep[:, None])
                tl.store(present_v_ptr + slots[:, None] + d[None, :], v_new, mask=keep[:, None])
    else:
        if FUSED and COPY_PAST:
            if gt == 0:  # copy the past slots this call does not overwrite
                _copy_untouched_slots(past_k_ptr, past_v_ptr, present_k_ptr, present_v_ptr, pid_m - n_q_tiles,
                                      past_len, row_total, capacity, HEAD_DIM, COPY_BLOCK)


# --------------------------------------------------------------------------------------------
# Launch helpers (shared with a TensorRT aot_impl; sizes may be symbolic: only + * // are used)
# --------------------------------------------------------------------------------------------


def _check_config(num_heads: int, kv_num_heads: int, head_dim: int, config: KernelConfig) -> None:
    if kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    for name in ("block_m", "block_n", "rope_block_s", "copy_block"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def rope_launch_params(batch: Any, seq_len: Any, capacity: Any, num_heads: int, kv_num_heads: int,
                       head_dim: int, config: KernelConfig, *, copy_past: bool = True) -> dict[str, Any]:
    """Grid, num_warps, num_stages and constexprs of `rope_cache_kernel` (two-kernel path)."""
    _check_config(num_heads, kv_num_heads, head_dim, config)
    col_tiles = (seq_len + (config.rope_block_s - 1)) // config.rope_block_s
    copy_tiles = (capacity + (config.copy_block - 1)) // config.copy_block if copy_past else 0
    constexprs = dict(NUM_HEADS=num_heads, KV_HEADS=kv_num_heads, HEAD_DIM=head_dim,
                      BLOCK_S=config.rope_block_s, COPY_BLOCK=config.copy_block, COPY_PAST=bool(copy_past),
                      INTERPRETER=INTERPRET)
    return dict(grid=(col_tiles + copy_tiles, num_heads + kv_num_heads, batch), num_warps=config.rope_num_warps,
                num_stages=1, constexprs=constexprs)


def attention_launch_params(batch: Any, seq_len: Any, capacity: Any, num_heads: int, kv_num_heads: int,
                            head_dim: int, local_window_size: int, scale: float, config: KernelConfig,
                            dtype: torch.dtype | None = None, *, fused: bool = True,
                            copy_past: bool = True) -> dict[str, Any]:
    """Grid, num_warps, num_stages and constexprs of `sliding_window_gqa_kernel`.

    grid = (ceil(S / QPB) [+ ceil(C / copy_block) when fused and copy_past], B * Nkv * ceil(G / GT), 1),
    QPB = block_m // GT query columns per tile. `fused=False`: the attention half of the
    two-kernel path (pass cos/sin/present as None). The "constexprs" leave out the pointer
    arguments that are None (cos_ptr, sin_ptr, present_*_ptr unfused; visits_ptr always):
    add them to an AOT build's constexprs as None.
    """
    _check_config(num_heads, kv_num_heads, head_dim, config)
    groups = num_heads // kv_num_heads
    gt = config.resolved_group_tile(groups)
    qpb = config.block_m // gt
    ngt = (groups + gt - 1) // gt
    copy_past = bool(copy_past and fused)
    copy_tiles = (capacity + (config.copy_block - 1)) // config.copy_block if copy_past else 0
    constexprs = dict(
        NUM_HEADS=num_heads, KV_HEADS=kv_num_heads, HEAD_DIM=head_dim,
        WINDOW=int(local_window_size) if local_window_size > 0 else 0, SCALE=float(scale),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_TILE=gt, COPY_BLOCK=config.copy_block,
        FUSED=bool(fused), COPY_PAST=copy_past, INTERPRETER=INTERPRET,
        DOT_PRECISION="ieee" if dtype in (None, torch.float32) else "tf32",
    )
    return dict(grid=((seq_len + (qpb - 1)) // qpb + copy_tiles, batch * (kv_num_heads * ngt), 1),
                num_warps=config.num_warps, num_stages=config.num_stages, constexprs=constexprs,
                columns_per_tile=qpb, group_tile=gt, query_tiles=(seq_len + (qpb - 1)) // qpb)


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_signature(kernel: str, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, Any]]:
    """(signature, None-pointer constexprs) of one AOT build, parameters in AOT order.

    kernel: "rope" (`rope_cache_kernel`: the contract's nine inputs, seq_len and capacity, then
    q_rot/k_rot/present_key/present_value), "attention" (`sliding_window_gqa_kernel` unfused:
    q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length, seq_len,
    capacity, then output) -- the TensorRT plugins' kernels -- or "fused"
    (`sliding_window_gqa_kernel`, FUSED: the nine inputs, seq_len and capacity, then
    output/present_key/present_value).
    """
    p = f"*{_TRITON_DTYPES[dtype]}"
    inputs = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "past_k_ptr": p, "past_v_ptr": p,
              "seqlens_ptr": "*i32", "total_ptr": "*i32"}
    rope = {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    scalars = {"seq_len": "i32", "capacity": "i32"}
    if kernel == "fused":
        return {**inputs, **rope, **scalars, "out_ptr": p, "present_k_ptr": p, "present_v_ptr": p}, \
            {"visits_ptr": None}
    if kernel == "attention":
        return {**inputs, **scalars, "out_ptr": p}, \
            {"cos_ptr": None, "sin_ptr": None, "present_k_ptr": None, "present_v_ptr": None, "visits_ptr": None}
    if kernel == "rope":
        return {**inputs, **rope, **scalars, "q_rot_ptr": p, "k_rot_ptr": p, "present_k_ptr": p,
                "present_v_ptr": p}, {}
    raise ValueError(f"unknown kernel {kernel!r}: fused, rope or attention")


def compile_aot(kernel: str, dtype: torch.dtype, num_heads: int, kv_num_heads: int, head_dim: int,
                local_window_size: int, scale: float, config: KernelConfig, *, copy_past: bool = True,
                arch: int = 90, warp_size: int = 32) -> Any:
    """Compile one kernel ("fused", "rope" or "attention") for a CUDA target, no GPU needed.

    Returns triton's CompiledKernel: `.asm["ptx"]` is what a TensorRT aot_impl returns,
    `.metadata.name` the kernel name, `.metadata.shared` its shared memory (the cubin is built
    too, by ptxas). Launch with `attention_launch_params`/`rope_launch_params`' grid and
    num_warps. Needs the kernels built without TRITON_INTERPRET.
    """
    if INTERPRET:
        raise RuntimeError("compile_aot needs the kernels built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, none_args = aot_signature(kernel, dtype)
    if kernel == "rope":
        fn = rope_cache_kernel
        params = rope_launch_params(1, 1, 1, num_heads, kv_num_heads, head_dim, config, copy_past=copy_past)
    else:
        fn = sliding_window_gqa_kernel
        params = attention_launch_params(1, 1, 1, num_heads, kv_num_heads, head_dim, local_window_size, scale,
                                         config, dtype, fused=kernel == "fused", copy_past=copy_past)
    constexprs: dict[str, Any] = dict(params["constexprs"], **none_args)
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    options = {"num_warps": params["num_warps"], "num_stages": params["num_stages"]}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, warp_size), options=options)


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------


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
    module docstring's condition). visits (count_visits=True): int32 (B*Nkv*ceil(G/GT),
    ceil(S/QPB)), the key blocks each attention tile visited (compare with `expected_visits`).
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
    if query.dtype not in _TRITON_DTYPES:
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
        sliding_window_gqa_kernel[attn["grid"]](
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
    rope_cache_kernel[rope["grid"]](
        query, key, value, past_key, past_value, seqlens, total, cos, sin,
        seq_len, capacity,
        q_rot, k_rot, present_key, present_value,
        num_warps=rope["num_warps"], num_stages=rope["num_stages"], **rope["constexprs"],
    )
    if seq_len:
        sliding_window_gqa_kernel[attn["grid"]](
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
