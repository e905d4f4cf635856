"""Artifacts that were changed, cut short or never finished are refused at load, naming the file."""
from __future__ import annotations

import json
import shutil

import pytest

from sc2deploy.errors import UserError
from sc2deploy.contract import MANIFEST
from sc2deploy.export.manifest import verify_artifact
from sc2deploy.runtime.onnxruntime import OrtRuntime


@pytest.fixture
def artifact(store, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(store.artifact(), copy)
    return copy


def test_a_sound_artifact_verifies(artifact):
    manifest = verify_artifact(artifact)
    assert manifest.target == "ort"


def test_changed_bytes_fail_the_hash_check(artifact):
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"model\.onnx\.data does not match the sha256"):
        verify_artifact(artifact)
    with pytest.raises(UserError, match=r"model\.onnx\.data does not match the sha256"):
        OrtRuntime(artifact)
    verify_artifact(artifact, hashes=False)  # sizes alone cannot see it


def test_truncated_external_data_is_named_at_load(artifact):
    data = artifact / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(UserError, match=r"model\.onnx\.data is truncated"):
        OrtRuntime(artifact, verify=False)
    # even with a manifest that agrees with the cut file, the graph's own offsets catch it
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"]["model.onnx.data"]["bytes"] = data.stat().st_size
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"model\.onnx\.data is truncated: \d+ bytes, but model\.onnx needs \d+"):
        OrtRuntime(artifact, verify=False)


def test_missing_manifest_means_not_an_artifact(artifact):
    (artifact / MANIFEST).unlink()
    with pytest.raises(UserError, match="not an sc2deploy export artifact"):
        OrtRuntime(artifact)


def test_missing_file_is_named(artifact):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="lacks tokenizer.json"):
        verify_artifact(artifact)


def test_trt_artifact_is_refused_by_the_ort_runtime(store):
    with pytest.raises(UserError, match="exported for --target trt"):
        OrtRuntime(store.artifact(target="trt"))


def test_the_source_checkpoint_hashes_are_those_of_its_files(store):
    """What `parity` checks the source checkpoint against: the sha256 of each weight file, recorded at export."""
    from sc2deploy.contract import sha256_file

    folder, _ = store.checkpoint()
    source = json.loads((store.artifact() / MANIFEST).read_text())["source"]
    assert source["kind"] == "checkpoint" and source["path"] == str(folder.resolve())
    assert source["sha256"] == {"model.safetensors": sha256_file(folder / "model.safetensors")}
