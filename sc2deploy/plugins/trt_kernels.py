"""The Triton side of the TensorRT plugins, without TensorRT: launch plans, AOT compilation, tensors.

`trt_plugin.py` registers the plugins (`trt_rules.SPECS`) with `tensorrt.plugin`; everything
that does not need TensorRT lives here so that it runs (and is tested) on any machine with triton:

* `launch_plan`: grid, int32 extra arguments, warps, stages and constexprs of a plugin's kernel
  (`rope_cache_kernel` for RopeCache, the unfused `sliding_window_gqa_kernel` for
  SlidingWindowGQA) for inputs of given shapes. Sizes may be ints or TensorRT symbolic dims
  (`ShapeExpr`): the same function gives `aot_impl` its symbolic grid and the JIT path (and
  the tests) concrete ones.
* `launch_like_tensorrt`: launches a plugin's kernel the way TensorRT launches an AOT plugin:
  (input pointers..., extra int32 scalars..., output pointers...), nothing else. Under
  TRITON_INTERPRET=1 this checks on CPU that the AOT calling convention of the two plugins,
  one after the other, computes the contract.
* `compile_for_aot`: the kernel compiled to PTX for a CUDA target (works without a GPU when a
  target is given), with its launch metadata checked for what an AOT plugin launch cannot
  provide (scratch memory, clusters, cooperative launches).
* `as_torch`: a zero-copy torch view of a `tensorrt.plugin.Tensor`, bf16 included (its own
  `__cuda_array_interface__` refuses bf16).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sc2deploy.plugins import tiling, triton_launch
from sc2deploy.plugins import triton_kernel as tk
from sc2deploy.plugins.trt_rules import OpSpec, PluginRuleError, aot_extra_args

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int32": torch.int32}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_CAI_TYPESTR = {"fp16": "<f2", "bf16": "<i2", "fp32": "<f4", "int32": "<i4", "int64": "<i8", "int8": "|i1"}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "int32": 4, "int64": 8, "int8": 1}


# ---------------------------------------------------------------- tactics -> kernel configs
def kernel_config(tactic_name: str, dtype: str, num_heads: int, kv_num_heads: int,
                  head_dim: int) -> tiling.KernelConfig:
    """The attention KernelConfig of a named tactic (trt_rules.TACTICS); every tactic computes the same values."""
    torch_dtype = TORCH_DTYPES[dtype]
    if dtype == "fp32" or tactic_name == "prefill":
        return tiling.default_config(1024, num_heads, kv_num_heads, head_dim, torch_dtype, fused=False)
    if tactic_name == "decode":
        return tiling.default_config(1, num_heads, kv_num_heads, head_dim, torch_dtype, fused=False)
    if tactic_name == "compact":
        return tiling.KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    raise PluginRuleError(f"unknown tactic {tactic_name!r}")


# ---------------------------------------------------------------- launch plans
def static_int(dim: Any, what: str) -> int:
    """An int from an int or a constant TensorRT dim expression; PluginRuleError if it is dynamic."""
    if isinstance(dim, int):
        return dim
    try:
        if dim.is_constant:
            return int(dim.constant_value())
    except Exception:  # a fake ShapeExpr outside a shape context, or an API difference
        expr = getattr(dim, "_expr", None)
        if expr is not None and expr.is_constant():
            return int(expr.get_constant_value())
    raise PluginRuleError(f"{what} must be static in the graph (got a dynamic dimension)")


@dataclass(frozen=True)
class LaunchPlan:
    kernel: str  # name of the @triton.jit function in triton_kernel
    grid: tuple[Any, Any, Any]
    extra_args: tuple[Any, ...]  # int32 scalars between input and output pointers
    num_warps: int
    num_stages: int
    constexprs: dict[str, Any]  # including the pointer parameters passed as None
    signature: dict[str, str]  # Triton signature of the non-constexpr parameters, in AOT order


def launch_plan(spec: OpSpec, input_shapes: Sequence[Sequence[Any]], attrs: dict[str, Any], dtype: str,
                tactic_name: str = "prefill") -> LaunchPlan:
    """How `spec`'s kernel is launched for inputs of these shapes (ints or symbolic dims).

    Only + * // touch the sizes, so symbolic dims give symbolic grids. The head size must be
    static: it is read from past_key's last dim. tactic_name picks the attention's block shapes
    (RopeCache has one configuration). The present cache is a separate output (TensorRT does
    not alias it to the past), so RopeCache copies the untouched past slots.
    """
    by_name = dict(zip(spec.inputs, input_shapes))
    nq, nkv = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    head_dim = static_int(by_name["past_key"][3], f"{spec.name}: the head size (past_key's last dim)")
    batch = input_shapes[0][0]
    seq_len, capacity = aot_extra_args(spec, input_shapes)
    signature, none_args = triton_launch.aot_signature(spec.kernel, TORCH_DTYPES[dtype])
    if spec.kernel == "rope":
        name = "rope_cache_kernel"
        p = triton_launch.rope_launch_params(batch, seq_len, capacity, nq, nkv, head_dim, tiling.KernelConfig(),
                                             copy_past=True)
    else:
        name = "sliding_window_gqa_kernel"
        config = kernel_config(tactic_name, dtype, nq, nkv, head_dim)
        p = triton_launch.attention_launch_params(batch, seq_len, capacity, nq, nkv, head_dim,
                                                  int(attrs["local_window_size"]), float(attrs["scale"]), config,
                                                  TORCH_DTYPES[dtype], fused=False)
    gx, gy, gz = p["grid"]
    return LaunchPlan(name, (gx, gy, gz), (seq_len, capacity), int(p["num_warps"]), int(p["num_stages"]),
                      dict(p["constexprs"], **none_args), dict(signature))


def launch_like_tensorrt(spec: OpSpec, inputs: Sequence[Tensor], outputs: Sequence[Tensor], attrs: dict[str, Any],
                         tactic_name: str = "prefill") -> None:
    """Launch `spec`'s kernel with TensorRT's AOT argument order: inputs, extra int32 scalars, outputs.

    The arguments are bound to the plan's signature, the kernel's non-constexpr parameters in
    declaration order: exactly the parameters the PTX entry of an AOT build takes.
    """
    if len(inputs) != len(spec.inputs) or len(outputs) != len(spec.outputs):
        raise PluginRuleError(f"{spec.name} takes {len(spec.inputs)} inputs and {len(spec.outputs)} outputs")
    inputs = [t.contiguous() for t in inputs]  # TensorRT's linear tensors are dense; torch views may not be
    if not all(t.is_contiguous() for t in outputs):
        raise PluginRuleError(f"{spec.name}: outputs must be contiguous")
    plan = launch_plan(spec, [tuple(t.shape) for t in inputs], attrs, DTYPE_NAMES[inputs[0].dtype], tactic_name)
    if 0 in plan.grid:
        return
    args = dict(zip(plan.signature, [*inputs, *plan.extra_args, *outputs], strict=True))
    getattr(tk, plan.kernel)[plan.grid](**args, **plan.constexprs, num_warps=plan.num_warps,
                                        num_stages=plan.num_stages)


# ---------------------------------------------------------------- AOT compilation
@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    ptx_version: int | None


def compile_for_aot(spec: OpSpec, input_shapes: Sequence[Sequence[Any]], attrs: dict[str, Any], dtype: str,
                    tactic_name: str = "prefill", target: Any = None) -> tuple[CompiledKernel, LaunchPlan]:
    """`spec`'s kernel compiled to PTX for `target` (default: the current GPU), and its launch plan.

    Raises RuntimeError if the compiled kernel needs something an AOT plugin launch cannot give it.
    Must run with TRITON_INTERPRET unset. Compilations are cached per (kernel, constexprs, target):
    TensorRT asks again for every type combination, tactic and profile.
    """
    if tk.INTERPRET:
        raise RuntimeError("AOT compilation needs triton_kernel imported without TRITON_INTERPRET=1")
    import triton

    plan = launch_plan(spec, input_shapes, attrs, dtype, tactic_name)
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    key = (plan.kernel, tuple(plan.signature.items()), tuple(sorted(plan.constexprs.items())), plan.num_warps,
           plan.num_stages, target.backend, target.arch, target.warp_size)
    return _compile(key), plan


@functools.lru_cache(maxsize=64)
def _compile(key: tuple) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature_items, constexpr_items, num_warps, num_stages, backend, arch, warp_size = key
    constexprs = dict(constexpr_items)
    signature = dict(signature_items)
    signature.update({name: "constexpr" for name in constexprs})
    target = GPUTarget(backend, arch, warp_size)
    options: dict[str, Any] = {"num_warps": num_warps, "num_stages": num_stages}
    cap = driver_ptx_version()
    if cap is not None:
        emitted = triton_ptx_version(target)
        if emitted is not None and emitted > cap:  # the driver JIT-compiles the PTX: hold the ISA to what it knows
            options["ptx_version"] = cap
    src = ASTSource(fn=getattr(tk, kernel), signature=signature, constexprs=constexprs)
    return check_launch_metadata(triton.compile(src, target=target, options=options))


def check_launch_metadata(compiled: Any) -> CompiledKernel:
    """Name, PTX, warps, shared memory of a compiled kernel; RuntimeError for launch needs AOT cannot meet.

    TensorRT launches an AOT kernel with the pointers and scalars it was given and pads the
    hidden trailing parameters Triton adds (scratch pointers) with null: fine only when the
    kernel asks for no scratch memory.
    """
    md = compiled.metadata
    name = str(md.name)
    problems = []
    for field in ("global_scratch_size", "profile_scratch_size", "tmem_size"):
        if int(getattr(md, field, 0) or 0):
            problems.append(f"{field}={getattr(md, field)}")
    if int(getattr(md, "num_ctas", 1) or 1) != 1:
        problems.append(f"num_ctas={md.num_ctas}")
    for flag in ("launch_cooperative_grid", "launch_pdl"):
        if bool(getattr(md, flag, False)):
            problems.append(f"{flag}=True")
    if getattr(md, "tensordesc_meta", None):
        problems.append("tensor descriptors")
    if problems:
        raise RuntimeError(f"Triton kernel {name} needs {', '.join(problems)}, which a TensorRT AOT plugin "
                           "launch does not provide; pick another tactic or use the JIT plugins (--plugin jit)")
    ptx = compiled.asm["ptx"]
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    return CompiledKernel(name, ptx, int(md.num_warps), int(md.shared), ptx_isa_version(ptx))


def ptx_isa_version(ptx: str) -> int | None:
    """'.version 8.7' -> 87 (Triton's ptx_version convention), None if absent."""
    for line in ptx.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == ".version":
            major, _, minor = parts[1].partition(".")
            if major.isdigit() and minor.isdigit():
                return int(major) * 10 + int(minor)
    return None


def ptx_entry_params(ptx: str, name: str) -> int:
    """Number of parameters of kernel `name` in PTX (to check the calling convention)."""
    start = ptx.index(f".entry {name}(")
    end = ptx.index(")", start)
    return ptx[start:end].count(".param")


def driver_ptx_version() -> int | None:
    """The newest PTX ISA the installed CUDA driver JIT-compiles, or None when unknown (no driver)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        from triton.backends.nvidia.compiler import ptx_get_version

        return int(ptx_get_version(f"{version.value // 1000}.{(version.value % 1000) // 10}"))
    except Exception:
        return None


def triton_ptx_version(target: Any) -> int | None:
    """The PTX ISA Triton emits by default for `target` (from its bundled ptxas), or None when unknown."""
    try:
        import inspect

        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        args = (target.arch,) if inspect.signature(get_ptxas).parameters else ()
        return int(ptx_get_version(get_ptxas(*args).version))
    except Exception:
        return None


# ---------------------------------------------------------------- TensorRT tensors as torch tensors
class _CudaArray:
    """An object torch.as_tensor accepts: the __cuda_array_interface__ of a raw device buffer."""

    def __init__(self, interface: dict[str, Any]):
        self.__cuda_array_interface__ = interface


def cuda_array_interface(data_ptr: int, shape: Sequence[int], strides: Sequence[int] | None, dtype: str) -> dict:
    """__cuda_array_interface__ (v3) of a buffer; bf16 is described as int16 (torch views it back)."""
    if dtype not in _CAI_TYPESTR:
        raise PluginRuleError(f"no torch view for dtype {dtype}")
    item = _ITEMSIZE[dtype]
    return {"shape": tuple(int(d) for d in shape), "typestr": _CAI_TYPESTR[dtype], "data": (int(data_ptr), False),
            "strides": None if strides is None else tuple(int(s) * item for s in strides), "version": 3,
            "stream": None}


def as_torch(tensor: Any, dtype: str) -> Tensor:
    """Zero-copy torch CUDA view of a `tensorrt.plugin.Tensor` of dtype name `dtype`."""
    interface = cuda_array_interface(tensor.data_ptr, tuple(tensor.shape), tuple(tensor.strides), dtype)
    view = torch.as_tensor(_CudaArray(interface), device="cuda")
    return view.view(torch.bfloat16) if dtype == "bf16" else view
