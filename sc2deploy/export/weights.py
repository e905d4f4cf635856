"""Stream the graph's initializers from a TensorSource into one external-data file.

One source tensor is in memory at a time (plus a chunk of its transpose), so peak memory is
bounded by the largest tensor, not the model. Tensors under INLINE_BYTES stay inside
model.onnx (external data for tiny tensors breaks loading, docs/onnxruntime-gqa.md); the others are written
at offsets aligned to ALIGNMENT bytes (page-aligned, so ONNX Runtime can map them), and the
file's sha256 is computed while writing, so the manifest never re-reads it. Producing bytes
(reading, converting, transposing) and consuming them (hashing, writing) overlap: a writer
thread takes chunks of at most CHUNK_BYTES from a queue of QUEUE_CHUNKS, so at most the
current and the previous source tensor are alive.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sc2deploy.config import Config, torch_dtype
from sc2deploy.export.graph import ExportGraph, InitializerSpec
from sc2deploy.contract import DATA_FILE, ONNX_DTYPES

INLINE_BYTES = 1024
ALIGNMENT = 4096
CHUNK_BYTES = 32 << 20  # tensors are written in chunks of about this size
QUEUE_CHUNKS = 4  # chunks the producer may be ahead of the writer thread


@dataclass
class WrittenWeights:
    tensors: list  # onnx.TensorProto, external or inline, in graph order
    data_sha256: str
    data_bytes: int


def write_weights(graph: ExportGraph, source, folder: Path,
                  progress: Callable[[int], None] | None = None) -> WrittenWeights:
    """Write every initializer of `graph`; returns the TensorProtos that reference the data file."""
    groups = _group_by_origin(graph.initializers, source.names())
    protos: dict[str, object] = {}
    with open(folder / DATA_FILE, "wb") as f:
        writer = _AlignedWriter(f)
        try:
            for origin, specs in groups:
                tensor = _load(origin, specs[0].dtype, source, source.config)
                for spec in specs:
                    data = tensor if tensor.dtype == torch_dtype(spec.dtype) else tensor.to(torch_dtype(spec.dtype))
                    stored = tuple(data.shape[::-1]) if spec.transpose else tuple(data.shape)
                    if stored != spec.shape:
                        raise AssertionError(f"{spec.name}: source tensor {origin} has shape {tuple(data.shape)}, "
                                             f"the graph stores {spec.shape}")
                    if spec.nbytes < INLINE_BYTES:
                        protos[spec.name] = _inline_proto(spec, _chunks(data, spec.transpose))
                        continue
                    offset = writer.start_tensor()
                    for chunk in _chunks(data, spec.transpose):
                        writer.write(chunk)
                        if progress:
                            progress(len(chunk))
                    protos[spec.name] = _external_proto(spec, offset, spec.nbytes)
                del tensor, data
        finally:
            writer.close()
        ordered = [protos[s.name] for s in graph.initializers]
    return WrittenWeights(ordered, writer.digest.hexdigest(), writer.position)


def weights_bytes(graph: ExportGraph) -> int:
    """Bytes write_weights reports through `progress` (the external tensors)."""
    return sum(s.nbytes for s in graph.initializers if s.nbytes >= INLINE_BYTES)


def _group_by_origin(specs: list[InitializerSpec], order: list[str]) -> list[tuple[str, list[InitializerSpec]]]:
    """Initializers grouped by the tensor they come from, in checkpoint order (each read once)."""
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[str, list[InitializerSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.origin, []).append(spec)
    return sorted(groups.items(), key=lambda item: rank.get(item[0], len(rank)))


def _load(origin: str, dtype: str, source, config: Config):
    from sc2deploy.attention import rope_cache

    if origin in ("cos_cache", "sin_cache"):
        cos, sin = rope_cache(config.head_dim, config.rope_theta, config.max_position_embeddings)
        return (cos if origin == "cos_cache" else sin).to(torch_dtype(dtype))
    return source.get(origin, dtype).contiguous()


def _chunks(tensor, transpose: bool):
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


class _AlignedWriter:
    """Appends chunks to `f` from a background thread (hashing them too); positions are known at once."""

    def __init__(self, f):
        self.f, self.digest, self.position = f, hashlib.sha256(), 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="sc2deploy-weights-writer", daemon=True)
        self._thread.start()

    def start_tensor(self) -> int:
        pad = -self.position % ALIGNMENT
        if pad:
            self.write(b"\0" * pad)
        return self.position

    def write(self, data) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)
        self.position += len(data)

    def close(self) -> None:
        """Wait for every queued chunk to be written; re-raise the writer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks; it re-raises
            try:
                self.f.write(data)
                self.digest.update(data)
            except BaseException as e:  # e.g. disk full: reported to the producer
                self._error = e


def _external_proto(spec: InitializerSpec, offset: int, length: int):
    from onnx import TensorProto

    t = TensorProto(name=spec.name, data_type=ONNX_DTYPES[spec.dtype], dims=list(spec.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _inline_proto(spec: InitializerSpec, chunks):
    from onnx import TensorProto

    return TensorProto(name=spec.name, data_type=ONNX_DTYPES[spec.dtype], dims=list(spec.shape),
                       raw_data=b"".join(bytes(c) for c in chunks))
