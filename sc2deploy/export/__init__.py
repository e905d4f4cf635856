"""Reference model -> ONNX artifact: the graph traced from the model, weights streamed from the checkpoint.

Modules: targets (what can be exported), schemas and nodes (the attention node per target),
graph and rewrite (tracing on the meta device, then tidying the graph), weights (streamed
external data), genai (onnxruntime-genai's config), manifest (sc2deploy.json, verification),
exporter (all of it: `export_artifact`; the folder is written through sc2deploy.staging).
Heavy dependencies (torch.onnx, onnx) are imported only when an export runs.
"""
from __future__ import annotations

from sc2deploy.contract import TARGETS
from sc2deploy.export.targets import TARGET_DTYPES

__all__ = ["TARGETS", "TARGET_DTYPES", "export_artifact", "verify_artifact"]


def export_artifact(*args, **kwargs):
    from sc2deploy.export.exporter import export_artifact as run

    return run(*args, **kwargs)


def verify_artifact(*args, **kwargs):
    from sc2deploy.export.manifest import verify_artifact as run

    return run(*args, **kwargs)


export_artifact.__doc__ = "See sc2deploy.export.exporter.export_artifact."
verify_artifact.__doc__ = "See sc2deploy.export.manifest.verify_artifact."
