"""The export graph: the reference model traced on the meta device by torch.onnx's dynamo exporter.

Tracing on "meta" allocates no weights, so any size traces in seconds and a few hundred MB.
The exporter's onnx_ir model is then tidied into the artifact's graph (rewrite.py), and each
of its initializers becomes an `InitializerSpec`: where its bytes come from (a checkpoint
tensor or the RoPE tables), in which dtype and layout. weights.py streams them into external
data as onnx_ir saves the model.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sc2deploy.config import Config, torch_dtype
from sc2deploy.contract import STORED_BYTES, STORED_ONNX_DTYPES
from sc2deploy.export.nodes import attention_translation

if TYPE_CHECKING:
    import onnx_ir as ir

    from sc2deploy.quantization import QuantScheme

OPSET = 20  # Gelu(approximate="tanh") needs opset 20
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime-gpu 1.31 loads at most 13 (docs/onnxruntime-gqa.md)
# Example sizes for tracing: all different and >= 2, so that no dynamic dimension is specialised.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 3, 5


@dataclass(frozen=True)
class InitializerSpec:
    """One initializer of the graph and the recipe for its bytes."""

    name: str  # in the graph
    origin: str  # a TensorSource tensor name, or "cos_cache" / "sin_cache"
    dtype: str  # fp32 / fp16 / bf16 / uint8, as stored
    shape: tuple[int, ...]  # as stored
    transpose: bool = False  # stored as origin.T (MatMul weights: [in, out])
    quantized: QuantizedPart | None = None  # one input of a quantized node, made from origin

    @property
    def nbytes(self) -> int:
        n = STORED_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class QuantizedPart:
    """Which input of a MatMulNBits or GatherBlockQuantized node (export/quantize.py's layouts) a spec is."""

    scheme: QuantScheme
    part: str  # "packed" (B, or GatherBlockQuantized's data), "scales" or "zero_points"
    model_dtype: str  # the origin is read in it, and the scales are stored in it


@dataclass
class ExportGraph:
    model: ir.Model  # its weight initializers are placeholders until weights.py attaches them
    initializers: list[InitializerSpec]


def placeholder(spec: InitializerSpec) -> ir.LazyTensor:
    """A tensor of `spec`'s type and shape whose bytes are not known yet (weights.py supplies them)."""
    import onnx_ir as ir

    def unbound() -> ir.TensorProtocol:
        raise AssertionError(f"initializer {spec.name} was read before its weights were attached")

    return ir.LazyTensor(unbound, dtype=ir.DataType(STORED_ONNX_DTYPES[spec.dtype]), shape=ir.Shape(spec.shape),
                         name=spec.name)


def initializer_value(spec: InitializerSpec) -> ir.Value:
    import onnx_ir as ir

    tensor = placeholder(spec)
    return ir.Value(name=spec.name, shape=ir.Shape(spec.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)



def drop_unused_initializers(graph: ir.Graph, specs: dict[str, InitializerSpec]) -> list[InitializerSpec]:
    """Remove the initializers no node uses (a graph input's default stays); the specs of those left, in order."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_input():
            graph.initializers.pop(name)
    return [specs[name] for name in graph.initializers if name in specs]


def trace_model(config: Config, dtype: str, target: str) -> ir.Model:
    """The reference model traced by torch.onnx.export(dynamo=True): an onnx_ir Model with meta initializers."""
    import torch

    from sc2deploy.model import Starcoder2

    with torch.device("meta"):
        model = Starcoder2(config).to(torch_dtype(dtype)).eval()
    # The contract keeps the RoPE tables in float32 whatever the activation dtype.
    model.cos_cache = model.cos_cache.float()
    model.sin_cache = model.sin_cache.float()

    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST
    kv_shape = (b, config.num_key_value_heads, p, config.head_dim)
    with torch.device("meta"):
        input_ids = torch.zeros(b, s, dtype=torch.int64)
        attention_mask = torch.ones(b, p + s, dtype=torch.int64)
        past = [(torch.zeros(kv_shape, dtype=torch_dtype(dtype)), torch.zeros(kv_shape, dtype=torch_dtype(dtype)))
                for _ in range(config.num_hidden_layers)]
    dim = torch.export.Dim
    batch, sequence = dim("batch"), dim("sequence")
    total, past_sequence = dim("total_sequence"), dim("past_sequence")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "past_key_values": [({0: batch, 2: past_sequence}, {0: batch, 2: past_sequence}) for _ in past],
    }
    with _quiet_exporter():
        program = torch.onnx.export(
            model, (input_ids, attention_mask, past), dynamo=True, optimize=False, verbose=False,
            opset_version=OPSET, dynamic_shapes=dynamic_shapes,
            custom_translation_table=attention_translation(config, dtype, target))
    assert program is not None
    return program.model


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings meant for interactive debugging."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
