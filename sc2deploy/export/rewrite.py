"""From the exporter's graph to the artifact's graph, in a few small passes on the ModelProto.

1. I/O names of onnxruntime-genai/optimum, dimension names batch / sequence / total_sequence /
   past_sequence; the exporter's intermediate value_info and torch metadata are dropped.
2. Weight layouts folded into the stored initializers: Transpose(W) feeding a MatMul becomes
   an initializer `W.T` stored as [in, out] (what ONNX Runtime's MatMul wants, with no
   transpose at load time), and a Cast of an initializer (the RoPE tables for fp16) becomes
   an initializer `name.fp16`. A tied head thus stores the embedding twice (Gather and MatMul).
3. ort only: an input `logits_to_keep` (int64 [1], default 0 = every position) slicing the
   hidden states before the head, so a runtime can ask for the last position's logits only.
4. IR version 10, opset 20, producer sc2deploy.
"""
from __future__ import annotations

from sc2deploy.config import Config
from sc2deploy.export.graph import IR_VERSION, OPSET, ExportGraph, InitializerSpec
from sc2deploy.contract import (ATTENTION_MASK, DTYPE_OF_ONNX, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, attention_domain,
                                graph_io)

ROPE_TABLES = ("cos_cache", "sin_cache")


def finish_graph(proto, traced_initializers: dict[str, tuple[str, tuple[int, ...]]], config: Config,
                 target: str) -> ExportGraph:
    _rename_io(proto, config)
    specs = _fold_initializers(proto, traced_initializers)
    expected = set(config.tensor_shapes()) | set(ROPE_TABLES)
    unknown = sorted({s.origin for s in specs} - expected)
    if unknown:
        raise AssertionError(f"the traced graph has initializers the checkpoint does not: {unknown}")
    if target == "ort":
        _add_logits_to_keep(proto)
    _finish_metadata(proto, target)
    return ExportGraph(proto, specs)


# ---------------------------------------------------------------- 1. names
def _rename_io(proto, config: Config) -> None:
    g = proto.graph
    inputs, outputs = graph_io(config.num_hidden_layers, "trt")  # as traced: ort's logits_to_keep comes later
    if len(g.input) != len(inputs) or len(g.output) != len(outputs):
        raise AssertionError(f"traced graph has {len(g.input)} inputs / {len(g.output)} outputs, "
                             f"expected {len(inputs)} / {len(outputs)}")
    if [i.name for i in g.input[:2]] != inputs[:2]:
        raise AssertionError(f"traced graph inputs start with {[i.name for i in g.input[:2]]}")
    rename = {old.name: new for old, new in zip(g.input, inputs)}
    rename.update({old.name: new for old, new in zip(g.output, outputs)})
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    for value in list(g.input) + list(g.output):
        value.name = rename[value.name]
        del value.metadata_props[:]
    del g.value_info[:]

    windowed = config.windowed
    kv_dims = ["batch", config.num_key_value_heads, "past_sequence", config.head_dim]
    present_dims = kv_dims if windowed else ["batch", config.num_key_value_heads, "present_sequence", config.head_dim]
    shapes = {INPUT_IDS: ["batch", "sequence"], ATTENTION_MASK: ["batch", "total_sequence"],
              LOGITS: ["batch", "sequence", config.vocab_size]}
    for value in list(g.input)[2:]:
        shapes[value.name] = kv_dims
    for value in list(g.output)[1:]:
        shapes[value.name] = present_dims
    for value in list(g.input) + list(g.output):
        _set_dims(value, shapes[value.name])


def _set_dims(value, dims) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


# ---------------------------------------------------------------- 2. weight layouts
def _fold_initializers(proto, traced: dict[str, tuple[str, tuple[int, ...]]]) -> list[InitializerSpec]:
    specs = {name: InitializerSpec(name, name, dtype, shape) for name, (dtype, shape) in traced.items()}
    rename: dict[str, str] = {}
    kept = []
    for node in proto.graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        folded = _folded(node, specs)
        if folded is None:
            kept.append(node)
            continue
        specs.setdefault(folded.name, folded)
        rename[node.output[0]] = folded.name
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    for value in proto.graph.output:
        if value.name in rename:
            raise AssertionError(f"graph output {value.name} is a folded initializer")
    used = {x for node in proto.graph.node for x in node.input}
    return [s for s in specs.values() if s.name in used]


def _folded(node, specs: dict[str, InitializerSpec]) -> InitializerSpec | None:
    """The initializer that replaces `node`'s output, if `node` only transposes or casts an initializer."""
    if not node.input or node.input[0] not in specs or node.domain not in ("", "ai.onnx"):
        return None
    src = specs[node.input[0]]
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Transpose" and len(src.shape) == 2 and list(attrs["perm"].ints) == [1, 0] and not src.transpose:
        return InitializerSpec(f"{src.name}.T", src.origin, src.dtype, src.shape[::-1], transpose=True)
    if node.op_type == "Cast" and attrs["to"].i in DTYPE_OF_ONNX:
        dtype = DTYPE_OF_ONNX[attrs["to"].i]
        return InitializerSpec(f"{src.name}.{dtype}", src.origin, dtype, src.shape, src.transpose)
    return None


# ---------------------------------------------------------------- 3. logits_to_keep
def _add_logits_to_keep(proto) -> None:
    from onnx import TensorProto, helper

    g = proto.graph
    head = next(node for node in g.node if LOGITS in node.output)
    if head.op_type != "MatMul":
        raise AssertionError(f"the logits come from a {head.op_type}, expected the head's MatMul")
    hidden = head.input[0]
    kept = f"{hidden}/kept"
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{LOGITS_TO_KEEP}/neg"], name="logits_to_keep/neg"),
        helper.make_node("Slice", [hidden, f"{LOGITS_TO_KEEP}/neg", f"{LOGITS_TO_KEEP}/end", f"{LOGITS_TO_KEEP}/axis"],
                         [kept], name="logits_to_keep/slice"),
    ]
    head.input[0] = kept
    position = list(g.node).index(head)
    for i, node in enumerate(nodes):
        g.node.insert(position + i, node)
    g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    g.initializer.extend([
        helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [1], [0]),
        helper.make_tensor(f"{LOGITS_TO_KEEP}/end", TensorProto.INT64, [1], [2**63 - 1]),
        helper.make_tensor(f"{LOGITS_TO_KEEP}/axis", TensorProto.INT64, [1], [1]),
    ])


# ---------------------------------------------------------------- 4. metadata
def _finish_metadata(proto, target: str) -> None:
    from onnx import helper

    from sc2deploy import __version__

    proto.ir_version = IR_VERSION
    proto.producer_name, proto.producer_version = "sc2deploy", __version__
    proto.doc_string = "StarCoder2 exported by sc2deploy from its reference model"
    del proto.metadata_props[:]
    del proto.graph.metadata_props[:]
    proto.graph.name = "starcoder2"
    for node in proto.graph.node:
        del node.metadata_props[:]
    domain = attention_domain(target)
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)])
