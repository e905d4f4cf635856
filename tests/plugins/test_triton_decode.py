"""Flash-decoding (plugins/triton_decode) against the contract's reference, one row at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sc2deploy.attention import rope_cache, sliding_window_gqa_reference
from sc2deploy.plugins import triton_decode as td
from sc2deploy.plugins import triton_kernel as tk

DEVICE = "cpu" if tk.INTERPRET else "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATOL = {F32: 1e-5, F16: 4e-3, BF16: 3e-2}


def run_case(nq, nkv, h, window, capacity, positions, dtype, *, rows=None, slots=None, splits=2, block_n=16, seed=0,
             fused_qkv=False):
    """Decode one token per row with the kernel and, row by row, with the reference; compare output and cache."""
    g = torch.Generator().manual_seed(seed)
    batch = len(positions)
    rows = rows or batch
    slots = slots or list(range(batch))

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    if fused_qkv:  # column slices of one projection, as the cuda runtime passes them
        query, key, value = randn(batch, (nq + 2 * nkv) * h).split([nq * h, nkv * h, nkv * h], dim=-1)
    else:
        query, key, value = randn(batch, nq * h), randn(batch, nkv * h), randn(batch, nkv * h)
    k_cache, v_cache = randn(rows, nkv, capacity, h), randn(rows, nkv, capacity, h)
    cos, sin = rope_cache(h, 10000.0, max(positions) + 1)
    cos, sin = cos.contiguous().to(DEVICE), sin.contiguous().to(DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    as_int = dict(dtype=torch.int32, device=DEVICE)
    out = td.decode_attention(query, key, value, k_cache, v_cache, torch.tensor(slots, **as_int),
                              torch.tensor(positions, **as_int), cos, sin, nq, nkv, window, h ** -0.5,
                              num_splits=splits, block_n=block_n)
    for b, (slot, pos) in enumerate(zip(slots, positions)):
        ref, pk, pv = sliding_window_gqa_reference(
            query[b:b + 1, None], key[b:b + 1, None], value[b:b + 1, None], k_before[slot:slot + 1],
            v_before[slot:slot + 1], torch.tensor([pos], **as_int), torch.tensor(pos + 1, **as_int), cos, sin,
            nq, nkv, window, h ** -0.5)
        torch.testing.assert_close(out[b], ref[0, 0], atol=ATOL[dtype], rtol=0)
        if tk.INTERPRET:  # the same rounding as the reference; a GPU may FMA-contract fp32 RoPE
            assert torch.equal(k_cache[slot], pk[0]) and torch.equal(v_cache[slot], pv[0])
        else:
            torch.testing.assert_close(k_cache[slot], pk[0], atol=ATOL[dtype], rtol=0)
            torch.testing.assert_close(v_cache[slot], pv[0], atol=ATOL[dtype], rtol=0)
    untouched = sorted(set(range(rows)) - set(slots))
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])
    return out


# (Nq, Nkv, H, W, C, positions): ring wrapped (C = W and C = W - 1), window below the cache, a linear cache
# (no window), the first token (position 0), rows at different depths in one batch; the append happens after
# the reads, so even rings shorter than the window are exact.
CASES = [
    (4, 2, 16, 32, 32, [100, 31, 0]),
    (4, 1, 32, 32, 31, [95]),
    (6, 2, 32, 20, 48, [70, 7]),
    (2, 2, 16, 0, 80, [79, 40]),
    (12, 1, 64, 64, 64, [64, 65, 200]),
    (8, 4, 128, 24, 24, [23, 24, 300]),
    (2, 1, 16, 0, 24, [50, 23]),  # no window, a ring shorter than the sequence: only what it holds
    (4, 2, 16, 40, 24, [60]),  # a ring shorter than the window
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("nq, nkv, h, window, capacity, positions", CASES)
def test_decode_matches_reference(nq, nkv, h, window, capacity, positions, dtype):
    run_case(nq, nkv, h, window, capacity, positions, dtype)


@pytest.mark.parametrize("splits", [1, 3, 8, 40])
def test_any_split_count_gives_the_same_output(splits):
    """More splits than key blocks leave some splits empty; one split is plain flash attention."""
    out = run_case(4, 2, 16, 64, 64, [150, 9], F32, splits=splits)
    base = run_case(4, 2, 16, 64, 64, [150, 9], F32, splits=2)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


def test_rows_map_to_any_cache_slots():
    """Batch rows write and read only their own slots, in any order, of a larger cache."""
    run_case(4, 2, 32, 16, 16, [40, 3, 17], BF16, rows=6, slots=[5, 0, 3])


def test_query_key_value_may_be_slices_of_one_projection():
    run_case(6, 2, 32, 20, 20, [44, 5], F16, fused_qkv=True)


def test_block_size_64_default():
    run_case(8, 2, 64, 128, 128, [300, 64], F16, splits=2, block_n=td.BLOCK_N)


def test_split_count_fills_the_gpu_but_not_past_the_blocks():
    assert td.split_count(1, 4, 4095, sm_count=132) == 64  # 4096 keys / 64 = 64 blocks, 66 wanted
    assert td.split_count(8, 4, 4095, sm_count=132) == 9
    assert td.split_count(64, 4, 4095, sm_count=132) == 2
    assert td.split_count(1, 1, 10, sm_count=132) == 1


def test_kernels_compile_for_sm90_without_spills():
    """At StarCoder2-15b shapes (Nq 48, Nkv 4, H 128, W 4096), bf16 and fp16: PTX and cubin for Hopper, no GPU."""
    script = textwrap.dedent("""
        import json, os, subprocess, tempfile, torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from sc2deploy.plugins import triton_decode as td
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = []
        for dtype in ("bf16", "fp16"):
            p = "*" + dtype
            heads = dict(NUM_HEADS=48, KV_HEADS=4, HEAD_DIM=128, NUM_SPLITS=64, GROUP_PAD=16, INTERPRETER=False)
            split = dict(q_ptr=p, k_ptr=p, v_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slots_ptr="*i32",
                         positions_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32", capacity="i32", q_stride="i32",
                         kv_stride="i32", part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32")
            combine = dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", k_ptr=p, v_ptr=p,
                           slots_ptr="*i32", positions_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
                           capacity="i32", kv_stride="i32", out_ptr=p, k_cache_ptr=p, v_cache_ptr=p)
            jobs = [(td.split_attention_kernel, split, dict(heads, WINDOW=4096, SCALE=128 ** -0.5,
                                                             BLOCK_N=td.BLOCK_N, DOT_PRECISION="tf32"),
                     td.SPLIT_WARPS),
                    (td.combine_kernel, combine, heads, 4)]
            for fn, signature, constexprs, warps in jobs:
                signature = dict(signature, **{k: "constexpr" for k in constexprs})
                ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(ck.asm["cubin"]); f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                           text=True).stdout
                report.append(dict(kernel=fn.__name__, dtype=dtype, usage=usage))
        print(json.dumps(report))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=400)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas for the CUDA backend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert len(report) == 4
    for entry in report:
        assert "STACK:0 " in entry["usage"] and "LOCAL:0 " in entry["usage"], entry
