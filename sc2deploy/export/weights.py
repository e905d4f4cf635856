"""Save the artifact's graph with onnx_ir, its weights streamed from a TensorSource into one external-data file.

Each initializer becomes a `StreamedTensor`: onnx_ir's `ir.save` asks it to write itself
(`tofile`) when its turn comes, and it writes its bytes in chunks of at most CHUNK_BYTES as
it reads, converts or transposes them. One source tensor is in memory at a time (initializers
are ordered by source tensor, and a tied embedding's two layouts share one read), so peak
memory is bounded by the largest tensor, not the model.

Tensors under INLINE_BYTES stay inside model.onnx (external data for tiny tensors breaks
loading, docs/onnxruntime-gqa.md); the others start at offsets aligned to ALIGNMENT bytes
(page-aligned, so ONNX Runtime can map them). Producing bytes and consuming them (writing,
hashing) overlap: a writer thread takes chunks from a queue of QUEUE_CHUNKS, and hashes them,
so the file's sha256 is known when the save ends and the manifest never re-reads 30 GB.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from sc2deploy.config import Config, torch_dtype
from sc2deploy.contract import DATA_FILE, STORED_ONNX_DTYPES
from sc2deploy.export.graph import ExportGraph, InitializerSpec, QuantizedPart

INLINE_BYTES = 1024
ALIGNMENT = 4096
CHUNK_BYTES = 32 << 20  # tensors are written in chunks of about this size
QUEUE_CHUNKS = 4  # chunks the producer may be ahead of the writer thread


def save_model(graph: ExportGraph, source, path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Write `graph` to `path` (with DATA_FILE beside it), its weights read from `source`; returns DATA_FILE's
    sha256."""
    reader, writer = _SourceReader(source), _HashingWriter(progress)
    model = graph.model
    try:
        _attach(model.graph, graph.initializers, source.names(), reader, writer)
        ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=INLINE_BYTES - 1,
                callback=writer.before_tensor, alignment=ALIGNMENT, align_threshold=0)
    finally:
        writer.close()
        reader.release()
    return writer.hexdigest()


def weights_bytes(graph: ExportGraph) -> int:
    """Bytes save_model reports through `progress` (the external tensors)."""
    return sum(s.nbytes for s in graph.initializers if s.nbytes >= INLINE_BYTES)


def _attach(graph: ir.Graph, specs: list[InitializerSpec], order: list[str], reader: _SourceReader,
            writer: _HashingWriter) -> None:
    """Give every initializer its StreamedTensor, and order them by source tensor (each is read once)."""
    by_name = {s.name: s for s in specs}
    rank = {name: i for i, name in enumerate(order)}
    values = list(graph.initializers.values())
    values.sort(key=lambda v: rank.get(by_name[v.name].origin, len(rank)) if v.name in by_name else -1)
    graph.initializers.clear()
    for value in values:
        if value.name in by_name:
            value.const_value = StreamedTensor(by_name[value.name], reader, writer)
        graph.register_initializer(value)


class _SourceReader:
    """Source tensors, one at a time: the last one read (or quantized) is kept for the next initializer made
    from it."""

    def __init__(self, source):
        self.source = source
        self._key: tuple | None = None
        self._tensor: Any = None

    def get(self, origin: str, dtype: str):
        if self._key != (origin, dtype):
            self.release()
            self._tensor = _load(origin, dtype, self.source, self.source.config)
            self._key = (origin, dtype)
        return self._tensor

    def quantized(self, origin: str, part: QuantizedPart):
        """export/quantize.py's QuantizedMatMul of `origin` (read in part.model_dtype) under part.scheme."""
        from sc2deploy.export.quantize import quantize_matmul

        key = (origin, part.model_dtype, part.scheme)
        if self._key != key:
            self.release()
            weight = _load(origin, part.model_dtype, self.source, self.source.config)
            self._tensor = quantize_matmul(weight, part.scheme, torch_dtype(part.model_dtype), name=origin)
            self._key = key
        return self._tensor

    def release(self) -> None:
        self._key, self._tensor = None, None


def _load(origin: str, dtype: str, source, config: Config):
    from sc2deploy.attention import rope_cache

    if origin in ("cos_cache", "sin_cache"):
        cos, sin = rope_cache(config.head_dim, config.rope_theta, config.max_position_embeddings)
        return (cos if origin == "cos_cache" else sin).to(torch_dtype(dtype))
    return source.get(origin, dtype).contiguous()


class StreamedTensor(ir.LazyTensor):
    """An initializer whose bytes come from the source when onnx_ir writes it, chunk by chunk."""

    def __init__(self, spec: InitializerSpec, reader: _SourceReader, writer: _HashingWriter):
        self.spec, self.reader, self.writer = spec, reader, writer
        super().__init__(self._whole, dtype=ir.DataType(STORED_ONNX_DTYPES[spec.dtype]), shape=ir.Shape(spec.shape),
                         name=spec.name)

    def tofile(self, file) -> None:
        self.writer.write_tensor(file, self.chunks())

    def tobytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.chunks())

    def chunks(self) -> Iterator[memoryview]:
        """The stored bytes, in pieces of about CHUNK_BYTES."""
        spec = self.spec
        if spec.quantized is not None:
            part = getattr(self.reader.quantized(spec.origin, spec.quantized), spec.quantized.part)
            if part.numel() * part.element_size() != spec.nbytes:
                raise AssertionError(f"{spec.name}: quantizing {spec.origin} gave {tuple(part.shape)}, the graph "
                                     f"stores {spec.shape}")
            yield from _chunks(part, False)
            return
        tensor = self.reader.get(spec.origin, spec.dtype)
        data = tensor if tensor.dtype == torch_dtype(spec.dtype) else tensor.to(torch_dtype(spec.dtype))
        stored = tuple(data.shape[::-1]) if spec.transpose else tuple(data.shape)
        if stored != spec.shape:
            raise AssertionError(f"{spec.name}: source tensor {spec.origin} has shape {tuple(data.shape)}, "
                                 f"the graph stores {spec.shape}")
        yield from _chunks(data, spec.transpose)

    def _whole(self) -> ir.TensorProtocol:
        import numpy as np

        return ir.Tensor(np.frombuffer(self.tobytes(), dtype=np.uint8), dtype=self.dtype, shape=self.shape)


def _chunks(tensor, transpose: bool) -> Iterator[memoryview]:
    """The stored bytes of `tensor` (or of its transpose) as memoryviews of about CHUNK_BYTES."""
    import torch

    if not transpose:
        flat = tensor.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, len(flat), CHUNK_BYTES):
            yield memoryview(flat[start:start + CHUNK_BYTES])
        return
    rows, cols = tensor.shape  # stored as (cols, rows)
    step = max(1, CHUNK_BYTES // max(1, rows * tensor.element_size()))
    for start in range(0, cols, step):
        block = tensor[:, start:start + step].t().contiguous()
        yield memoryview(block.reshape(-1).view(torch.uint8).numpy())


class _HashingWriter:
    """Writes each tensor's chunks from a background thread and hashes the data file as it grows.

    onnx_ir calls `before_tensor` with each external tensor's offset, then the tensor's
    `tofile`: the gap before the offset (alignment, left as a hole that reads as zeros) is hashed
    as zeros, so the digest is the file's.
    """

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress, self.digest, self.position = progress, hashlib.sha256(), 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="sc2deploy-weights-writer", daemon=True)
        self._thread.start()

    def before_tensor(self, tensor, info) -> None:
        if info.offset < self.position:
            raise AssertionError(f"onnx_ir wrote {tensor.name} at {info.offset}, before the end of the last tensor")
        gap = info.offset - self.position
        self.digest.update(bytes(gap))
        self.position = info.offset

    def write_tensor(self, file, chunks: Iterator[memoryview]) -> None:
        for chunk in chunks:
            if self._error is not None:
                raise self._error
            self._queue.put((file, chunk))
            self.position += len(chunk)
            if self.progress:
                self.progress(len(chunk))
        self._queue.join()
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    file, chunk = item
                    file.write(chunk)
                    self.digest.update(chunk)
            except BaseException as e:  # e.g. disk full: reported to the producer
                self._error = e
            finally:
                self._queue.task_done()
