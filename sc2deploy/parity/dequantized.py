"""What a quantized artifact computes: the checkpoint's weights quantized and dequantized, as a TensorSource.

Every 2-D tensor of a StarCoder2 checkpoint is a linear weight or the embedding, exactly the
tensors `export --quant` quantizes (export/quantized_graph.py); each is quantized with the
artifact's scheme (export/quantize.py, the bytes the artifact stores) and dequantized in float32,
so the eager model on this source computes what MatMulNBits and GatherBlockQuantized compute
with accuracy_level 0. Biases and layer norms pass through.
"""
from __future__ import annotations

from torch import Tensor

from sc2deploy.checkpoint import TensorSource
from sc2deploy.config import torch_dtype
from sc2deploy.quantization import QuantScheme


class DequantizedSource(TensorSource):
    def __init__(self, source: TensorSource, scheme: QuantScheme, model_dtype: str):
        self.source, self.scheme, self.model_dtype = source, scheme, model_dtype
        self.config = source.config
        self.description = f"{source.description}, {scheme.name} blocks of {scheme.block_size} dequantized"

    def names(self) -> list[str]:
        return self.source.names()

    def get(self, name: str, dtype: str) -> Tensor:
        from sc2deploy.export.quantize import dequantize_matmul, quantize_matmul

        tensor = self.source.get(name, self.model_dtype)
        if tensor.dim() == 2:
            quantized = quantize_matmul(tensor, self.scheme, torch_dtype(self.model_dtype), name=name)
            tensor = dequantize_matmul(quantized)
        return tensor.to(torch_dtype(dtype))
