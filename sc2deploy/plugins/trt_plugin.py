"""The two TensorRT plugins of `trt_rules.SPECS`, registered with TensorRT's Python plugin API.

Importing this module registers `sc2deploy::RopeCache` and `sc2deploy::SlidingWindowGQA` (it
needs tensorrt >= 10.9 and triton; import it only on the TensorRT path, e.g. through
`register_plugins()`). For each:

* `register`: output shapes and dtypes, each output like one input (`OpSpec.like`); dtypes are
  checked by `trt_rules.output_dtypes`.
* `autotune`: linear fp16 | bf16 | fp32 activations (int32 lengths, fp32 RoPE tables). The
  attention also offers three tactics (prefill tiles, decode tiles, small shared memory) that
  TensorRT times per optimization profile; RopeCache has one configuration.
* `aot_impl`: its Triton kernel compiled to PTX for the building GPU and embedded in the engine,
  with a symbolic grid and (seq_len, capacity) as int32 extra arguments: engines built this way
  run without Python (trtexec, C++).
* `impl`: the same kernel launched from Python on TensorRT's stream (JIT plugins).

The ONNX parser maps the export's RopeCache and SlidingWindowGQA nodes here by op_type and the
node's plugin_namespace attribute ("sc2deploy"); the node's attribute "aot" (set by `sc2deploy
build`) picks aot_impl or impl.

No `from __future__ import annotations` here: tensorrt.plugin inspects these annotations at
run time and needs the real classes. The tensorrt-stubs package has no stubs for
tensorrt.plugin, so for mypy `trtp` is Any and these annotations check loosely.
"""
from typing import Any, Dict, List, Sequence, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from sc2deploy.plugins import trt_kernels, trt_rules
from sc2deploy.plugins.trt_rules import ATTENTION, ROPE, SPECS, TACTICS, OpSpec, tactic_ids

_DTYPE_NAMES = {trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16", trt.DataType.FLOAT: "fp32",
                trt.DataType.INT32: "int32", trt.DataType.INT64: "int64", trt.DataType.INT8: "int8"}


def dtype_name(dtype: trt.DataType) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _attrs(**values: Any) -> Dict[str, Any]:
    attrs = {name: kind(values[name]) for name, kind in trt_rules.ATTRIBUTES if name in values}
    trt_rules.check_attributes(attrs, head_dim=None)
    return attrs


def _describe(spec: OpSpec, inputs: Sequence[Any]) -> Tuple[Any, ...]:
    trt_rules.output_dtypes(spec, [dtype_name(t.dtype) for t in inputs])  # raises with the input and the rule
    return tuple(inputs[i].like() for i in spec.like)


def _aot(spec: OpSpec, inputs: Sequence[Any], attrs: Dict[str, Any],
         tactic: str = "prefill") -> Tuple[str, str, Any, Any]:
    shapes = [list(t.shape_expr) for t in inputs]
    compiled, plan = trt_kernels.compile_for_aot(spec, shapes, attrs, dtype_name(inputs[0].dtype), tactic)
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    extra = trtp.SymIntExprs(len(plan.extra_args))
    for i, arg in enumerate(plan.extra_args):
        extra[i] = trtp.SymInt32(arg)
    return compiled.name, compiled.ptx, launch, extra


def _jit(spec: OpSpec, inputs: Sequence[Any], outputs: Sequence[Any], attrs: Dict[str, Any], stream: int,
         tactic: str = "prefill") -> None:
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        ins = [trt_kernels.as_torch(t, dtype_name(t.dtype)) for t in inputs]
        outs = [trt_kernels.as_torch(t, dtype_name(t.dtype)) for t in outputs]
        trt_kernels.launch_like_tensorrt(spec, ins, outs, attrs, tactic)


# ---------------------------------------------------------------- sc2deploy::RopeCache
@trtp.register(ROPE.plugin_id)
def rope_cache_desc(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc, num_heads: int, kv_num_heads: int,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads)
    q_rot, k_rot, present_key, present_value = _describe(ROPE, (query, key, value, past_key, past_value, seqlens_k,
                                                                total_sequence_length, cos_cache, sin_cache))
    return q_rot, k_rot, present_key, present_value


@trtp.autotune(ROPE.plugin_id)
def rope_cache_autotune(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(trt_rules.autotune_types(ROPE), "LINEAR")]


@trtp.aot_impl(ROPE.plugin_id)
def rope_cache_aot_impl(
    query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc, num_heads: int, kv_num_heads: int,
    outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
    return _aot(ROPE, inputs, _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads))  # one configuration: no tactic


@trtp.impl(ROPE.plugin_id)
def rope_cache_impl(
    query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, past_key: trtp.Tensor, past_value: trtp.Tensor,
    seqlens_k: trtp.Tensor, total_sequence_length: trtp.Tensor, cos_cache: trtp.Tensor, sin_cache: trtp.Tensor,
    num_heads: int, kv_num_heads: int,
    outputs: Tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int,
) -> None:
    inputs = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
    _jit(ROPE, inputs, outputs, _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads), stream)


# ---------------------------------------------------------------- sc2deploy::SlidingWindowGQA
@trtp.register(ATTENTION.plugin_id)
def sliding_window_gqa_desc(
    q_rot: trtp.TensorDesc, k_rot: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
) -> trtp.TensorDesc:
    _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads, local_window_size=local_window_size, scale=scale)
    (output,) = _describe(ATTENTION, (q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length))
    return output


@trtp.autotune(ATTENTION.plugin_id)
def sliding_window_gqa_autotune(
    q_rot: trtp.TensorDesc, k_rot: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    outputs: Tuple[trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(trt_rules.autotune_types(ATTENTION), "LINEAR", tactic_ids())]


@trtp.aot_impl(ATTENTION.plugin_id)
def sliding_window_gqa_aot_impl(
    q_rot: trtp.TensorDesc, k_rot: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, seqlens_k: trtp.TensorDesc, total_sequence_length: trtp.TensorDesc,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
    inputs = (q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length)
    attrs = _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads, local_window_size=local_window_size, scale=scale)
    return _aot(ATTENTION, inputs, attrs, TACTICS.get(int(tactic), "prefill"))


@trtp.impl(ATTENTION.plugin_id)
def sliding_window_gqa_impl(
    q_rot: trtp.Tensor, k_rot: trtp.Tensor, value: trtp.Tensor, past_key: trtp.Tensor, past_value: trtp.Tensor,
    seqlens_k: trtp.Tensor, total_sequence_length: trtp.Tensor,
    num_heads: int, kv_num_heads: int, local_window_size: int, scale: float,
    outputs: Tuple[trtp.Tensor], stream: int, tactic: int,
) -> None:
    inputs = (q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length)
    attrs = _attrs(num_heads=num_heads, kv_num_heads=kv_num_heads, local_window_size=local_window_size, scale=scale)
    _jit(ATTENTION, inputs, outputs, attrs, stream, TACTICS.get(int(tactic), "prefill"))


def register_plugins() -> List[str]:
    """Make sure both plugins are registered (importing this module did it); returns their ids, in graph order."""
    return [spec.plugin_id for spec in SPECS.values()]
