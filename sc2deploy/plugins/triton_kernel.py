"""Sliding-window GQA (the `sc2deploy.attention` contract) in Triton: the kernels.

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
  decode goes through the plugins or `triton_decode`. `triton_attention.launch`'s default,
  compared by bench/gpu_check.py.

Attention: program (i, j) owns kv head `kvh` of row `b` and a tile of BLOCK_M rows, row m =
(query column i*QPB + m // GT, query head kvh*G + gt*GT + m % GT), G = Nq/Nkv, GT = group_tile
heads packed per tile, QPB = BLOCK_M // GT columns: every K/V block loaded serves GT heads (a
decode reads each kv head's cache once, not G times). Keys come in two phases: past keys from
`past_key/value` (ring slot p % C for p in [max(0, past_len - C), past_len)), then the new keys
(columns of key/k_rot); in each phase only the blocks `tiling.key_block_range` returns -- those
that intersect [first query - W + 1, last query] -- are visited, so a prefill costs
O(S * (W + QPB)), not O(S^2). Online softmax in fp32 (running max / running sum, exp2); QK^T and
P@V accumulate in fp32, P is rounded to the value dtype for the 16-bit tensor-core dot (as flash
attention does); fp32 inputs use IEEE fp32 dots (no TF32).

Ring cache, exactly as the reference: attention reads the past from `past_key/value` and the
new keys from the inputs (never from the cache being written), and only each row's last C
positions are written to present at slot p % C. So every case is exact -- chunks longer than
the ring, first prompts longer than C, rings smaller than the window.
  * present != past (default): the untouched past slots are copied to present by extra
    programs along grid axis 0 (ceil(C / copy_block) of them per (row, kv head)); no races.
  * in place, present is past (`triton_attention.launch(..., present_key=past_key,
    present_value=past_value)`, the shared-buffer mode): no copy. Exact only when no slot
    written by the call holds a key one of its queries still sees: C >= W + S - 1 (windowed;
    always true for a decode with C >= W), or C >= every row's total length (linear cache, or
    W <= 0). The caller guarantees it (lengths live on the device and are not checked).

Layouts (all contiguous; strides come from S, C and the head constexprs, as for a TensorRT
plugin's linear tensors): query, q_rot, output (B, S, Nq*H); key, value, k_rot (B, S, Nkv*H);
past/present (B, Nkv, C, H); seqlens_k int32 (B,); total_sequence_length int32 (); cos/sin
(max_pos, H/2) float32. q_rot/k_rot keep the input layout: a tile's G heads of one column are
contiguous. The cache dtype must equal the query dtype.

Numerics: RoPE as the reference does it (cos/sin cast to the input dtype, each multiply and
the add rounded to it), so rotated keys and the present cache are bit-identical to the
reference under the interpreter (on a GPU, fp32 may differ by an ulp through FMA contraction).

Block sizes are `tiling.KernelConfig`s; `triton_launch` turns one into a grid and constexprs
and builds the PTX ahead of time; `triton_attention` launches the kernels on torch tensors.

TRITON_INTERPRET=1 (read when this module is imported) runs the kernels on CPU tensors. The
interpreter stores bf16 as uint16 and gets bf16 arithmetic and fp32->bf16 rounding wrong, so
with INTERPRETER (set automatically) the kernels do 16-bit dots on fp32 copies and round to
bf16 by hand (RNE): the same values as on a GPU. tests/conftest.py reloads this module when it
was imported before TRITON_INTERPRET was set: the modules that launch these kernels read them
and `INTERPRET` as attributes of this module, at call time.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["INTERPRET", "rope_cache_kernel", "sliding_window_gqa_kernel"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""


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
