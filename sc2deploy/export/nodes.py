"""How the contract op `sc2deploy::sliding_window_gqa` becomes an ONNX node, per target.

Both are onnxscript translations handed to the dynamo exporter (custom_translation_table):
the traced call's inputs and attributes (num_heads, kv_num_heads, local_window_size, scale)
come from the reference model; only what the node needs beyond them comes from the config.

ort: `com.microsoft::GroupQueryAttention`, do_rotary=1, rotary_interleaved=0. With a sliding
  window the node has `sliding_window_cache=1` (window-sized KV buffers; ONNX Runtime keeps
  the most recent positions at rows [0, L), see runtime/onnxruntime.py) and a `query_seqlens`
  input computed from the contract's row rules, which a right-padded batch of first prompts
  needs in that mode: seqlens_k + 1 for a first prompt (sequence == total_sequence_length),
  else the sequence length. cos/sin are cast to the activation dtype (the export folds the
  cast into the stored tables).
trt: two TensorRT plugin nodes (`sc2deploy.plugins.trt_rules`), each with plugin_namespace /
  plugin_version and the sizes its plugin needs: `trt.plugins::RopeCache` takes the contract's
  nine inputs unchanged (cos/sin float32) and gives q_rot, k_rot, present_key, present_value;
  `trt.plugins::SlidingWindowGQA` takes q_rot, k_rot, value, past_key, past_value, seqlens_k,
  total_sequence_length and gives the output. Two nodes because a TensorRT AOT plugin embeds
  one kernel, and the prefill is fastest as two (see plugins/triton_kernel.py).
"""
from __future__ import annotations

from collections.abc import Callable

from sc2deploy.config import Config
from sc2deploy.export import schemas
from sc2deploy.contract import GQA_DOMAIN, ONNX_DTYPES, PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION
from sc2deploy.plugins.trt_rules import ATTENTION, ROPE


def attention_translation(config: Config, dtype: str, target: str, prefill_only: bool = False) -> dict:
    """The custom_translation_table entry for torch.ops.sc2deploy.sliding_window_gqa. `prefill_only`: the graph
    runs first prompts with an empty past only (the heads' artifacts, ort), so no window-sized cache mode."""
    import torch

    import sc2deploy.attention  # noqa: F401  (registers the op)

    schemas.register_schemas()
    if target == "ort":
        node = _ort_node(config, dtype, window_cache=config.windowed and not prefill_only)
    else:
        node = _trt_node(config, dtype)
    return {torch.ops.sc2deploy.sliding_window_gqa.default: node}


def _ort_node(config: Config, dtype: str, window_cache: bool) -> Callable:
    from onnxscript import opset20 as op
    from onnxscript.values import Opset

    msft = Opset(GQA_DOMAIN, 1)
    windowed = window_cache
    to = ONNX_DTYPES[dtype]

    def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                              cos_cache, sin_cache, num_heads: int, kv_num_heads: int, local_window_size: int,
                              scale: float):
        if to != ONNX_DTYPES["fp32"]:
            cos_cache, sin_cache = op.Cast(cos_cache, to=to), op.Cast(sin_cache, to=to)
        inputs = [query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache]
        if windowed:
            sequence = op.Cast(op.Shape(query, start=1, end=2), to=6)  # int32 (1,)
            first_prompt = op.Equal(sequence, total_sequence_length)
            one = op.Cast(op.Constant(value_int=1), to=6)  # type: ignore[type-var]  # onnxscript's stubs
            inputs += [None] * 7 + [op.Where(first_prompt, op.Add(seqlens_k, one), sequence)]
        return msft.GroupQueryAttention(
            *inputs, num_heads=num_heads, kv_num_heads=kv_num_heads,
            local_window_size=local_window_size if local_window_size > 0 else -1, scale=scale,
            do_rotary=1, rotary_interleaved=0, sliding_window_cache=int(windowed), _outputs=3)

    return group_query_attention


def _trt_node(config: Config, dtype: str) -> Callable:
    from onnxscript.values import Opset

    plugins = Opset(PLUGIN_DOMAIN, 1)
    rope_cache = getattr(plugins, ROPE.name)
    attention = getattr(plugins, ATTENTION.name)
    plugin = dict(plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, head_size=config.head_dim)

    def sliding_window_gqa_plugins(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                   cos_cache, sin_cache, num_heads: int, kv_num_heads: int, local_window_size: int,
                                   scale: float):
        q_rot, k_rot, present_key, present_value = rope_cache(
            query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
            num_heads=num_heads, kv_num_heads=kv_num_heads, rope_theta=float(config.rope_theta),
            max_position_embeddings=config.max_position_embeddings, **plugin, _outputs=len(ROPE.outputs))
        output = attention(q_rot, k_rot, value, past_key, past_value, seqlens_k, total_sequence_length,
                           num_heads=num_heads, kv_num_heads=kv_num_heads, local_window_size=local_window_size,
                           scale=scale, **plugin, _outputs=len(ATTENTION.outputs))
        return output, present_key, present_value

    return sliding_window_gqa_plugins
