"""The Triton sliding-window GQA kernels against the contract's reference (TRITON_INTERPRET=1 on CPU)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from sc2deploy.attention import sliding_window_gqa_reference
from sc2deploy.plugins import tiling, triton_attention, triton_launch
from sc2deploy.plugins import triton_kernel as tk

DEVICE = "cpu" if tk.INTERPRET else "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATOL = {F32: 1e-5, F16: 4e-3, BF16: 3e-2}
SMALL = tiling.KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
REPO = Path(__file__).resolve().parents[2]


def inputs(nq, nkv, h, s, w, c, dtype, *, lengths=None, past=None, seed=0, device=DEVICE):
    return gpu_check.make_inputs(batch=len(lengths or past or [s]), seq_len=s, num_heads=nq, kv_heads=nkv,
                                 head_dim=h, capacity=c, window=w, dtype=dtype, device=device, lengths=lengths,
                                 past=past, seed=seed)


def assert_matches(args, config=SMALL, fused=True, **kwargs):
    """Kernels vs reference: output within the dtype's tolerance, present caches bit-identical."""
    ref = sliding_window_gqa_reference(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()})
    out, pk, pv, visits = triton_attention.launch(**args, config=config, fused=fused, count_visits=True, **kwargs)
    dtype = args["query"].dtype
    torch.testing.assert_close(out, ref[0], atol=ATOL[dtype], rtol=0)
    if tk.INTERPRET:  # same rounding as the reference; on a GPU fp32 RoPE may be FMA-contracted
        assert torch.equal(pk, ref[1]) and torch.equal(pv, ref[2])
    else:
        torch.testing.assert_close(pk, ref[1], atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(pv, ref[2], atol=ATOL[dtype], rtol=0)
    # Padded columns of a first prompt are zeros, exactly.
    if int(args["total_sequence_length"]) == args["query"].shape[1]:
        for row, n in enumerate((args["seqlens_k"] + 1).tolist()):
            assert not out[row, n:].any()
    return out, visits


# (Nq, Nkv, H, S, W, C, dtype, row lengths): W below, equal to, above S, and none; C of 0, < S, = W, >= S.
PREFILL = [
    (1, 1, 16, 24, 8, 8, F32, None),
    (2, 1, 32, 24, 24, 32, F32, [24, 17]),
    (4, 2, 64, 20, 32, 20, F32, [20, 9, 1]),
    (8, 2, 128, 24, 8, 12, F32, [24, 13]),
    (8, 8, 16, 33, 0, 40, F32, [33, 20]),
    (4, 4, 32, 40, 16, 0, F32, None),
    (1, 1, 128, 17, 17, 17, F16, None),
    (2, 1, 16, 24, 40, 64, F16, [24, 5]),
    (4, 2, 32, 30, 7, 7, F16, [30, 29]),
    (4, 2, 128, 24, 24, 8, F16, [24, 8]),
    (8, 2, 64, 16, 16, 16, BF16, [16, 3]),
    (8, 8, 128, 12, 5, 5, BF16, None),
    (4, 4, 16, 24, 0, 24, BF16, [24, 11]),
    (8, 2, 16, 48, 12, 12, BF16, None),
]


@pytest.fixture(params=[True, False], ids=["fused", "two-kernel"])
def fused(request):
    return request.param


@pytest.mark.parametrize("nq,nkv,h,s,w,c,dtype,lengths", PREFILL)
def test_prefill_matches_reference(nq, nkv, h, s, w, c, dtype, lengths, fused):
    assert_matches(inputs(nq, nkv, h, s, w, c, dtype, lengths=lengths), fused=fused)


# (Nq, Nkv, H, W, C, past per row, dtype): linear caches (C >= total) and wrapped rings (past > C).
DECODE = [
    (4, 2, 32, 16, 64, [10, 40], F32),
    (8, 2, 64, 16, 16, [40, 3, 16], F32),
    (1, 1, 16, 8, 8, [1, 9], F32),
    (2, 1, 16, 8, 12, [30, 7], F16),
    (4, 4, 128, 32, 32, [33, 31], F16),
    (8, 8, 16, 8, 8, [100, 8], BF16),
    (1, 1, 128, 0, 48, [20, 47], BF16),
    (8, 2, 32, 20, 20, [45, 19], BF16),
    (8, 2, 128, 16, 16, [50, 16], BF16),
    (2, 1, 64, 24, 32, [70, 2], F16),
    (4, 2, 16, 16, 8, [20, 5], F32),  # ring smaller than the window: only C past keys are left
    (2, 1, 16, 8, 8, [1, 0], F32),    # total_sequence_length 2 = S + 1 (not a first prompt)
]


@pytest.mark.parametrize("nq,nkv,h,w,c,past,dtype", DECODE)
def test_decode_matches_reference(nq, nkv, h, w, c, past, dtype, fused):
    assert_matches(inputs(nq, nkv, h, 1, w, c, dtype, past=past), fused=fused)


# Chunks of a longer prompt (S > 1 with a past), including chunks longer than the ring.
CHUNK = [
    (4, 2, 32, 6, 8, 8, [20, 3], F32),     # ring C = W < W + S - 1
    (8, 2, 16, 5, 12, 64, [10, 30], F16),  # linear
    (2, 1, 64, 20, 8, 8, [9, 30], F32),    # chunk longer than the ring
    (1, 1, 16, 4, 0, 40, [10, 20], BF16),  # no window
    (4, 2, 16, 3, 16, 8, [30, 6], F16),    # ring smaller than the window
]


@pytest.mark.parametrize("nq,nkv,h,s,w,c,past,dtype", CHUNK)
def test_chunk_with_past_matches_reference(nq, nkv, h, s, w, c, past, dtype, fused):
    assert_matches(inputs(nq, nkv, h, s, w, c, dtype, past=past), fused=fused)


@pytest.mark.parametrize("s,w,c,past", [
    (1, 8, 8, [30, 5]),          # decode on a wrapped ring, C = W
    (5, 8, 12, [30, 2]),         # chunk, C = W + S - 1
    (6, 0, 40, [10, 30]),        # linear cache, no window, C >= totals
])
def test_in_place_matches_reference_when_safe(s, w, c, past, fused):
    """present = past (shared buffer): exact under C >= W + S - 1 or a linear cache."""
    args = inputs(4, 2, 32, s, w, c, F32, past=past, seed=3)
    assert_matches(args, fused=fused, present_key=args["past_key"], present_value=args["past_value"])


@pytest.mark.parametrize("group_tile,block_m,block_n", [(1, 16, 16), (3, 16, 32), (4, 32, 16), (2, 64, 64)])
def test_group_tiles_and_block_sizes(group_tile, block_m, block_n, fused):
    """Packing 1, 3 (not a divisor of G = 4), 4 or 2 heads per tile; several block shapes."""
    config = tiling.KernelConfig(block_m=block_m, block_n=block_n, group_tile=group_tile, rope_block_s=32,
                                 copy_block=16)
    assert_matches(inputs(8, 2, 32, 21, 9, 9, F32, lengths=[21, 14]), config, fused)
    assert_matches(inputs(8, 2, 32, 1, 9, 9, F16, past=[25, 4]), config, fused)


def test_default_configs(fused):
    assert_matches(inputs(8, 2, 64, 20, 8, 8, F16, lengths=[20, 11]), None, fused)
    assert_matches(inputs(8, 2, 64, 1, 8, 8, BF16, past=[20, 11]), None, fused)
    assert_matches(inputs(4, 1, 32, 20, 8, 8, F32, lengths=[20, 11]), None, fused)


def test_wrapper_is_a_drop_in_for_the_reference():
    assert inspect.signature(triton_attention.sliding_window_gqa_triton).parameters == \
        inspect.signature(sliding_window_gqa_reference).parameters
    args = inputs(4, 2, 16, 10, 4, 4, F32, lengths=[10, 6])
    got = triton_attention.sliding_window_gqa_triton(**args)
    ref = sliding_window_gqa_reference(**args)
    assert len(got) == 3 and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, ref))


# ---------------------------------------------------------------------------------------------
# Only in-window key blocks are visited
# ---------------------------------------------------------------------------------------------


def test_key_block_range_is_exactly_the_blocks_with_visible_keys():
    for block in (1, 4, 16):
        for window in (0, 1, 3, 8, 20):
            for lowest in (0, 5):
                for highest in (None, 12, 40):
                    for q_start in range(0, 30, 3):
                        for q_end in range(q_start, q_start + 9, 4):
                            keys = {j for i in range(q_start, q_end) for j in range(lowest, i + 1)
                                    if (window <= 0 or i - j < window) and (highest is None or j < highest)}
                            first, end = tiling.key_block_range(q_start, q_end, window, block, lowest, highest)
                            want = {j // block for j in keys}
                            if want:
                                assert (first, end) == (min(want), max(want) + 1)
                            else:
                                assert first == end


@pytest.mark.parametrize("nq,nkv,s,w,c,kind", [
    (4, 2, 40, 8, 8, "prefill"), (8, 2, 33, 0, 40, "prefill"), (2, 1, 1, 16, 16, "decode"),
    (4, 4, 6, 8, 8, "chunk"),
])
def test_visits_follow_key_block_range(nq, nkv, s, w, c, kind, fused):
    if kind == "prefill":
        args = inputs(nq, nkv, 16, s, w, c, F32, lengths=[s, s // 2, 1])
    else:
        args = inputs(nq, nkv, 16, s, w, c, F32, past=[37, 5])
    _, visits = assert_matches(args, fused=fused)
    want = tiling.expected_visits(args["seqlens_k"].cpu(), s, int(args["total_sequence_length"]), c, w, nq, nkv, SMALL)
    assert torch.equal(visits.cpu(), want)


def test_prefill_cost_is_linear_in_the_sequence():
    """S = 512, W = 16, 16-key blocks: each tile visits at most ceil((QPB + W - 1) / 16) + 1 blocks."""
    s, w = 512, 16
    args = inputs(1, 1, 16, s, w, w, F32)
    _, visits = assert_matches(args)
    qpb = SMALL.columns_per_tile(1)
    bound = -(-(qpb + w - 1) // SMALL.block_n) + 1
    assert int(visits.max()) <= bound
    causal = sum(tile + 1 for tile in range(s // qpb))  # blocks a causal kernel without a window visits
    assert int(visits.sum()) <= bound * (s // qpb) < causal / 4


# ---------------------------------------------------------------------------------------------
# Launch helpers and ahead-of-time compilation
# ---------------------------------------------------------------------------------------------


class Sym:
    """A stand-in for a symbolic size (e.g. a TensorRT shape expression): only + * // exist."""

    def __init__(self, value):
        self.value = value

    def _v(self, other):
        return other.value if isinstance(other, Sym) else other

    def __add__(self, other):
        return Sym(self.value + self._v(other))

    __radd__ = __add__

    def __mul__(self, other):
        return Sym(self.value * self._v(other))

    __rmul__ = __mul__

    def __floordiv__(self, other):
        return Sym(self.value // self._v(other))


def test_launch_params_accept_symbolic_sizes():
    config = tiling.KernelConfig(block_m=64, block_n=64, copy_block=64)
    for batch, seq_len, cap in ((3, 1000, 4096), (1, 1, 4096), (2, 77, 0)):
        for fused, copy_past in ((True, True), (True, False), (False, True)):
            sym = triton_launch.attention_launch_params(Sym(batch), Sym(seq_len), Sym(cap), 48, 4, 128, 4096, 0.1,
                                                        config, torch.float16, fused=fused, copy_past=copy_past)
            plain = triton_launch.attention_launch_params(batch, seq_len, cap, 48, 4, 128, 4096, 0.1, config,
                                                          torch.float16, fused=fused, copy_past=copy_past)
            assert [getattr(g, "value", g) for g in sym["grid"]] == list(plain["grid"])
            # the 12 query heads of a kv head in one tile: 64 // 12 = 5 columns per tile
            copy_tiles = -(-cap // 64) if fused and copy_past else 0
            assert plain["grid"] == (-(-seq_len // 5) + copy_tiles, batch * 4, 1)
        rope = triton_launch.rope_launch_params(Sym(batch), Sym(seq_len), Sym(cap), 48, 4, 128, config)
        assert [getattr(g, "value", g) for g in rope["grid"]] == [-(-seq_len // 16) + -(-cap // 64), 52, batch]
    assert triton_launch.attention_launch_params(1, 1, 1, 8, 2, 64, 0, 1.0,
                                                 config)["constexprs"]["DOT_PRECISION"] == "ieee"
    with pytest.raises(ValueError):
        triton_launch.attention_launch_params(1, 1, 1, 6, 4, 64, 8, 1.0, config)
    with pytest.raises(ValueError):
        triton_launch.attention_launch_params(1, 1, 1, 8, 2, 48, 8, 1.0, config)


def test_aot_signatures_follow_the_plugin_calling_convention():
    """(input pointers..., int scalars..., output pointers...), and exactly the kernel's other parameters."""
    for kernel, fn in (("fused", tk.sliding_window_gqa_kernel), ("attention", tk.sliding_window_gqa_kernel),
                       ("rope", tk.rope_cache_kernel)):
        signature, none_args = triton_launch.aot_signature(kernel, torch.bfloat16)
        kinds = ["scalar" if t == "i32" else "ptr" for t in signature.values()]
        first, last = kinds.index("scalar"), len(kinds) - 1 - kinds[::-1].index("scalar")
        assert set(kinds[first:last + 1]) == {"scalar"} and len(kinds) - last - 1 >= 1
        names = list(signature) + list(none_args)
        params = [p for p in fn.arg_names if p not in names]
        assert all(p.isupper() for p in params), params  # everything else is a constexpr
        assert [p for p in fn.arg_names if p in signature] == list(signature)  # declaration order


def test_aot_compile_for_sm90_without_spills():
    """The kernels compile to PTX/cubin for Hopper (no GPU needed) at StarCoder2-15b shapes, no spills."""
    script = textwrap.dedent("""
        import json, os, subprocess, sys, tempfile, torch
        from sc2deploy.plugins import tiling, triton_launch
        from sc2deploy.plugins import triton_kernel as tk
        cuobjdump = os.path.join(os.path.dirname(tk.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = []
        jobs = [(kernel, dtype, seq_len) for dtype in (torch.float16, torch.bfloat16) for seq_len in (1, 4096)
                for kernel in ("fused", "attention")] + [("rope", torch.bfloat16, 4096)]
        for kernel, dtype, seq_len in jobs:
            config = tiling.default_config(seq_len, 48, 4, 128, dtype, fused=kernel == "fused")
            ck = triton_launch.compile_aot(kernel, dtype, 48, 4, 128, 4096, 128 ** -0.5, config)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(ck.asm["cubin"]); f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            signature, _ = triton_launch.aot_signature(kernel, dtype)
            ptx = ck.asm["ptx"]
            entry = ptx[ptx.index(".entry"):]
            params = entry[:entry.index(")")].count(".param")
            report.append(dict(kernel=kernel, seq_len=seq_len, name=ck.metadata.name, shared=ck.metadata.shared,
                               usage=usage, params=params, signature=len(signature)))
        print(json.dumps(report))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("AOT compilation took over 400 s")
    if proc.returncode and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas for the CUDA backend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 9
    for item in report:
        assert item["name"] == ("rope_cache_kernel" if item["kernel"] == "rope" else "sliding_window_gqa_kernel")
        assert item["shared"] <= 227 * 1024, item
        assert "STACK:0 " in item["usage"], item  # no register spills
        # Triton appends global/profile scratch pointers after the signature's parameters.
        assert item["params"] >= item["signature"], item


# ---------------------------------------------------------------------------------------------
# gpu_check helpers, on CPU with tiny shapes
# ---------------------------------------------------------------------------------------------


def test_window_mask_is_the_contract_rule():
    q = torch.arange(5, 12)
    k = torch.arange(0, 12)
    for w in (0, 1, 4, 20):
        mask = gpu_check.window_mask(q, k, w)
        for i, qi in enumerate(q.tolist()):
            for j, kj in enumerate(k.tolist()):
                assert bool(mask[i, j]) == (0 <= qi - kj and (w <= 0 or qi - kj < w))


def test_make_inputs_row_rules():
    first = inputs(4, 2, 16, 10, 8, 8, F16, lengths=[10, 3])
    assert first["seqlens_k"].tolist() == [9, 2] and int(first["total_sequence_length"]) == 10
    assert first["query"].shape == (2, 10, 64) and first["key"].shape == (2, 10, 32)
    assert first["past_key"].shape == (2, 2, 8, 16) and first["query"].dtype == F16
    chunk = inputs(4, 2, 16, 3, 8, 8, F32, past=[5, 0])
    assert chunk["seqlens_k"].tolist() == [7, 2] and int(chunk["total_sequence_length"]) == 8
    assert chunk["cos_cache"].shape[0] >= 9
    with pytest.raises(ValueError):
        inputs(4, 2, 16, 3, 8, 8, F32, past=[0, 0])


@pytest.mark.parametrize("w", [0, 5, 12])
def test_sdpa_windowed_and_chunked_reference_match_the_reference(w):
    args = inputs(4, 2, 16, 12, w, 12, F32, device="cpu")
    ref_out, ref_k, ref_v = sliding_window_gqa_reference(**args)
    out, cache_k, cache_v = gpu_check.chunked_reference(args, chunk=5)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)
    pos = torch.arange(12)
    q = gpu_check.rotate(args["query"].view(1, 12, 4, 16).transpose(1, 2), pos, args["cos_cache"], args["sin_cache"])
    v = args["value"].view(1, 12, 2, 16).transpose(1, 2)
    sdpa = gpu_check.sdpa_windowed(q, ref_k, v, gpu_check.window_mask(pos, pos, w), args["scale"])
    torch.testing.assert_close(sdpa.transpose(1, 2).reshape(1, 12, -1), ref_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nq,nkv,h,w,seq_lens,dtypes", [
    (4, 2, 16, 8, (24,), ("float32", "bfloat16")),
    (2, 1, 32, 16, (12, 40), ("float16",)),
])
def test_kernel_check_runs_on_cpu(nq, nkv, h, w, seq_lens, dtypes):
    if not tk.INTERPRET:
        pytest.skip("the CPU run of kernel_check needs the interpreter")
    result = gpu_check.kernel_check("cpu", num_heads=nq, kv_heads=nkv, head_dim=h, window=w, seq_lens=seq_lens,
                                    dtypes=dtypes, decode_batches=(2,), decode_past=2 * w + 3, chunk=8, warmup=0,
                                    iters=1)
    json.dumps(result)
    assert result["errors"] == []
    assert len(result["cases"]) == len(dtypes) * (len(seq_lens) + 1)
    for case in result["cases"]:
        tol = ATOL[getattr(torch, case["dtype"])]
        assert case["max_abs_err"] <= tol and case["cache_max_abs_err"] == 0.0
        assert case["triton_ms"] > 0 and case["sdpa_ms"] > 0
        if case["kind"] == "prefill":
            assert case["sdpa_vs_triton_max_abs_err"] <= 2 * tol
        else:
            assert case["flash_decode_max_abs_err"] <= tol and case["flash_decode_cache_max_abs_err"] == 0.0
            assert case["flash_decode_ms"] > 0 and case["flash_decode_splits"] >= 1
