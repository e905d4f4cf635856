"""Flash-decoding: one new token per row over a window-bounded ring cache, split across programs.

The decode case of the `sc2deploy.attention` contract (S = 1 per row, a past in the cache),
for a cache that is written in place and shared by many rows (the `cuda` runtime's slots):

* `split_attention_kernel`, grid (num_splits, B * Nkv): the keys a row's new query sees --
  positions [pos - W + 1, pos) still in the ring (slot p % C), plus the new key itself -- are
  cut into `num_splits` runs of key blocks, one program per run and (row, kv head). Each
  program rotates the G query heads of its kv head (NeoX RoPE, as the reference rounds it),
  runs an online softmax over its blocks in fp32, and writes its partial (max, sum, weighted
  values). The split that owns the newest block also takes the new key, rotated in registers.
  So one row at batch 1 fills the GPU: B * Nkv * num_splits programs, not B * Nkv.
* `combine_kernel`, grid (B, Nkv): merges the partials into the output and then writes the
  new rotated key and its value into the ring at slot pos % C. It runs after every split has
  read the ring, so the write never races a read, and it is exact for any C >= W - 1
  (the slot it overwrites holds position pos - C, which the new query no longer needs once
  the attention is done).

Rows: `slots[b]` is the cache row (of R >= B rows) of batch row b and `positions[b]` the
position of its new token (= seqlens_k[b] = its length before the step). Nothing is read back
to the host and every size is fixed per launch, so a decode step can be captured in a CUDA
graph; lengths live on the device. The online-softmax step is the prefill kernel's (`_attend`):
QK^T of the 16-bit rotated query and keys accumulated in fp32 (exact products, as the reference's
fp32 scores), softmax statistics in fp32, P rounded to the value dtype for the P @ V tensor-core
dot (as flash attention does); fp32 inputs use IEEE fp32 dots.

Layouts: query (B, Nq*H), key/value (B, Nkv*H), rows of any stride (e.g. column slices of
one fused QKV projection); caches (R, Nkv, C, H) contiguous in the query dtype, cos/sin (max_pos, H/2) float32, slots/positions int32 (B,), output (B, Nq*H).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (bf16 rounded by hand, as in
triton_kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sc2deploy.plugins.triton_kernel import INTERPRET, _attend, _cast, _load_rotated

__all__ = ["BLOCK_N", "SPLIT_WARPS", "decode_attention", "sm_count", "split_count"]

BLOCK_N = 64  # keys per block
SPLIT_WARPS = 8  # with BLOCK_N 64 at 15b shapes: 183 registers, no spills (ptxas, sm_90); 4 warps spill
PROGRAMS_PER_SM = 2  # split so that B * Nkv * splits reaches this many programs per SM
INTERPRETER_SM_COUNT = 4  # on CPU (the interpreter): a few splits, so that splitting is exercised


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors that decode splits are sized for on `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


def split_count(batch: int, kv_heads: int, max_keys: int, sm_count: int, block_n: int = BLOCK_N) -> int:
    """Splits per (row, kv head): enough programs to fill `sm_count` SMs, never more than key blocks."""
    blocks = max(1, triton.cdiv(max_keys, block_n))
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch * kv_heads))
    return max(1, min(blocks, wanted))


@triton.jit
def _query_range(positions_ptr, b, capacity, WINDOW: tl.constexpr):
    """(pos, lo): the new token's position and the oldest cached position its query sees."""
    pos = tl.load(positions_ptr + b)
    lo = tl.maximum(pos - capacity, 0)  # older positions left the ring
    if WINDOW > 0:
        lo = tl.maximum(lo, pos - WINDOW + 1)
    return pos, lo


@triton.jit
def _new_key(k_ptr, pos, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr, INTERPRETER: tl.constexpr):
    """The new key row at k_ptr rotated to `pos`, in the input dtype (H,)."""
    r = tl.arange(0, 2)  # _load_rotated works on rows: row 0 is the key, row 1 masked out
    rows = _load_rotated(k_ptr + r * 0, pos + r * 0, r == 0, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
    return tl.sum(tl.where((r == 0)[:, None], rows.to(tl.float32), 0.0), axis=0).to(rows.dtype)


@triton.jit
def split_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, positions_ptr, cos_ptr, sin_ptr,
    capacity, q_stride, kv_stride,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
    SCALE: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid (NUM_SPLITS, B * Nkv): partial softmax of the G query heads of one kv head over one run of blocks."""
    G: tl.constexpr = NUM_HEADS // KV_HEADS
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // KV_HEADS
    kvh = pid % KV_HEADS
    b64 = b.to(tl.int64)
    pos, lo = _query_range(positions_ptr, b, capacity, WINDOW)
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < G

    q_rows = q_ptr + b64 * q_stride + (kvh * G + g) * HEAD_DIM
    q = _load_rotated(q_rows, pos + g * 0, g_ok, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
    if INTERPRETER:
        q = q.to(tl.float32)
    q_pos = pos + g * 0

    # Key blocks by absolute position; this split's share of [lo // BLOCK_N, cdiv(pos, BLOCK_N)).
    first = lo // BLOCK_N
    n_blocks = tl.where(pos > lo, tl.cdiv(pos, BLOCK_N) - first, 0)
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    kb_start = first + split * per_split
    kb_end = tl.minimum(kb_start + per_split, first + n_blocks)
    cache = (tl.load(slots_ptr + b).to(tl.int64) * KV_HEADS + kvh) * capacity * HEAD_DIM
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for kb in range(kb_start, kb_end):
        kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (kpos >= lo) & (kpos < pos)
        ptrs = cache + (kpos % capacity).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _attend(q, k, v, q_pos, kpos, ok, g_ok, m_i, l_i, acc, QK_SCALE, WINDOW, INTERPRETER,
                                DOT_PRECISION)

    if split == NUM_SPLITS - 1:  # the new key, rotated here: always visible to its own query
        new = b64 * kv_stride + kvh * HEAD_DIM
        k_new = _new_key(k_ptr + new, pos, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER).to(tl.float32)
        v_new = tl.load(v_ptr + new + d).to(tl.float32)
        s_new = tl.sum(q.to(tl.float32) * k_new[None, :], axis=1) * QK_SCALE
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        p_new = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new[None, :]
        m_i = m_new

    part = ((b64 * KV_HEADS + kvh) * NUM_SPLITS + split) * GROUP_PAD + g
    tl.store(part_m_ptr + part, m_i)
    tl.store(part_l_ptr + part, l_i)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, k_ptr, v_ptr, slots_ptr, positions_ptr, cos_ptr, sin_ptr,
    capacity, kv_stride,
    out_ptr, k_cache_ptr, v_cache_ptr,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """grid (B, Nkv): merge the splits' partials into the output, then append the new key and value to the ring."""
    G: tl.constexpr = NUM_HEADS // KV_HEADS
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    b64 = b.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, GROUP_PAD)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for split in range(NUM_SPLITS):
        part = ((b64 * KV_HEADS + kvh) * NUM_SPLITS + split) * GROUP_PAD + g
        m_s = tl.load(part_m_ptr + part)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits that saw no key
        alpha, beta = tl.exp2(m - m_use), tl.exp2(m_s - m_use)
        l_sum = l_sum * alpha + tl.load(part_l_ptr + part) * beta
        acc = acc * alpha[:, None] + tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :]) * beta[:, None]
        m = m_new
    o = acc / l_sum[:, None]  # the last split holds the new key: l_sum > 0
    out_rows = (b64 * NUM_HEADS + kvh * G + g) * HEAD_DIM
    tl.store(out_ptr + out_rows[:, None] + d[None, :], _cast(o, out_ptr.dtype.element_ty, INTERPRETER),
             mask=(g < G)[:, None])

    pos = tl.load(positions_ptr + b)
    new = b64 * kv_stride + kvh * HEAD_DIM
    slot = ((tl.load(slots_ptr + b).to(tl.int64) * KV_HEADS + kvh) * capacity + pos % capacity) * HEAD_DIM
    tl.store(k_cache_ptr + slot + d, _new_key(k_ptr + new, pos, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER))
    tl.store(v_cache_ptr + slot + d, tl.load(v_ptr + new + d))


def decode_attention(query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     positions: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int, kv_num_heads: int,
                     local_window_size: int, scale: float, num_splits: int, block_n: int = BLOCK_N) -> Tensor:
    """Attention output (B, Nq*H) of one new token per row; appends its key and value to the caches in place.

    query (B, Nq*H), key/value (B, Nkv*H) before RoPE; caches (R, Nkv, C, H); slots/positions int32 (B,) on
    the same device; cos/sin float32 (max_pos, H/2). Launches two kernels and never syncs with the host.
    """
    batch = query.shape[0]
    head_dim = query.shape[-1] // num_heads
    rows, kv_heads, capacity, cache_dim = k_cache.shape
    if kv_heads != kv_num_heads or cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} are not (R, {kv_num_heads}, C, {head_dim})")
    if key.shape != (batch, kv_num_heads * head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value {tuple(key.shape)} do not match the query {tuple(query.shape)}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype != k_cache.dtype or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {k_cache.dtype} rows with unit stride")
    if value.stride(0) != key.stride(0):
        raise ValueError("key and value rows must have the same stride")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != query.dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous and {query.dtype}")
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape[-1] * 2 != head_dim:
            raise ValueError(f"{name} must be a contiguous float32 (max_pos, {head_dim // 2}) table")
    if slots.dtype != torch.int32 or positions.dtype != torch.int32:
        raise TypeError("slots and positions must be int32")
    group_pad = max(16, triton.next_power_of_2(num_heads // kv_num_heads))
    part_m = torch.empty((batch, kv_heads, num_splits, group_pad), dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((batch, kv_heads, num_splits, group_pad, head_dim), dtype=torch.float32,
                           device=query.device)
    output = torch.empty((batch, num_heads * head_dim), dtype=query.dtype, device=query.device)
    if batch == 0:
        return output
    heads = dict(NUM_HEADS=num_heads, KV_HEADS=kv_num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                 GROUP_PAD=group_pad, INTERPRETER=INTERPRET)
    split_attention_kernel[(num_splits, batch * kv_heads)](
        query, key, value, k_cache, v_cache, slots, positions, cos_cache, sin_cache, capacity,
        query.stride(0), key.stride(0),
        part_m, part_l, part_acc,
        WINDOW=max(int(local_window_size), 0), SCALE=float(scale), BLOCK_N=block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=SPLIT_WARPS, num_stages=2,
        **heads,
    )
    combine_kernel[(batch, kv_heads)](
        part_m, part_l, part_acc, key, value, slots, positions, cos_cache, sin_cache, capacity, key.stride(0),
        output, k_cache, v_cache, num_warps=4, **heads,
    )
    return output
