"""Sliding-window GQA (the `sc2deploy.attention` contract) as ONE fused Triton kernel.

Why one kernel: `tensorrt.plugin.aot_impl` embeds exactly one compiled kernel per plugin
(it returns a single kernel name, its PTX, launch params and extra int args), with the
calling convention (input pointers..., extra int scalars..., output pointers...). So the
whole op -- NeoX RoPE of q and of the new k, flash attention over the window, and the
present-cache write -- is a single launch of `sliding_window_gqa_kernel`, whose
parameters are declared in exactly that order:

  inputs   query (B,S,Nq*H), key (B,S,Nkv*H), value (B,S,Nkv*H),
           past_key (B,Nkv,C,H), past_value (B,Nkv,C,H), seqlens_k int32 (B,),
           total_sequence_length int32 (), cos_cache (P,H/2) f32, sin_cache (P,H/2) f32
  scalars  seq_len (S), capacity (C)                      int32
  outputs  output (B,S,Nq*H), present_key (B,Nkv,C,H), present_value (B,Nkv,C,H)
  debug    visits_ptr (int32 per program, or None = a constexpr; leave None in AOT builds)

All tensors are contiguous in the contract's own layouts (TensorRT's linear format); the
kernel computes strides from (S, C) and the head constexprs, so no transposes or
intermediate buffers exist. Attributes (Nq, Nkv, H, W, scale) and block sizes are
constexprs: baked into the PTX, as an AOT plugin needs (its attributes are not serialized).

Work decomposition ("GQA packing"): program (i, j) owns kv head `kvh` of row `b` and a
tile of BLOCK_M query rows. Row m of the tile is (query column i*QPB + m // GT, query
head kvh*G + gt*GT + m % GT), GT = group_tile heads of the G = Nq/Nkv sharing that kv
head, QPB = BLOCK_M // GT query columns. Every K/V block loaded therefore serves GT heads
(for decode, all G heads of a kv head read the cache once). Keys are visited in blocks of
BLOCK_N absolute positions, and only the blocks `key_block_range` returns: those that
intersect [q_first - W + 1, q_last] (clipped to what the ring still holds), so a prefill
costs O(S * (W + QPB)), not O(S^2). Online softmax (running max / running sum, exp2) in
fp32; QK^T and P@V accumulate in fp32 (P is rounded to the value dtype for the 16-bit
tensor-core dot, as flash attention does).

Ring cache, exactly as the reference: attention reads the past keys from `past_key`
(slot p % C for the positions p in [max(0, past_len - C), past_len)) and the new keys
straight from `key`/`value` (rotated on the fly), so it never depends on the order of
the cache writes; then only the last C positions of each row are written to
`present_key/value` at slot p % C. That makes every case exact, including chunks longer
than the ring and first prompts longer than C.

  * present != past (default): the kernel also copies the untouched past slots into
    present (COPY_PAST), split across the programs of each (row, kv head); no races.
  * present is past (in-place, the shared-buffer mode; `launch(..., present_key=past_key,
    present_value=past_value)`): no copy. This is race-free, hence exact, only when no
    slot written by this call holds a key some query of the call still needs:
    C >= W + S - 1 (windowed) or C >= each row's total length (linear cache, or W <= 0).
    The caller guarantees it (device-side lengths are not checked); decode (S = 1) with
    C >= W always qualifies.

Numerics: RoPE is done the way the reference does it (cos/sin cast to the input dtype,
each multiply and the add rounded to the input dtype), so rotated q/k and the present
cache are bit-identical to the reference's. cos/sin must be float32; the cache dtype
must equal the query dtype.

`triton` is imported only here; the rest of the package stays importable without it.
Under TRITON_INTERPRET=1 (read when this module is imported) the kernel runs on CPU
tensors; bf16 arithmetic in the interpreter is broken (bf16 is stored as uint16), so in
that mode the dots are done on fp32 copies of the 16-bit operands (same values: the
interpreter has no tensor cores to emulate) -- see INTERPRETER.
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
    "compile_aot",
    "default_config",
    "key_block_range",
    "launch",
    "launch_params",
    "sliding_window_gqa_kernel",
    "sliding_window_gqa_triton",
]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernel was built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""

LOG2E = 1.4426950408889634

# Tunable defaults (an `autotune` hook picks among KernelConfig values).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
DECODE_BLOCK_N = 64
COPY_BLOCK = 64


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch knobs. block_m, block_n, copy_block: powers of two >= 16.

    group_tile: query heads of one kv head packed into a tile (None: all G of them, capped at
    block_m). block_m // group_tile query columns share each K/V block.
    """

    block_m: int = PREFILL_BLOCK_M
    block_n: int = PREFILL_BLOCK_N
    group_tile: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    copy_block: int = COPY_BLOCK

    def resolved_group_tile(self, groups: int) -> int:
        gt = groups if self.group_tile is None else self.group_tile
        return max(1, min(gt, groups, self.block_m))

    def columns_per_tile(self, groups: int) -> int:
        return self.block_m // self.resolved_group_tile(groups)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_config(seq_len: int, num_heads: int, kv_num_heads: int, head_dim: int) -> KernelConfig:
    """A reasonable config without tuning: decode packs all G heads of a kv head in one tile."""
    groups = num_heads // kv_num_heads
    if seq_len <= 4:
        block_m = max(16, _next_pow2(groups * seq_len))
        block_m = min(block_m, 128)
        return KernelConfig(block_m=block_m, block_n=DECODE_BLOCK_N if head_dim <= 128 else 32,
                            group_tile=None, num_warps=4, num_stages=2)
    block_m = 128 if head_dim <= 64 else PREFILL_BLOCK_M
    return KernelConfig(block_m=block_m, block_n=PREFILL_BLOCK_N, group_tile=None,
                        num_warps=8 if block_m >= 128 else 4, num_stages=2)


def key_block_range(q_start: int, q_end: int, window: int, block: int, lowest: int = 0) -> tuple[int, int]:
    """Key blocks [first, end) that queries at positions [q_start, q_end) must visit.

    Keys are blocked by absolute position (block b = positions [b*block, (b+1)*block)).
    A query at i sees keys j in [i - window + 1, i] (window <= 0: [0, i]), and only keys at
    positions >= `lowest` still exist (the ring holds the last C past positions). An empty
    query range visits nothing (first == end). The kernel uses the same arithmetic
    (`_key_block_range`), so this function is the specification its launch is tested against.
    """
    lo = max(lowest, 0)
    if window > 0:
        lo = max(lo, q_start - window + 1)
    first = lo // block
    if q_end <= q_start:
        return first, first
    return first, max(first, (q_end + block - 1) // block)


# --------------------------------------------------------------------------------------------
# Triton code
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_block_range(q_start, q_end, lowest, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    lo = tl.maximum(lowest, 0)
    if WINDOW > 0:
        lo = tl.maximum(lo, q_start - WINDOW + 1)
    first = lo // BLOCK
    end = tl.where(q_end > q_start, tl.maximum(first, (q_end + BLOCK - 1) // BLOCK), first)
    return first, end


@triton.jit
def _cast(x, dt: tl.constexpr, INTERPRETER: tl.constexpr):
    """x.to(dt) with round-to-nearest-even, also in the interpreter (whose fp32->bf16 truncates)."""
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
    dt = x.dtype
    cos = _cast(cos, dt, INTERPRETER).to(tl.float32)
    sin = _cast(sin, dt, INTERPRETER).to(tl.float32)
    xf = x.to(tl.float32)
    xpf = xp.to(tl.float32)
    rot = tl.where((d < HALF)[None, :], -xpf, xpf)
    a = _cast(xf * cos, dt, INTERPRETER).to(tl.float32)
    c = _cast(rot * sin, dt, INTERPRETER).to(tl.float32)
    return _cast(a + c, dt, INTERPRETER)


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
    # attributes
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    WINDOW: tl.constexpr, SCALE: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_TILE: tl.constexpr, COPY_BLOCK: tl.constexpr,
    # modes
    COPY_PAST: tl.constexpr, INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    G: tl.constexpr = NUM_HEADS // KV_HEADS
    NGT: tl.constexpr = (G + GROUP_TILE - 1) // GROUP_TILE
    QPB: tl.constexpr = BLOCK_M // GROUP_TILE
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634

    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_h // (KV_HEADS * NGT)
    kvh = (pid_h // NGT) % KV_HEADS
    gt = pid_h % NGT
    b64 = b.to(tl.int64)

    # Row layout, as the contract's _row_layout.
    total_cols = tl.load(total_ptr)
    row_total = tl.load(seqlens_ptr + b) + 1
    first_prompt = seq_len == total_cols
    past_len = tl.where(first_prompt, 0, row_total - seq_len)
    n_new = tl.where(first_prompt, row_total, seq_len)
    lowest = tl.maximum(past_len - capacity, 0)  # oldest past position the ring still holds
    cap_safe = tl.maximum(capacity, 1)

    # Query tile: row m = (column, head).
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    col = pid_m * QPB + m // GROUP_TILE
    g = gt * GROUP_TILE + m % GROUP_TILE
    row_ok = (m < QPB * GROUP_TILE) & (col < seq_len) & (g < G)
    q_real = row_ok & (col < n_new)
    q_pos = past_len + col
    q_rows = ((b64 * seq_len + col) * NUM_HEADS + kvh * G + g) * HEAD_DIM
    q = _load_rotated(q_ptr + q_rows, q_pos, q_real, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
    if INTERPRETER:
        q = q.to(tl.float32)

    kv_stride = KV_HEADS * HEAD_DIM  # between columns of key/value
    new_base = (b64 * seq_len * KV_HEADS + kvh) * HEAD_DIM
    cache_base = (b64 * KV_HEADS + kvh) * capacity * HEAD_DIM

    q_first = past_len + pid_m * QPB
    q_end = past_len + tl.minimum(pid_m * QPB + QPB, n_new)
    kb_first, kb_end = _key_block_range(q_first, q_end, lowest, WINDOW, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    visits = 0
    for kb in range(kb_first, kb_end):
        kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        is_new = kpos >= past_len
        avail = (kpos >= lowest) & (kpos < row_total)
        new_ok = avail & is_new
        old_ok = avail & (kpos < past_len)
        new_rows = new_base + (kpos - past_len).to(tl.int64) * kv_stride
        old_rows = cache_base + (kpos % cap_safe).to(tl.int64) * HEAD_DIM
        k_new = _load_rotated(k_ptr + new_rows, kpos, new_ok, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
        k_old = tl.load(past_k_ptr + old_rows[:, None] + d[None, :], mask=old_ok[:, None], other=0.0)
        k = tl.where(is_new[:, None], k_new, k_old)
        v_new = tl.load(v_ptr + new_rows[:, None] + d[None, :], mask=new_ok[:, None], other=0.0)
        v_old = tl.load(past_v_ptr + old_rows[:, None] + d[None, :], mask=old_ok[:, None], other=0.0)
        v = tl.where(is_new[:, None], v_new, v_old)

        if INTERPRETER:
            s = tl.dot(q, tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dist = q_pos[:, None] - kpos[None, :]
        visible = q_real[:, None] & avail[None, :] & (dist >= 0)
        if WINDOW > 0:
            visible = visible & (dist < WINDOW)
        s = tl.where(visible, s * QK_SCALE, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if INTERPRETER:
            acc += tl.dot(_cast(p, v.dtype, INTERPRETER).to(tl.float32), v.to(tl.float32))
        else:
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        visits += 1

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o = tl.where(q_real[:, None], o, 0.0)  # padded columns: zeros
    tl.store(out_ptr + q_rows[:, None] + d[None, :], _cast(o, out_ptr.dtype.element_ty, INTERPRETER),
             mask=row_ok[:, None])

    if visits_ptr is not None:
        tl.store(visits_ptr + pid_h * tl.num_programs(0) + pid_m, visits)

    # Present cache: one group tile per (row, kv head) does it.
    if gt == 0:
        # The new positions of this tile's columns that are among the row's last C.
        c = pid_m * QPB + m
        c_pos = past_len + c
        keep = (m < QPB) & (c < n_new) & (c_pos >= row_total - capacity)
        c_rows = new_base + c.to(tl.int64) * kv_stride
        slot_rows = cache_base + (c_pos % cap_safe).to(tl.int64) * HEAD_DIM
        k_rot = _load_rotated(k_ptr + c_rows, c_pos, keep, cos_ptr, sin_ptr, HEAD_DIM, INTERPRETER)
        v_cur = tl.load(v_ptr + c_rows[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        tl.store(present_k_ptr + slot_rows[:, None] + d[None, :], k_rot, mask=keep[:, None])
        tl.store(present_v_ptr + slot_rows[:, None] + d[None, :], v_cur, mask=keep[:, None])
        if COPY_PAST:
            # Copy the past slots this call does not overwrite; slots are split over the
            # programs along axis 0. Written slots: a ring interval starting at kept_lo % C.
            kept_lo = tl.maximum(past_len, row_total - capacity)
            n_kept = row_total - kept_lo
            kept_slot = kept_lo % cap_safe
            per = tl.cdiv(capacity, tl.num_programs(0))
            s_lo = pid_m * per
            s_hi = tl.minimum(s_lo + per, capacity)
            for s0 in range(s_lo, s_hi, COPY_BLOCK):
                slot = s0 + tl.arange(0, COPY_BLOCK)
                written = (slot - kept_slot + cap_safe) % cap_safe < n_kept
                ok = (slot < s_hi) & ~written
                rows = cache_base + slot.to(tl.int64) * HEAD_DIM
                ptrs = rows[:, None] + d[None, :]
                tl.store(present_k_ptr + ptrs, tl.load(past_k_ptr + ptrs, mask=ok[:, None]), mask=ok[:, None])
                tl.store(present_v_ptr + ptrs, tl.load(past_v_ptr + ptrs, mask=ok[:, None]), mask=ok[:, None])


# --------------------------------------------------------------------------------------------
# Launch helpers (shared with a TensorRT aot_impl: they only use + * // on the sizes, so they
# also work on symbolic sizes)
# --------------------------------------------------------------------------------------------


def launch_params(batch: Any, seq_len: Any, num_heads: int, kv_num_heads: int, head_dim: int,
                  local_window_size: int, scale: float, config: KernelConfig, *, copy_past: bool = True,
                  dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Grid, num_warps, num_stages and constexprs of one launch of `sliding_window_gqa_kernel`.

    grid = (ceil(S / QPB), B * Nkv * ceil(G / GT), 1). `batch` and `seq_len` may be ints or
    symbolic sizes (anything with + * //), e.g. a TensorRT plugin's shape expressions.
    """
    if num_heads % kv_num_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    for name in ("block_m", "block_n", "copy_block"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    groups = num_heads // kv_num_heads
    gt = config.resolved_group_tile(groups)
    qpb = config.block_m // gt
    ngt = (groups + gt - 1) // gt
    grid = ((seq_len + (qpb - 1)) // qpb, batch * (kv_num_heads * ngt), 1)
    constexprs = dict(
        NUM_HEADS=num_heads, KV_HEADS=kv_num_heads, HEAD_DIM=head_dim,
        WINDOW=int(local_window_size) if local_window_size > 0 else 0, SCALE=float(scale),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_TILE=gt, COPY_BLOCK=config.copy_block,
        COPY_PAST=bool(copy_past), INTERPRETER=INTERPRET,
        DOT_PRECISION="ieee" if dtype in (None, torch.float32) else "tf32",
    )
    return dict(grid=grid, num_warps=config.num_warps, num_stages=config.num_stages, constexprs=constexprs,
                columns_per_tile=qpb, group_tile=gt)


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton signature (name -> type) of the non-constexpr kernel parameters, in AOT order.

    For `triton.compiler.ASTSource(fn=sliding_window_gqa_kernel, signature=..., constexprs=...)`:
    add `visits_ptr` with value None to the constexprs (with `launch_params(...)["constexprs"]`).
    """
    t = _TRITON_DTYPES[dtype]
    return {
        "q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "past_k_ptr": f"*{t}", "past_v_ptr": f"*{t}",
        "seqlens_ptr": "*i32", "total_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
        "seq_len": "i32", "capacity": "i32",
        "out_ptr": f"*{t}", "present_k_ptr": f"*{t}", "present_v_ptr": f"*{t}",
    }


def compile_aot(dtype: torch.dtype, num_heads: int, kv_num_heads: int, head_dim: int, local_window_size: int,
                scale: float, config: KernelConfig, *, copy_past: bool = True, arch: int = 90,
                warp_size: int = 32) -> Any:
    """Compile the kernel ahead of time for a CUDA target (no GPU needed); returns triton's CompiledKernel.

    `.asm["ptx"]` is what a TensorRT aot_impl returns, `.metadata.name` the kernel name,
    `.n_regs`/`.n_spills`/`.metadata.shared` the resources (after `.asm["cubin"]` is built).
    Must run with TRITON_INTERPRET unset (an interpreted kernel has no AST to compile).
    """
    if INTERPRET:
        raise RuntimeError("compile_aot needs the kernel built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = launch_params(1, 1, num_heads, kv_num_heads, head_dim, local_window_size, scale, config,
                           copy_past=copy_past, dtype=dtype)
    constexprs: dict[str, Any] = dict(params["constexprs"], visits_ptr=None)
    signature: dict[str, str] = dict(aot_signature(dtype))
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=sliding_window_gqa_kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, warp_size), options=options)


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------


def launch(
    query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor,
    seqlens_k: Tensor, total_sequence_length: Tensor, cos_cache: Tensor, sin_cache: Tensor,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    *, config: KernelConfig | None = None, present_key: Tensor | None = None,
    present_value: Tensor | None = None, count_visits: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One launch of the fused kernel; returns (output, present_key, present_value, visits).

    present_key/value: output buffers (default: new ones). Passing past_key/past_value makes
    the call in place (no copy of the past; see the module docstring for when that is exact).
    visits (count_visits=True): int32 (grid[1], grid[0]), key blocks each program visited.
    """
    batch, seq_len, q_width = query.shape
    if q_width % num_heads:
        raise ValueError(f"query width {q_width} is not a multiple of num_heads {num_heads}")
    head_dim = q_width // num_heads
    capacity = past_key.shape[2]
    if key.shape != (batch, seq_len, kv_num_heads * head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value shape {tuple(key.shape)}/{tuple(value.shape)} do not match the query")
    if past_key.shape != (batch, kv_num_heads, capacity, head_dim) or past_value.shape != past_key.shape:
        raise ValueError(f"past_key/value shape {tuple(past_key.shape)} is not (B, Nkv, C, H)")
    if query.dtype not in _TRITON_DTYPES:
        raise TypeError(f"unsupported dtype {query.dtype}")
    for name, t in (("key", key), ("value", value), ("past_key", past_key), ("past_value", past_value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from the query dtype {query.dtype}")
    if cos_cache.shape[-1] * 2 != head_dim or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"cos/sin cache {tuple(cos_cache.shape)} do not match head_dim {head_dim}")
    if config is None:
        config = default_config(seq_len, num_heads, kv_num_heads, head_dim)

    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    past_key, past_value = past_key.contiguous(), past_value.contiguous()
    seqlens = seqlens_k.to(device=query.device, dtype=torch.int32).contiguous()
    total = total_sequence_length.to(device=query.device, dtype=torch.int32).reshape(())
    cos = cos_cache.to(device=query.device, dtype=torch.float32).contiguous()
    sin = sin_cache.to(device=query.device, dtype=torch.float32).contiguous()

    in_place = present_key is not None and present_key.data_ptr() == past_key.data_ptr()
    if present_key is None:
        present_key = torch.empty_like(past_key)
    if present_value is None:
        present_value = torch.empty_like(past_value)
    if in_place != (present_value.data_ptr() == past_value.data_ptr()):
        raise ValueError("present_key and present_value must both alias the past, or neither")
    output = torch.empty_like(query)

    params = launch_params(batch, seq_len, num_heads, kv_num_heads, head_dim, local_window_size, scale,
                           config, copy_past=not in_place, dtype=query.dtype)
    grid = params["grid"]
    visits = torch.full((grid[1], grid[0]), -1, dtype=torch.int32, device=query.device) if count_visits else None
    if batch and seq_len:
        sliding_window_gqa_kernel[grid](
            query, key, value, past_key, past_value, seqlens, total, cos, sin,
            seq_len, capacity,
            output, present_key, present_value,
            visits,
            num_warps=params["num_warps"], num_stages=params["num_stages"], **params["constexprs"],
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
    """Host-side prediction of the `visits` a launch returns, from `key_block_range` alone."""
    groups = num_heads // kv_num_heads
    gt = config.resolved_group_tile(groups)
    qpb = config.block_m // gt
    ngt = math.ceil(groups / gt)
    n_tiles = math.ceil(seq_len / qpb)
    rows = []
    for total in (seqlens_k.to(torch.int64) + 1).tolist():
        first = seq_len == total_sequence_length
        past_len, n_new = (0, total) if first else (total - seq_len, seq_len)
        lowest = max(past_len - capacity, 0)
        counts = []
        for i in range(n_tiles):
            q_start = past_len + i * qpb
            q_end = past_len + min(i * qpb + qpb, n_new)
            lo, hi = key_block_range(q_start, q_end, window, config.block_n, lowest)
            counts.append(hi - lo)
        rows.extend([counts] * (kv_num_heads * ngt))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, n_tiles)


def with_config(config: KernelConfig, **changes: Any) -> KernelConfig:
    """A copy of config with some fields changed (for autotuning sweeps)."""
    return replace(config, **changes)
