"""On a GPU host (`pytest -m gpu`, TRITON_INTERPRET=0): the kernels natively at 15b shapes and the cuda runtime,
with CUDA graphs, against eager (one served request: tests/serving/test_cuda_backend.py). Skipped, with the
reason, without CUDA."""
from __future__ import annotations

import pytest
import torch

from sc2deploy.attention import sliding_window_gqa_reference
from sc2deploy.checkpoint import RandomSource
from sc2deploy.config import preset
from sc2deploy.parity import DEFAULT_TOLERANCES

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

ATOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}  # the selftest's kernel tolerances at 15b shapes
NQ, NKV, H, W = 48, 4, 128, 4096  # StarCoder2-15b attention


def native():
    from sc2deploy.plugins import triton_kernel as tk

    if tk.INTERPRET:
        pytest.skip("set TRITON_INTERPRET=0: these tests run the kernels natively")
    return tk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, past", [(1, 8192), (8, 5000), (3, 17)])
def test_flash_decode_at_15b_shapes(dtype, batch, past):
    native()
    from bench.gpu_check import make_inputs
    from sc2deploy.plugins.triton_decode import decode_attention, sm_count, split_count

    args = make_inputs(batch=batch, seq_len=1, num_heads=NQ, kv_heads=NKV, head_dim=H, capacity=W, window=W,
                       dtype=dtype, device="cuda", past=[past] * batch)
    ref, ref_k, ref_v = sliding_window_gqa_reference(**args)
    k_cache, v_cache = args["past_key"].clone(), args["past_value"].clone()
    splits = split_count(batch, NKV, W - 1, sm_count(torch.device("cuda")))
    out = decode_attention(args["query"][:, 0], args["key"][:, 0], args["value"][:, 0], k_cache, v_cache,
                           torch.arange(batch, dtype=torch.int32, device="cuda"), args["seqlens_k"],
                           args["cos_cache"].contiguous(), args["sin_cache"].contiguous(), NQ, NKV, W, H**-0.5,
                           num_splits=splits)
    assert float((out.float() - ref[:, 0].float()).abs().max()) <= ATOL[dtype]
    assert float((k_cache.float() - ref_k.float()).abs().max()) <= ATOL[dtype]
    assert torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_at_15b_shapes(dtype):
    native()
    from bench.gpu_check import chunked_reference, make_inputs
    from sc2deploy.plugins import triton_attention

    args = make_inputs(batch=1, seq_len=5000, num_heads=NQ, kv_heads=NKV, head_dim=H, capacity=W, window=W,
                       dtype=dtype, device="cuda")
    ref, _, _ = chunked_reference(args, 1024)
    out, _, _, _ = triton_attention.launch(**args, fused=False)
    assert float((out.float() - ref.float()).abs().max()) <= ATOL[dtype]


@pytest.fixture(scope="module")
def tiny():
    return RandomSource(preset("tiny"), seed=5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_runtime_with_graphs_matches_eager(tiny, dtype):
    """Graph replays (3 rows in the bucket of 4) and plain launches both follow the fp32 eager model."""
    native()
    from sc2deploy.runtime.cuda import CudaRuntime
    from sc2deploy.runtime.eager import EagerRuntime

    graphs = CudaRuntime(tiny, dtype=dtype, max_batch=4, device="cuda", graphs=True)
    plain = CudaRuntime(tiny, dtype=dtype, max_batch=4, device="cuda", graphs=False)
    eager = EagerRuntime(tiny, dtype="fp32", max_batch=4)
    tol = DEFAULT_TOLERANCES[dtype]
    prompts = [[(5 * i + r) % 997 for i in range(40 + 7 * r)] for r in range(3)]
    for runtime in (graphs, plain, eager):
        runtime.prefill_batch(prompts)
    slots, tokens = [2, 0, 1], [11, 12, 13]  # 3 rows: bucket 4 with one padding row
    for _ in range(3 * tiny.config.sliding_window):
        want = eager.decode(slots, tokens)
        bound = tol.atol + tol.rtol * float(want.abs().max())
        for runtime in (graphs, plain):
            assert float((runtime.decode(slots, tokens).cpu() - want).abs().max()) <= bound
        tokens = [int(t) for t in want.argmax(-1)]
