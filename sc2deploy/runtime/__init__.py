"""Runtimes behind one interface (base.Runtime); each backend's module is imported only when used."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sc2deploy.errors import UserError

if TYPE_CHECKING:  # the backends import torch when opened; listing them must not
    from sc2deploy.runtime.base import Runtime
    from sc2deploy.runtime.heads import HeadRuntime

BACKENDS = ("eager", "cuda", "ort", "trt")


def open_runtime(backend: str, *, source=None, artifact=None, engine=None, dtype: str = "fp32",
                 max_batch: int = 1, capacity: int | None = None, **options) -> Runtime:
    """The runtime for `backend`: eager and cuda run a TensorSource, ort an export artifact, trt an engine folder."""
    if backend == "eager":
        if source is None:
            raise UserError("the eager backend needs --checkpoint DIR or --size SIZE")
        from sc2deploy.runtime.eager import EagerRuntime

        return EagerRuntime(source, dtype=dtype, max_batch=max_batch, capacity=capacity, **options)
    if backend == "cuda":
        if source is None:
            raise UserError("the cuda backend needs --checkpoint DIR or --size SIZE")
        from sc2deploy.runtime.cuda import CudaRuntime

        return CudaRuntime(source, dtype=dtype, max_batch=max_batch, capacity=capacity, **options)
    if backend == "ort":
        if artifact is None:
            raise UserError("the ort backend needs --artifact DIR (made by `sc2deploy export --target ort`)")
        from sc2deploy.runtime.onnxruntime import OrtRuntime

        return OrtRuntime(artifact, max_batch=max_batch, capacity=capacity, **options)
    if backend == "trt":
        if engine is None:
            raise UserError("the trt backend needs --engine DIR (made by `sc2deploy build`)")
        from sc2deploy.runtime.tensorrt import TrtRuntime

        return TrtRuntime(engine, max_batch=max_batch, capacity=capacity, **options)
    raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def open_head_runtime(backend: str, *, source=None, artifact=None, dtype: str = "fp32", **options) -> HeadRuntime:
    """eager on a TensorSource (a head checkpoint or random head weights), ort on a head artifact."""
    if backend == "eager":
        from sc2deploy.runtime.heads import EagerHeads

        return EagerHeads(source, dtype=dtype, **options)
    if backend == "ort":
        from sc2deploy.runtime.ort_heads import OrtHeads

        return OrtHeads(artifact, **options)
    raise UserError(f"unknown backend {backend!r} for a head model; choose eager or ort")


__all__ = ["BACKENDS", "HeadRuntime", "Runtime", "open_head_runtime", "open_runtime"]
