"""ONNX schemas of the attention nodes an export writes, registered with onnx on first use.

The dynamo exporter (through onnxscript) refuses to emit a node whose schema onnx does not
know, and onnx's checker validates nodes of registered domains against these schemas, so
they list exactly the inputs, outputs and attributes the export uses:

* `com.microsoft::GroupQueryAttention`, the subset of ONNX Runtime's contrib op we emit
  (inputs in ONNX Runtime's order, with the optional ones up to `query_seqlens`);
* `com.microsoft::MatMulNBits` and `com.microsoft::GatherBlockQuantized`, the block-quantized
  weights of `export --quant` (export/quantized_graph.py);
* `trt.plugins::RopeCache` and `trt.plugins::SlidingWindowGQA`, the TensorRT plugin nodes:
  the inputs and outputs of `sc2deploy.plugins.trt_rules.ROPE` / `ATTENTION`, and the
  attributes the plugins need plus a few that document the model (head_size, rope_theta, ...).
"""
from __future__ import annotations

from sc2deploy.contract import (ATTENTION_OUTPUTS, GATHER_QUANTIZED_INPUTS, GQA_DOMAIN, GQA_INPUTS, GQA_OP,
                                MATMUL_NBITS_INPUTS, PLUGIN_DOMAIN, QUANT_DOMAIN)
from sc2deploy.plugins.trt_rules import ATTENTION, FP32, INPUT_KINDS, INT32, ROPE

PLUGIN_ATTRIBUTES = {  # op -> (int attributes, float attributes) on its node
    ROPE.name: (("num_heads", "kv_num_heads", "head_size", "max_position_embeddings"), ("rope_theta",)),
    ATTENTION.name: (("num_heads", "kv_num_heads", "head_size", "local_window_size"), ("scale",)),
}

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_INT_TYPES = ["tensor(int32)"]


def _type_of(name: str) -> str:
    if name in ("seqlens_k", "total_sequence_length", "query_seqlens"):
        return "M"
    if name == "position_ids":
        return "I"
    if name in ("k_scale", "v_scale"):
        return "S"
    if name in ("cos_cache", "sin_cache"):
        return "R"
    return "T"


def _plugin_type(name: str) -> str:
    return {INT32: "M", FP32: "R"}.get(INPUT_KINDS.get(name, ""), "T")


def register_schemas() -> None:
    """Register the schemas with onnx unless already known (idempotent, process-wide)."""
    import onnx.defs as defs

    schema = defs.OpSchema
    required = schema.FormalParameterOption.Single
    optional = schema.FormalParameterOption.Optional
    int_attr = schema.AttrType.INT
    float_attr = schema.AttrType.FLOAT
    string_attr = schema.AttrType.STRING

    def attrs(ints=(), floats=(), strings=()):
        return ([schema.Attribute(n, int_attr, required=False) for n in ints]
                + [schema.Attribute(n, float_attr, required=False) for n in floats]
                + [schema.Attribute(n, string_attr, required=False) for n in strings])

    def known(op: str, domain: str) -> bool:
        try:
            defs.get_schema(op, 1, domain)
            return True
        except defs.SchemaError:
            return False

    if not known(GQA_OP, GQA_DOMAIN):
        inputs = [schema.FormalParameter(n, "T" if _type_of(n) == "R" else _type_of(n),
                                         param_option=required if n in ("query", "seqlens_k", "total_sequence_length")
                                         else optional)
                  for n in GQA_INPUTS]
        defs.register_schema(schema(
            GQA_OP, GQA_DOMAIN, 1, "ONNX Runtime's GroupQueryAttention (the subset sc2deploy emits).",
            inputs=inputs, outputs=[schema.FormalParameter(n, "T") for n in ATTENTION_OUTPUTS],
            type_constraints=[("T", FLOAT_TYPES, "activations and cache"), ("M", _INT_TYPES, "lengths"),
                              ("I", ["tensor(int64)"], "positions"), ("S", ["tensor(float)"], "cache scales")],
            attributes=attrs(ints=("num_heads", "kv_num_heads", "local_window_size", "do_rotary", "rotary_interleaved",
                                   "sliding_window_cache", "causal", "smooth_softmax"),
                             floats=("scale", "softcap"))))
    if not known("MatMulNBits", QUANT_DOMAIN):
        defs.register_schema(schema(
            "MatMulNBits", QUANT_DOMAIN, 1, "ONNX Runtime's MatMulNBits (the subset sc2deploy emits).",
            inputs=[schema.FormalParameter(n, {"A": "T", "B": "Q", "scales": "T", "zero_points": "Q", "g_idx": "G",
                                               "bias": "T"}[n],
                                           param_option=required if n in ("A", "B", "scales") else optional)
                    for n in MATMUL_NBITS_INPUTS],
            outputs=[schema.FormalParameter("Y", "T")],
            type_constraints=[("T", FLOAT_TYPES[:2], "activations and scales"), ("Q", ["tensor(uint8)"], "packed"),
                              ("G", ["tensor(int32)"], "group indices (unused)")],
            attributes=attrs(ints=("K", "N", "bits", "block_size", "accuracy_level"))))
    if not known("GatherBlockQuantized", QUANT_DOMAIN):
        defs.register_schema(schema(
            "GatherBlockQuantized", QUANT_DOMAIN, 1, "ONNX Runtime's GatherBlockQuantized (the subset sc2deploy "
            "emits).",
            inputs=[schema.FormalParameter(n, {"data": "Q", "indices": "I", "scales": "T", "zero_points": "Q"}[n],
                                           param_option=optional if n == "zero_points" else required)
                    for n in GATHER_QUANTIZED_INPUTS],
            outputs=[schema.FormalParameter("output", "T")],
            type_constraints=[("T", FLOAT_TYPES[:2], "scales and output"), ("Q", ["tensor(uint8)"], "packed"),
                              ("I", ["tensor(int32)", "tensor(int64)"], "indices")],
            attributes=attrs(ints=("bits", "block_size", "gather_axis", "quantize_axis"))))
    for spec in (ROPE, ATTENTION):
        if known(spec.name, PLUGIN_DOMAIN):
            continue
        ints, floats = PLUGIN_ATTRIBUTES[spec.name]
        types = {_plugin_type(n) for n in spec.inputs}
        constraints = [("T", FLOAT_TYPES, "activations and cache"), ("M", _INT_TYPES, "lengths"),
                       ("R", ["tensor(float)"], "rotary tables, float32")]
        defs.register_schema(schema(
            spec.name, PLUGIN_DOMAIN, 1, f"sc2deploy's TensorRT plugin {spec.plugin_id} (sc2deploy/plugins/trt_rules.py).",
            inputs=[schema.FormalParameter(n, _plugin_type(n)) for n in spec.inputs],
            outputs=[schema.FormalParameter(n, "T") for n in spec.outputs],
            type_constraints=[c for c in constraints if c[0] in types],
            attributes=attrs(ints=ints, floats=floats, strings=("plugin_namespace", "plugin_version"))))
