"""Check the Triton sliding-window GQA kernels on a GPU at real shapes: error and speed.

    PYTHONPATH=. python3 bench/gpu_check.py > report.json

`kernel_check(device="cuda")` returns a JSON-serialisable dict:
  * prefill cases (batch 1, first prompt of S tokens, ring cache of C = W slots), per dtype:
    max abs error of the output against the contract's reference (`sliding_window_gqa_reference`,
    run chunk by chunk over a linear cache so that its O(S * T) score matrix fits), whether the
    ring cache the kernel wrote holds exactly the last C rotated keys/values (both for the
    fused single kernel and the two-kernel path, prefix `two_kernel_`), and the time of the
    whole op (RoPE + cache write + attention; fused and two-kernel), of the attention kernel
    alone, and of torch's `scaled_dot_product_attention` on the same rotated q/k/v with a
    window mask (full S x S: SDPA has no window skipping);
  * decode cases (one new token per row over a full, wrapped ring of C = W slots): errors
    against the reference, time (fused with a copied cache, fused in place, two-kernel)
    against SDPA over the W cached keys; and the cuda runtime's flash-decoding
    (`triton_decode`), error and time against SDPA, both timed as CUDA graph replays.
The helpers (`make_inputs`, `window_mask`, `sdpa_windowed`, `chunked_reference`) work on any
device; with TRITON_INTERPRET=1 and tiny shapes, `kernel_check(device="cpu", ...)` runs on CPU.
Imports triton (through sc2deploy.plugins) only when called.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from sc2deploy.attention import rope_cache, sliding_window_gqa_reference  # noqa: E402

__all__ = ["chunked_reference", "kernel_check", "make_inputs", "rotate", "sdpa_windowed", "window_mask"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_inputs(*, batch: int, seq_len: int, num_heads: int, kv_heads: int, head_dim: int, capacity: int,
                window: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                lengths: list[int] | None = None, past: list[int] | None = None, seed: int = 0,
                theta: float = 100000.0) -> dict[str, Any]:
    """Keyword arguments of `sliding_window_gqa_reference` (and of the Triton wrapper).

    past=None: a first prompt, row b with lengths[b] (default seq_len) real tokens, right-padded.
    past=[...]: row b already holds past[b] positions and all seq_len tokens are new.
    Inputs are N(0, 1); the cache holds random values in every slot.
    """
    g = torch.Generator().manual_seed(seed)
    if past is None:
        lengths = [seq_len] * batch if lengths is None else list(lengths)
        if len(lengths) != batch or not all(1 <= n <= seq_len for n in lengths):
            raise ValueError(f"lengths {lengths} must be {batch} values in [1, {seq_len}]")
        totals, total_cols = lengths, seq_len
    else:
        if len(past) != batch or min(past) < 0:
            raise ValueError(f"past {past} must be {batch} values >= 0")
        totals = [p + seq_len for p in past]
        total_cols = max(totals)
        if total_cols == seq_len:
            raise ValueError("with a past, some row must hold at least one past position")
    cos, sin = rope_cache(head_dim, theta, max(totals) + 1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return dict(
        query=randn(batch, seq_len, num_heads * head_dim),
        key=randn(batch, seq_len, kv_heads * head_dim),
        value=randn(batch, seq_len, kv_heads * head_dim),
        past_key=randn(batch, kv_heads, capacity, head_dim),
        past_value=randn(batch, kv_heads, capacity, head_dim),
        seqlens_k=torch.tensor([t - 1 for t in totals], dtype=torch.int32, device=device),
        total_sequence_length=torch.tensor(total_cols, dtype=torch.int32, device=device),
        cos_cache=cos.to(device), sin_cache=sin.to(device),
        num_heads=num_heads, kv_num_heads=kv_heads, local_window_size=window, scale=head_dim ** -0.5,
    )


def rotate(x: Tensor, positions: Tensor, cos_cache: Tensor, sin_cache: Tensor) -> Tensor:
    """NeoX RoPE of x (B, N, S, H) at positions (S,), as the contract does it (in x's dtype)."""
    cos = torch.cat((cos_cache[positions], cos_cache[positions]), dim=-1).to(x.dtype)
    sin = torch.cat((sin_cache[positions], sin_cache[positions]), dim=-1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def window_mask(q_positions: Tensor, k_positions: Tensor, window: int) -> Tensor:
    """Bool (Sq, Sk), True where the query at q_positions[i] sees the key at k_positions[j].

    The contract's rule: 0 <= i - j < window (window <= 0: no window, causal only).
    """
    distance = q_positions[:, None] - k_positions[None, :]
    visible = distance >= 0
    if window > 0:
        visible &= distance < window
    return visible


def sdpa_windowed(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """torch SDPA of rotated q (B, Nq, S, H) over k/v (B, Nkv, T, H) with a bool mask (S, T).

    GQA by repeating the kv heads; pass k/v already expanded to Nq heads to keep the repeat
    out of a timing.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def chunked_reference(inputs: dict[str, Any], chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference on a first prompt (all rows full length), chunk by chunk over a linear cache.

    Returns (output (B, S, Nq*H), rotated keys (B, Nkv, S, H), values (B, Nkv, S, H)): the
    keys/values as the reference's linear cache holds them. Bounded memory: each chunk's score
    matrix is (chunk, positions so far) instead of (S, S).
    """
    query, key, value = inputs["query"], inputs["key"], inputs["value"]
    batch, seq_len, _ = query.shape
    total = inputs["seqlens_k"].to(torch.int64) + 1
    if int(inputs["total_sequence_length"]) != seq_len or bool((total != seq_len).any()):
        raise ValueError("chunked_reference takes a first prompt with every row of full length")
    kv_heads, head_dim = inputs["kv_num_heads"], query.shape[-1] // inputs["num_heads"]
    cache_k = torch.zeros(batch, kv_heads, seq_len, head_dim, dtype=query.dtype, device=query.device)
    cache_v = torch.zeros_like(cache_k)
    outs = []
    for start in range(0, seq_len, chunk):
        end = min(start + chunk, seq_len)
        out, cache_k, cache_v = sliding_window_gqa_reference(
            query[:, start:end], key[:, start:end], value[:, start:end], cache_k, cache_v,
            torch.full((batch,), end - 1, dtype=torch.int32, device=query.device),
            torch.tensor(end, dtype=torch.int32), inputs["cos_cache"], inputs["sin_cache"],
            inputs["num_heads"], kv_heads, inputs["local_window_size"], inputs["scale"],
        )
        outs.append(out)
    return torch.cat(outs, dim=1), cache_k, cache_v


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1000.0 / iters


def _time_graph_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """GPU time per call, the calls replayed from one CUDA graph: no Python or launch overhead in the figure."""
    if device.type != "cuda":
        return _time_ms(fn, device, 1, iters)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return _time_ms(graph.replay, device, 1, 3) / iters


def _max_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _prefill_case(device: torch.device, dtype: torch.dtype, seq_len: int, num_heads: int, kv_heads: int,
                  head_dim: int, window: int, chunk: int, warmup: int, iters: int,
                  config: Any) -> dict[str, Any]:
    from sc2deploy.plugins.triton_attention import launch

    capacity = window if window > 0 else seq_len
    inputs = make_inputs(batch=1, seq_len=seq_len, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                         capacity=capacity, window=window, dtype=dtype, device=device)
    ref, ref_k, ref_v = chunked_reference(inputs, chunk)
    kept = torch.arange(max(0, seq_len - capacity), seq_len, device=device)
    slots = kept % capacity
    case: dict[str, Any] = dict(kind="prefill", dtype=str(dtype).removeprefix("torch."), seq_len=seq_len,
                                capacity=capacity)
    for fused, tag in ((False, "two_kernel_"), (True, "")):  # `out` stays the fused one
        out, pk, pv, _ = launch(**inputs, fused=fused, config=config)
        case[f"{tag}max_abs_err"] = _max_err(out, ref)
        case[f"{tag}cache_max_abs_err"] = max(_max_err(pk[:, :, slots], ref_k[:, :, kept]),
                                             _max_err(pv[:, :, slots], ref_v[:, :, kept]))
        del pk, pv
    del ref, ref_k, ref_v

    # SDPA on the same rotated q/k/v (prepared outside the timing), full S x S window mask.
    positions = torch.arange(seq_len, device=device)
    b, h = 1, head_dim
    q = rotate(inputs["query"].view(b, seq_len, num_heads, h).transpose(1, 2), positions,
               inputs["cos_cache"], inputs["sin_cache"])
    k = rotate(inputs["key"].view(b, seq_len, kv_heads, h).transpose(1, 2), positions,
               inputs["cos_cache"], inputs["sin_cache"])
    v = inputs["value"].view(b, seq_len, kv_heads, h).transpose(1, 2)
    groups = num_heads // kv_heads
    k_full, v_full = k.repeat_interleave(groups, dim=1).contiguous(), v.repeat_interleave(groups, dim=1).contiguous()
    mask = window_mask(positions, positions, window)
    sdpa_out = sdpa_windowed(q, k_full, v_full, mask, inputs["scale"])
    case["sdpa_vs_triton_max_abs_err"] = _max_err(sdpa_out.transpose(1, 2).reshape(b, seq_len, -1), out)
    del sdpa_out

    case["triton_ms"] = _time_ms(lambda: launch(**inputs, config=config), device, warmup, iters)
    case["triton_two_kernel_ms"] = _time_ms(lambda: launch(**inputs, fused=False, config=config), device,
                                            warmup, iters)
    case["triton_attention_ms"] = _time_attention_only(inputs, config, device, warmup, iters)
    case["sdpa_ms"] = _time_ms(lambda: sdpa_windowed(q, k_full, v_full, mask, inputs["scale"]), device, warmup, iters)
    case["sdpa_over_triton"] = case["sdpa_ms"] / case["triton_ms"] if case["triton_ms"] > 0 else None
    case["two_kernel_over_sdpa"] = case["triton_two_kernel_ms"] / case["sdpa_ms"] if case["sdpa_ms"] > 0 else None
    return case


def _time_attention_only(inputs: dict[str, Any], config: Any, device: torch.device, warmup: int,
                         iters: int) -> float:
    """Time of the unfused attention kernel alone (its q_rot/k_rot inputs: any values of the right shape)."""
    from sc2deploy.plugins import triton_kernel
    from sc2deploy.plugins.tiling import default_config
    from sc2deploy.plugins.triton_launch import attention_launch_params

    query, key = inputs["query"], inputs["key"]
    batch, seq_len, width = query.shape
    head_dim = width // inputs["num_heads"]
    capacity = inputs["past_key"].shape[2]
    if config is None:
        config = default_config(seq_len, inputs["num_heads"], inputs["kv_num_heads"], head_dim, query.dtype,
                                fused=False)
    params = attention_launch_params(batch, seq_len, capacity, inputs["num_heads"], inputs["kv_num_heads"],
                                     head_dim, inputs["local_window_size"], inputs["scale"], config, query.dtype,
                                     fused=False)
    out = torch.empty_like(query)

    def run() -> None:
        triton_kernel.sliding_window_gqa_kernel[params["grid"]](
            query, key, inputs["value"], inputs["past_key"], inputs["past_value"], inputs["seqlens_k"],
            inputs["total_sequence_length"], None, None, seq_len, capacity, out, None, None, None,
            num_warps=params["num_warps"], num_stages=params["num_stages"], **params["constexprs"])

    return _time_ms(run, device, warmup, iters)


def _decode_case(device: torch.device, dtype: torch.dtype, batch: int, past_len: int, num_heads: int,
                 kv_heads: int, head_dim: int, window: int, warmup: int, iters: int, config: Any) -> dict[str, Any]:
    from sc2deploy.plugins.triton_attention import launch

    capacity = window if window > 0 else past_len + 1
    inputs = make_inputs(batch=batch, seq_len=1, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                         capacity=capacity, window=window, dtype=dtype, device=device, past=[past_len] * batch,
                         seed=1)
    ref, ref_k, ref_v = sliding_window_gqa_reference(**inputs)
    case: dict[str, Any] = dict(kind="decode", dtype=str(dtype).removeprefix("torch."), batch=batch,
                                past_len=past_len, capacity=capacity)
    for fused, tag in ((False, "two_kernel_"), (True, "")):
        out, pk, pv, _ = launch(**inputs, fused=fused, config=config)
        case[f"{tag}max_abs_err"] = _max_err(out, ref)
        case[f"{tag}cache_max_abs_err"] = max(_max_err(pk, ref_k), _max_err(pv, ref_v))
    # SDPA baseline: one query over the W cached keys it sees (no mask needed), kv heads expanded.
    groups = num_heads // kv_heads
    q = inputs["query"].view(batch, 1, num_heads, head_dim).transpose(1, 2).contiguous()
    k = ref_k.repeat_interleave(groups, dim=1).contiguous()
    v = ref_v.repeat_interleave(groups, dim=1).contiguous()
    case["triton_ms"] = _time_ms(lambda: launch(**inputs, config=config), device, warmup, iters)
    # In place (present aliases past: no copy of the ring); rewrites the same slot each time.
    case["triton_in_place_ms"] = _time_ms(lambda: launch(**inputs, config=config, present_key=inputs["past_key"],
                                                         present_value=inputs["past_value"]),
                                          device, warmup, iters)
    case["triton_two_kernel_ms"] = _time_ms(lambda: launch(**inputs, fused=False, config=config), device,
                                            warmup, iters)
    case["sdpa_ms"] = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=inputs["scale"]), device,
                               warmup, iters)
    case["sdpa_over_triton"] = case["sdpa_ms"] / case["triton_ms"] if case["triton_ms"] > 0 else None
    case.update(_flash_decode(inputs, ref[:, 0], ref_k, ref_v, device, iters))
    case["sdpa_graph_ms"] = _time_graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=inputs["scale"]),
                                           device, iters)
    case["flash_decode_over_sdpa"] = case["flash_decode_ms"] / case["sdpa_graph_ms"] if case["sdpa_graph_ms"] else None
    return case


def _flash_decode(inputs: dict[str, Any], ref: Tensor, ref_k: Tensor, ref_v: Tensor, device: torch.device,
                  iters: int) -> dict[str, Any]:
    """Error and time (CUDA graph) of the cuda runtime's decode attention (triton_decode) on a decode case."""
    from sc2deploy.plugins.triton_decode import decode_attention, sm_count, split_count

    batch, _, _ = inputs["query"].shape
    kv_heads, window = inputs["kv_num_heads"], inputs["local_window_size"]
    capacity = inputs["past_key"].shape[2]
    splits = split_count(batch, kv_heads, min(window - 1, capacity) if window > 0 else capacity, sm_count(device))
    k_cache, v_cache = inputs["past_key"].clone(), inputs["past_value"].clone()
    rows = torch.arange(batch, dtype=torch.int32, device=device)
    positions = inputs["seqlens_k"].to(torch.int32)

    def run() -> Tensor:
        return decode_attention(inputs["query"][:, 0], inputs["key"][:, 0], inputs["value"][:, 0], k_cache, v_cache,
                                rows, positions, inputs["cos_cache"].contiguous(), inputs["sin_cache"].contiguous(),
                                inputs["num_heads"], kv_heads, window, inputs["scale"], num_splits=splits)

    out = run()
    return {"flash_decode_splits": splits, "flash_decode_max_abs_err": _max_err(out, ref),
            "flash_decode_cache_max_abs_err": max(_max_err(k_cache, ref_k), _max_err(v_cache, ref_v)),
            "flash_decode_ms": _time_graph_ms(run, device, iters)}


def kernel_check(device: str = "cuda", *, num_heads: int = 48, kv_heads: int = 4, head_dim: int = 128,
                 window: int = 4096, seq_lens: tuple[int, ...] = (1024, 4096, 16384),
                 dtypes: tuple[str, ...] = ("float16", "bfloat16"), decode_batches: tuple[int, ...] = (1, 8),
                 decode_past: int = 8192, chunk: int = 1024, warmup: int = 3, iters: int = 10,
                 config: Any = None) -> dict[str, Any]:
    """Error and timing of the Triton kernels against the reference and SDPA; a JSON-serialisable dict.

    Defaults: StarCoder2-15b attention (Nq 48, Nkv 4, H 128, W 4096). Each case that raises is
    recorded under "errors" and the others still run. config: a KernelConfig for every case
    (None: `default_config`).
    """
    import triton

    from sc2deploy.plugins import triton_kernel

    dev = torch.device(device)
    result: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        torch=torch.__version__, triton=triton.__version__, interpreted=triton_kernel.INTERPRET,
        shape=dict(num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, window=window),
        cases=[], errors=[],
    )
    for name in dtypes:
        dtype = _DTYPES[name]
        jobs: list[tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]] = []
        for s in seq_lens:
            jobs.append((f"prefill {name} S={s}", _prefill_case,
                         (dev, dtype, s, num_heads, kv_heads, head_dim, window, chunk, warmup, iters, config)))
        for bsz in decode_batches:
            jobs.append((f"decode {name} B={bsz}", _decode_case,
                         (dev, dtype, bsz, decode_past, num_heads, kv_heads, head_dim, window, warmup, iters,
                          config)))
        for label, job, args in jobs:
            try:
                case = job(*args)
                result["cases"].append({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                        for k, v in case.items()})
            except Exception as exc:  # noqa: BLE001 - recorded, the other cases still run
                result["errors"].append(dict(case=label, error=repr(exc)[:500],
                                             traceback=traceback.format_exc()[-2000:]))
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return judged(result)


# Error bounds of the kernels against the fp32-accumulating reference, by dtype (max |out - ref|).
KERNEL_TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2}


def judged(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with "ok", "tolerance" and "failed_cases": every case within KERNEL_TOLERANCE, no errors."""
    bad = [c for c in result.get("cases", [])
           if c.get("max_abs_err") is None or c["max_abs_err"] > KERNEL_TOLERANCE.get(c.get("dtype", ""), 1e-2)
           or (c.get("cache_max_abs_err") or 0.0) > KERNEL_TOLERANCE.get(c.get("dtype", ""), 1e-2)]
    result["tolerance"] = KERNEL_TOLERANCE
    result["ok"] = not result.get("errors") and not bad and bool(result.get("cases"))
    result["failed_cases"] = [f"{c.get('kind')} {c.get('dtype')} S={c.get('seq_len')} B={c.get('batch')}" for c in bad]
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(kernel_check(), indent=2))
