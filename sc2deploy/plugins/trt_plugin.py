"""`sc2deploy::SlidingWindowGQA` registered with TensorRT's Python plugin API (tensorrt.plugin).

Importing this module registers the plugin (it needs tensorrt >= 10.9 and triton; import it
only on the TensorRT path, e.g. through `register_plugins()`):

* `register`: output shapes and dtypes. Output/present_key/present_value are shaped and typed
  like query/past_key/past_value; dtypes are checked by `trt_rules.output_dtypes`.
* `autotune`: linear fp16 | bf16 | fp32 activations (int32 lengths, fp32 RoPE tables), and
  three tactics (prefill tiles, decode tiles, small shared memory) that TensorRT times per
  optimization profile.
* `aot_impl`: the fused Triton kernel compiled to PTX for the building GPU and embedded in the
  engine, with a symbolic grid and (seq_len, capacity) as int32 extra arguments: engines
  built this way run without Python (trtexec, C++).
* `impl`: the same kernel launched from Python on TensorRT's stream (JIT plugins).

The ONNX parser maps the export's `SlidingWindowGQA` nodes here by op_type and the node's
plugin_namespace attribute ("sc2deploy"); the node's attribute "aot" (set by `sc2deploy
build`) picks aot_impl or impl.

No `from __future__ import annotations` here: tensorrt.plugin inspects these annotations at
run time and needs the real classes. The tensorrt-stubs package has no stubs for
tensorrt.plugin, so for mypy `trtp` is Any and these annotations check loosely.
"""
from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from sc2deploy.plugins import trt_kernels, trt_rules
from sc2deploy.plugins.trt_rules import GQA, TACTICS, tactic_ids

PLUGIN_ID = GQA.plugin_id

_DTYPE_NAMES = {trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16", trt.DataType.FLOAT: "fp32",
                trt.DataType.INT32: "int32", trt.DataType.INT64: "int64", trt.DataType.INT8: "int8"}


def dtype_name(dtype: trt.DataType) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _attrs(num_heads: int, kv_num_heads: int, local_window_size: int, scale: float) -> dict:
    attrs = {"num_heads": int(num_heads), "kv_num_heads": int(kv_num_heads),
             "local_window_size": int(local_window_size), "scale": float(scale)}
    trt_rules.check_attributes(attrs, head_dim=None)
    return attrs


@trtp.register(PLUGIN_ID)
def sliding_window_gqa_desc(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
    trt_rules.output_dtypes(GQA, [dtype_name(t.dtype) for t in inputs])  # raises with the input and the rule
    _attrs(num_heads, kv_num_heads, local_window_size, scale)
    out = tuple(inputs[i].like() for i in GQA.like)
    return out[0], out[1], out[2]


@trtp.autotune(PLUGIN_ID)
def sliding_window_gqa_autotune(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(trt_rules.autotune_types(GQA), "LINEAR", tactic_ids())]


@trtp.aot_impl(PLUGIN_ID)
def sliding_window_gqa_aot_impl(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
    shapes = [list(t.shape_expr) for t in inputs]
    attrs = _attrs(num_heads, kv_num_heads, local_window_size, scale)
    compiled, plan = trt_kernels.compile_for_aot(GQA, shapes, attrs, dtype_name(query.dtype),
                                                 TACTICS.get(int(tactic), "prefill"))
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    extra = trtp.SymIntExprs(len(plan.extra_args))
    for i, arg in enumerate(plan.extra_args):
        extra[i] = trtp.SymInt32(arg)
    return compiled.name, compiled.ptx, launch, extra


@trtp.impl(PLUGIN_ID)
def sliding_window_gqa_impl(
    query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, past_key: trtp.Tensor, past_value: trtp.Tensor,
    seqlens_k: trtp.Tensor, total_sequence_length: trtp.Tensor, cos_cache: trtp.Tensor, sin_cache: trtp.Tensor,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    outputs: Tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int, tactic: int,
) -> None:
    import torch

    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
    attrs = _attrs(num_heads, kv_num_heads, local_window_size, scale)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        ins = [trt_kernels.as_torch(t, dtype_name(t.dtype)) for t in inputs]
        outs = [trt_kernels.as_torch(t, dtype_name(t.dtype)) for t in outputs]
        trt_kernels.launch_like_tensorrt(GQA, ins, outs, attrs, TACTICS.get(int(tactic), "prefill"))


def register_plugins() -> str:
    """Make sure the plugin is registered (importing this module did it); returns its id."""
    return PLUGIN_ID
