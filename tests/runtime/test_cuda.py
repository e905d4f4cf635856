"""The cuda runtime against the eager model: under TRITON_INTERPRET=1 on CPU here, natively on a GPU host."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sc2deploy.checkpoint import RandomSource  # noqa: E402
from sc2deploy.config import preset  # noqa: E402
from sc2deploy.errors import UserError  # noqa: E402
from sc2deploy.parity import DEFAULT_TOLERANCES  # noqa: E402
from sc2deploy.plugins.triton_kernel import INTERPRET  # noqa: E402
from sc2deploy.runtime.cuda import CudaRuntime, batch_buckets, check_device  # noqa: E402
from sc2deploy.runtime.eager import EagerRuntime  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels were built without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

SOURCE = RandomSource(preset("tiny"), seed=3)  # window 32
WINDOW = SOURCE.config.sliding_window


def close(a, b, dtype):
    tol = DEFAULT_TOLERANCES[dtype]
    b = b.cpu()
    torch.testing.assert_close(a.cpu(), b, atol=tol.atol + tol.rtol * float(b.abs().max()), rtol=0)


@pytest.fixture(scope="module")
def eager():
    return EagerRuntime(SOURCE, dtype="fp32", max_batch=4)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def runtime(request):
    return CudaRuntime(SOURCE, dtype=request.param, max_batch=4, device=DEVICE)


def test_prefill_and_decode_past_the_window_match_eager(runtime, eager):
    """A prompt longer than the window, then 2 W greedy tokens (the ring wraps twice), fed eager's tokens."""
    prompt = [(7 * i + 3) % 1000 for i in range(WINDOW + 9)]
    close(runtime.prefill(1, prompt, all_logits=True), eager.prefill(1, prompt, all_logits=True), runtime.dtype)
    token = int(eager.prefill(1, prompt).argmax())
    for _ in range(2 * WINDOW):
        expected = eager.decode([1], [token])
        got = runtime.decode([1], [token])
        assert got.device.type == torch.device(DEVICE).type and got.dtype == torch.float32
        close(got, expected, runtime.dtype)
        token = int(expected[0].argmax())
    assert runtime.length(1) == len(prompt) + 2 * WINDOW


def test_batched_prefill_and_scattered_slots_match_eager(runtime, eager):
    """Unequal prompts in one call, then decode of slots 3 and 0 (not contiguous, in that order)."""
    prompts = [[5, 9, 2, 11, 40], [1] * 3, [8, 8, 3, 2, 1, 0, 7, 5, 6, 10, 12, 14], [4, 4]]
    for got, want in zip(runtime.prefill_batch(prompts), eager.prefill_batch(prompts)):
        close(got, want, runtime.dtype)
    tokens = [17, 23]
    for _ in range(3):
        want = eager.decode([3, 0], tokens)
        close(runtime.decode([3, 0], tokens), want, runtime.dtype)
        tokens = [int(t) for t in want.argmax(-1)]
    close(runtime.decode([2], [5]), eager.decode([2], [5]), runtime.dtype)


def test_fp32_is_exact_to_summation_order(eager):
    runtime = CudaRuntime(SOURCE, dtype="fp32", max_batch=1, device=DEVICE)
    prompt = list(range(50, 90))
    diff = (runtime.prefill(0, prompt, all_logits=True).cpu() - eager.prefill(0, prompt, all_logits=True)).abs()
    assert float(diff.max()) < 1e-4


def test_a_fresh_prefill_replaces_what_the_slot_held(eager):
    runtime = CudaRuntime(SOURCE, dtype="fp32", max_batch=1, device=DEVICE)
    runtime.prefill(0, list(range(100, 160)))
    for _ in range(5):
        runtime.decode([0], [1])
    prompt = [3, 1, 4, 1, 5]
    runtime.prefill(0, prompt)
    eager.prefill(0, prompt)
    close(runtime.decode([0], [9]), eager.decode([0], [9]), "fp32")


def test_bad_use_is_refused(runtime):
    with pytest.raises(UserError, match="outside the vocabulary"):
        runtime.prefill(0, [10**6])
    with pytest.raises(ValueError, match="prefill it first"):
        CudaRuntime(SOURCE, dtype="fp32", max_batch=2, device=DEVICE).decode([1], [3])
    with pytest.raises(UserError, match="unknown dtype"):
        CudaRuntime(SOURCE, dtype="int3", device=DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_no_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        check_device("cuda")


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
