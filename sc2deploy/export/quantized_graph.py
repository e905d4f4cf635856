"""`export --quant`: an onnx_ir pass that makes the artifact's weights block-quantized.

Every MatMul by a stored weight (q/k/v/o, c_fc, c_proj, lm_head; a tied head included) becomes
com.microsoft::MatMulNBits, taking in the bias Add that follows it, and the token embedding's Gather becomes
com.microsoft::GatherBlockQuantized. Their inputs are InitializerSpecs with a QuantizedPart:
weights.py quantizes the checkpoint tensor when it writes them (export/quantize.py's layouts),
so no full-precision weight is ever held beyond the one being quantized. A tied embedding is
quantized once and stored twice (GatherBlockQuantized's data and MatMulNBits' B have the same
bytes but different shapes), as the unquantized export stores it twice.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sc2deploy.contract import QUANT_DOMAIN
from sc2deploy.export.graph import InitializerSpec, QuantizedPart, drop_unused_initializers, initializer_value

if TYPE_CHECKING:
    import onnx_ir as ir

    from sc2deploy.quantization import QuantScheme


def quantize_graph(graph: ir.Graph, specs: list[InitializerSpec], scheme: QuantScheme,
                   dtype: str) -> list[InitializerSpec]:
    """Rewrite `graph`'s weight MatMuls and its embedding Gather in place; returns the initializer specs after."""
    import onnx_ir as ir

    from sc2deploy.export.quantize import gather_attributes, matmul_attributes

    by_name = {s.name: s for s in specs}
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gather"):
            continue
        weight_index = 1 if node.op_type == "MatMul" else 0
        weight = node.inputs[weight_index]
        spec = by_name.get(str(weight.name)) if weight is not None and weight.is_initializer() else None
        if spec is None or len(spec.shape) != 2 or spec.transpose != (node.op_type == "MatMul"):
            continue
        n, k = spec.shape[::-1] if spec.transpose else spec.shape
        scheme.check_dimension(k, spec.origin)
        if node.op_type == "MatMul":
            op, attributes, layout = "MatMulNBits", matmul_attributes(scheme, k, n), "matmul"
            operand = node.inputs[0]
        else:
            if node.attributes.get_int("axis", 0) != 0:
                continue
            op, attributes, layout = "GatherBlockQuantized", gather_attributes(scheme), "gather"
            operand = node.inputs[1]
        parts = [_register(graph, by_name, part) for part in _parts(spec, n, k, scheme, dtype, layout)]
        replaced = [node]
        if layout == "gather":
            inputs = [parts[0], operand, *parts[1:]]
        else:
            inputs = [operand, parts[0], parts[1], parts[2] if len(parts) > 2 else None]
            bias_add = _bias_add(node, n)
            if bias_add is not None:  # MatMulNBits adds it: one kernel fewer per linear layer
                replaced.append(bias_add[0])
                inputs += [None, bias_add[1]]  # g_idx, bias
        quantized = ir.Node(QUANT_DOMAIN, op, inputs, attributes=[ir.AttrInt64(a, v) for a, v in attributes.items()],
                            name=f"{node.name}/{op}")
        ir.convenience.replace_nodes_and_values(graph, node, replaced, [quantized], replaced[-1].outputs,
                                                quantized.outputs)
    return drop_unused_initializers(graph, by_name)


def _bias_add(matmul: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a bias initializer [n] that is the only use of `matmul`'s output, and that bias."""
    output = matmul.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    bias = add.inputs[1 - index]
    if bias is None or not bias.is_initializer() or bias.shape is None or list(bias.shape) != [n]:
        return None
    return add, bias


def _parts(spec: InitializerSpec, n: int, k: int, scheme: QuantScheme, dtype: str,
           layout: str) -> list[InitializerSpec]:
    """The quantized inputs that replace `spec` for a node of `layout` ("matmul" or "gather")."""
    blocks = k // scheme.block_size
    packed_shape = (n, blocks, scheme.block_size * scheme.bits // 8) if layout == "matmul" \
        else (n, k * scheme.bits // 8)
    prefix = f"{spec.origin}.{layout}.{scheme.name}"
    parts = [InitializerSpec(f"{prefix}.packed", spec.origin, "uint8", packed_shape,
                             quantized=QuantizedPart(scheme, "packed", dtype)),
             InitializerSpec(f"{prefix}.scales", spec.origin, dtype, (n, blocks),
                             quantized=QuantizedPart(scheme, "scales", dtype))]
    if not scheme.symmetric:
        parts.append(InitializerSpec(f"{prefix}.zero_points", spec.origin, "uint8",
                                     (n, (blocks * scheme.bits + 7) // 8),
                                     quantized=QuantizedPart(scheme, "zero_points", dtype)))
    return parts


def _register(graph: ir.Graph, by_name: dict[str, InitializerSpec], spec: InitializerSpec) -> ir.Value:
    if spec.name not in graph.initializers:
        by_name[spec.name] = spec
        graph.register_initializer(initializer_value(spec))
    return graph.initializers[spec.name]
