"""An export artifact's sc2deploy.json (contract.Manifest): what it is and how it was made, with the sha256 of
every file. Written last, so a folder without it is not a finished export. Reading and verifying it is the
contract's (`contract.open_artifact_manifest`), so a runtime needs nothing from the exporter.
"""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from sc2deploy.contract import ARTIFACT, Manifest, files_table, read_manifest, verify_files
from sc2deploy.contract import write_manifest as write

TOOLS = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-genai", "transformers")


def tool_versions() -> dict[str, str]:
    from sc2deploy import __version__

    versions = {"sc2deploy": __version__, "python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(folder: Path, config: dict[str, Any], dtype: str, details: dict[str, Any],
                   known_sha256: dict[str, str] | None = None) -> Manifest:
    """Write the artifact's sc2deploy.json: `details` (target, graph, source, ...), the tools, and every file."""
    manifest = Manifest(ARTIFACT, config, dtype, files_table(folder, known_sha256),
                        {**details, "tools": tool_versions()})
    write(folder, manifest)
    return manifest


def verify_artifact(folder: str | Path, hashes: bool = True) -> Manifest:
    """The manifest of the artifact at `folder`, after checking that every file it lists is present, whole and
    (with `hashes`) unchanged."""
    manifest = read_manifest(folder, ARTIFACT)
    verify_files(folder, manifest, hashes)
    return manifest
