"""From the exporter's graph to the artifact's graph: a few small onnx_ir passes.

1. I/O names of onnxruntime-genai/optimum, dimension names batch / sequence / total_sequence /
   past_sequence (the other heads: export/heads.py); the exporter's intermediate shapes and torch metadata
   are dropped.
2. Weight layouts folded into the stored initializers: Transpose(W) feeding a MatMul becomes
   an initializer `W.T` stored as [in, out] (what ONNX Runtime's MatMul wants, with no
   transpose at load time), and a Cast of an initializer (the RoPE tables for fp16) becomes
   an initializer `name.fp16`. A tied head thus stores the embedding twice (Gather and MatMul).
   Every initializer is then an `InitializerSpec`: the recipe weights.py follows to write it.
3. ort causal LMs only: an input `logits_to_keep` (int64 [1], default 0 = every position) slicing the
   hidden states before the head, so a runtime can ask for the last position's logits only.
4. IR version 10, opset 20, producer sc2deploy.
5. With a quantization scheme: block-quantized weights (quantized_graph.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sc2deploy.config import Config
from sc2deploy.contract import DTYPE_OF_ONNX, LOGITS_TO_KEEP, QUANT_DOMAIN, attention_domain, graph_io
from sc2deploy.export.graph import (IR_VERSION, OPSET, ExportGraph, InitializerSpec, drop_unused_initializers,
                                    initializer_value, placeholder)
from sc2deploy.tasks import TEXT_GENERATION

if TYPE_CHECKING:
    import onnx_ir as ir

    from sc2deploy.quantization import QuantScheme

ROPE_TABLES = ("cos_cache", "sin_cache")


def finish_graph(model: ir.Model, config: Config, target: str, dtype: str,
                 quant: QuantScheme | None = None) -> ExportGraph:
    """Turn the traced model into the artifact's graph, in place; its initializers become placeholders."""
    graph = model.graph
    causal = config.head.task == TEXT_GENERATION
    if causal:
        _rename_io(graph, config)
    else:
        from sc2deploy.export.heads import rename_head_io

        rename_head_io(graph, config)
    _drop_exporter_details(model)
    specs = _fold_initializers(graph)
    expected = set(config.tensor_shapes()) | set(ROPE_TABLES)
    unknown = sorted({s.origin for s in specs} - expected)
    if unknown:
        raise AssertionError(f"the traced graph has initializers the checkpoint does not: {unknown}")
    if target == "ort" and causal:
        _add_logits_to_keep(graph)
    _finish_metadata(model, target, quant is not None)
    if quant is not None:
        from sc2deploy.export.quantized_graph import quantize_graph

        specs = quantize_graph(graph, specs, quant, dtype)
    return ExportGraph(model, specs)


# ---------------------------------------------------------------- 1. names
def _rename_io(graph: ir.Graph, config: Config) -> None:
    import onnx_ir as ir

    inputs, outputs = graph_io(config.num_hidden_layers, "trt")  # as traced: ort's logits_to_keep comes later
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise AssertionError(f"traced graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
                             f"expected {len(inputs)} / {len(outputs)}")
    if [v.name for v in graph.inputs[:2]] != inputs[:2]:
        raise AssertionError(f"traced graph inputs start with {[v.name for v in graph.inputs[:2]]}")
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    for value, name in zip(graph.outputs, outputs):
        value.name = name

    Dims = list[int | str]
    kv_dims: Dims = ["batch", config.num_key_value_heads, "past_sequence", config.head_dim]
    present_dims: Dims = kv_dims if config.windowed else ["batch", config.num_key_value_heads, "present_sequence",
                                                          config.head_dim]
    ids_dims: Dims = ["batch", "sequence"]
    mask_dims: Dims = ["batch", "total_sequence"]
    logits_dims: Dims = ["batch", "sequence", config.vocab_size]
    input_dims = [ids_dims, mask_dims] + [kv_dims] * (len(inputs) - 2)
    output_dims = [logits_dims] + [present_dims] * (len(outputs) - 1)
    for value, dims in zip([*graph.inputs, *graph.outputs], input_dims + output_dims):
        value.shape = ir.Shape(dims)


def _drop_exporter_details(model: ir.Model) -> None:
    """Torch's metadata and the intermediate shapes (with the exporter's own dimension names)."""
    graph = model.graph
    model.metadata_props.clear()
    graph.metadata_props.clear()
    interface = {*graph.inputs, *graph.outputs}
    for value in interface:
        value.metadata_props.clear()
    for node in graph:
        node.metadata_props.clear()
        for value in node.outputs:
            if value not in interface:
                value.shape, value.type = None, None
                value.metadata_props.clear()


# ---------------------------------------------------------------- 2. weight layouts
def _fold_initializers(graph: ir.Graph) -> list[InitializerSpec]:
    specs = {name: InitializerSpec(name, name, _dtype_name(value.dtype), value.shape.numpy() if value.shape else ())
             for name, value in graph.initializers.items()}
    for name, value in graph.initializers.items():
        value.const_value = placeholder(specs[name])
    for node in list(graph):
        source = node.inputs[0] if node.inputs else None
        if source is None or not source.is_initializer() or source.name not in specs:
            continue
        folded = _folded(node, specs[str(source.name)])
        if folded is None:
            continue
        if node.outputs[0].is_graph_output():
            raise AssertionError(f"graph output {node.outputs[0].name} is a folded initializer")
        if folded.name not in specs:
            specs[folded.name] = folded
            graph.register_initializer(initializer_value(folded))
        node.outputs[0].replace_all_uses_with(graph.initializers[folded.name])
        graph.remove(node, safe=True)
    return drop_unused_initializers(graph, specs)


def _folded(node: ir.Node, src: InitializerSpec) -> InitializerSpec | None:
    """The initializer that replaces `node`'s output, if `node` only transposes or casts an initializer."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose" and len(src.shape) == 2 and list(node.attributes["perm"].as_ints()) == [1, 0] \
            and not src.transpose:
        return InitializerSpec(f"{src.name}.T", src.origin, src.dtype, src.shape[::-1], transpose=True)
    if node.op_type == "Cast" and node.attributes["to"].as_int() in DTYPE_OF_ONNX:
        dtype = DTYPE_OF_ONNX[node.attributes["to"].as_int()]
        return InitializerSpec(f"{src.name}.{dtype}", src.origin, dtype, src.shape, src.transpose)
    return None


def _dtype_name(dtype) -> str:
    import onnx_ir as ir

    names = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
    if dtype not in names:
        raise AssertionError(f"unexpected initializer dtype {dtype} in the traced graph")
    return names[dtype]


# ---------------------------------------------------------------- 3. logits_to_keep
def _add_logits_to_keep(graph: ir.Graph) -> None:
    import numpy as np
    import onnx_ir as ir

    head = graph.outputs[0].producer()
    if head is None or head.op_type != "MatMul":
        raise AssertionError(f"the logits come from a {head and head.op_type}, expected the head's MatMul")

    def constant(name: str, value: int) -> ir.Value:
        tensor = ir.tensor(np.array([value], dtype=np.int64), name=name)
        return ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(tensor.dtype), const_value=tensor)

    keep, end, axis = constant(LOGITS_TO_KEEP, 0), constant(f"{LOGITS_TO_KEEP}/end", 2**63 - 1), \
        constant(f"{LOGITS_TO_KEEP}/axis", 1)
    graph.inputs.append(keep)
    for value in (keep, end, axis):
        graph.register_initializer(value)
    neg = ir.Node("", "Neg", [keep], name="logits_to_keep/neg", outputs=[ir.Value(name=f"{LOGITS_TO_KEEP}/neg")])
    hidden = head.inputs[0]
    assert hidden is not None
    kept = ir.Value(name=f"{hidden.name}/kept")
    cut = ir.Node("", "Slice", [hidden, neg.outputs[0], end, axis], name="logits_to_keep/slice", outputs=[kept])
    graph.insert_before(head, [neg, cut])
    head.replace_input_with(0, kept)


# ---------------------------------------------------------------- 4. metadata
def _finish_metadata(model: ir.Model, target: str, quantized: bool) -> None:
    from sc2deploy import __version__

    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "sc2deploy", __version__
    model.doc_string = "StarCoder2 exported by sc2deploy from its reference model"
    model.graph.name = "starcoder2"
    model.graph.opset_imports.clear()
    model.graph.opset_imports.update({"": OPSET, attention_domain(target): 1})
    if quantized:
        model.graph.opset_imports[QUANT_DOMAIN] = 1
