"""The export graph of the other heads (sc2deploy/heads.py): prefill only, traced like the causal LM's.

Inputs input_ids and attention_mask (batch, sequence), as transformers' classes take them: left or right
padding. Output `logits` (batch, num_labels) pooled for sequence classification, (batch, sequence,
num_labels) for token classification, or `last_hidden_state` (batch, sequence, hidden) for the base model.
No KV cache in or out: every GroupQueryAttention node gets an empty past and runs without ONNX Runtime's
window-sized cache mode. The rest (weights folded and streamed, metadata) is the causal LM's path (rewrite.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sc2deploy.config import Config, torch_dtype
from sc2deploy.contract import head_graph_io
from sc2deploy.errors import UserError
from sc2deploy.export.graph import EXAMPLE_BATCH, EXAMPLE_SEQUENCE, OPSET, _quiet_exporter
from sc2deploy.export.nodes import attention_translation
from sc2deploy.quantization import QuantScheme
from sc2deploy.tasks import FEATURE_EXTRACTION, SEQUENCE_TASK, TEXT_GENERATION

if TYPE_CHECKING:
    import onnx_ir as ir


def check_head_export(config: Config, target: str, quant: QuantScheme | None) -> None:
    if config.head.task == TEXT_GENERATION:
        return
    if target != "ort":
        raise UserError(f"a {config.head.architecture} exports for --target ort only (ONNX Runtime); TensorRT "
                        "engines are built for causal LMs")
    if quant is not None:
        raise UserError(f"--quant is for causal LMs; export the {config.head.architecture} unquantized")


def trace_head_model(config: Config, dtype: str) -> ir.Model:
    """The head model traced by torch.onnx.export(dynamo=True), as graph.trace_model traces the causal LM."""
    import torch

    from sc2deploy.heads import head_model_class

    with torch.device("meta"):
        model = head_model_class(config)(config).to(torch_dtype(dtype)).eval()
        input_ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQUENCE, dtype=torch.int64)
        attention_mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQUENCE, dtype=torch.int64)
    model.cos_cache = model.cos_cache.float()
    model.sin_cache = model.sin_cache.float()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {0: batch, 1: sequence}
    with _quiet_exporter():
        program = torch.onnx.export(
            model, (input_ids, attention_mask), dynamo=True, optimize=False, verbose=False, opset_version=OPSET,
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            custom_translation_table=attention_translation(config, dtype, "ort", prefill_only=True))
    assert program is not None
    return program.model


def rename_head_io(graph: ir.Graph, config: Config) -> None:
    """The contract's names (head_graph_io) and dimension names on the traced graph's inputs and outputs."""
    import onnx_ir as ir

    task = config.head.task
    inputs, outputs = head_graph_io(task)
    if [v.name for v in graph.inputs] != inputs or len(graph.outputs) != len(outputs):
        raise AssertionError(f"traced graph has inputs {[v.name for v in graph.inputs]} and {len(graph.outputs)} "
                             f"outputs, expected {inputs} and {len(outputs)}")
    width = config.hidden_size if task == FEATURE_EXTRACTION else len(config.head.labels)
    output_dims: list[int | str] = ["batch", width] if task == SEQUENCE_TASK else ["batch", "sequence", width]
    for value in graph.inputs:
        value.shape = ir.Shape(["batch", "sequence"])
    graph.outputs[0].name, graph.outputs[0].shape = outputs[0], ir.Shape(output_dims)
