"""How the kernels of `triton_kernel` are launched: launch plans and ahead-of-time builds.

`rope_launch_params` / `attention_launch_params` give the grid, num_warps, num_stages and
constexprs of one launch using only + * // on the sizes, so TensorRT's symbolic sizes work
(a TensorRT aot_impl shares them). `aot_signature` and `compile_aot` build the PTX without a
GPU (checked for sm_90 in the tests).
"""
from __future__ import annotations

from typing import Any

import torch
import triton

from sc2deploy.plugins import triton_kernel as kernels
from sc2deploy.plugins.tiling import KernelConfig

__all__ = ["TRITON_DTYPES", "aot_signature", "attention_launch_params", "compile_aot", "rope_launch_params"]

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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
                      INTERPRETER=kernels.INTERPRET)
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
        FUSED=bool(fused), COPY_PAST=copy_past, INTERPRETER=kernels.INTERPRET,
        DOT_PRECISION="ieee" if dtype in (None, torch.float32) else "tf32",
    )
    return dict(grid=((seq_len + (qpb - 1)) // qpb + copy_tiles, batch * (kv_num_heads * ngt), 1),
                num_warps=config.num_warps, num_stages=config.num_stages, constexprs=constexprs,
                columns_per_tile=qpb, group_tile=gt, query_tiles=(seq_len + (qpb - 1)) // qpb)


def aot_signature(kernel: str, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, Any]]:
    """(signature, None-pointer constexprs) of one AOT build, parameters in AOT order.

    kernel: "rope" (`rope_cache_kernel`: the contract's nine inputs, seq_len and capacity, then
    q_rot/k_rot/present_key/present_value), "attention" (`sliding_window_gqa_kernel` unfused:
    q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length, seq_len,
    capacity, then output) -- the TensorRT plugins' kernels -- or "fused"
    (`sliding_window_gqa_kernel`, FUSED: the nine inputs, seq_len and capacity, then
    output/present_key/present_value).
    """
    p = f"*{TRITON_DTYPES[dtype]}"
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
    if kernels.INTERPRET:
        raise RuntimeError("compile_aot needs the kernels built without TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, none_args = aot_signature(kernel, dtype)
    if kernel == "rope":
        fn = kernels.rope_cache_kernel
        params = rope_launch_params(1, 1, 1, num_heads, kv_num_heads, head_dim, config, copy_past=copy_past)
    else:
        fn = kernels.sliding_window_gqa_kernel
        params = attention_launch_params(1, 1, 1, num_heads, kv_num_heads, head_dim, local_window_size, scale,
                                         config, dtype, fused=kernel == "fused", copy_past=copy_past)
    constexprs: dict[str, Any] = dict(params["constexprs"], **none_args)
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    options = {"num_warps": params["num_warps"], "num_stages": params["num_stages"]}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, warp_size), options=options)

