"""sc2deploy.json: what an artifact is and how it was made, with the sha256 of every file.

Written last, so a folder without it is not a finished export. `verify_artifact` is what a
runtime calls before loading: missing files, wrong sizes (a truncated external-data file) and,
unless asked not to, wrong hashes are reported by file name, with the fix.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from sc2deploy.checkpoint import sha256_file
from sc2deploy.errors import UserError

from sc2deploy import staging
from sc2deploy.staging import MANIFEST
FORMAT, FORMAT_VERSION = "sc2deploy-onnx-artifact", 1
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


def write_manifest(folder: Path, body: dict, known_sha256: dict[str, str] | None = None) -> dict:
    """Write sc2deploy.json with `body` and a `files` table of every other file in `folder`."""
    known_sha256 = known_sha256 or {}
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        digest = known_sha256.get(path.name) or sha256_file(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": digest}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "tools": tool_versions(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    manifest = staging.read_manifest(folder, "artifact", FORMAT, FORMAT_VERSION, "run `sc2deploy export` again")
    if not isinstance(manifest.get("files"), dict):
        raise UserError(f"{Path(folder) / MANIFEST} lists no files; run `sc2deploy export` again")
    return manifest


def verify_artifact(folder: str | Path, hashes: bool = True) -> dict:
    """The manifest of `folder`, after checking that every file it lists is present, whole and (with `hashes`) unchanged."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"artifact {folder} lacks {name}, which its {MANIFEST} lists; re-export the artifact")
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "changed"
            raise UserError(f"{path} is {what}: {size} bytes, {MANIFEST} says {entry['bytes']}; "
                            "copy the artifact again or re-export it")
    if hashes:
        for name, entry in manifest["files"].items():
            path = folder / name
            if sha256_file(path) != entry["sha256"]:
                raise UserError(f"{path} does not match the sha256 in {MANIFEST}: the file was changed or corrupted "
                                "after export; copy the artifact again or re-export it")
    return manifest
