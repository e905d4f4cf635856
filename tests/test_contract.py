"""The artifact contract: one manifest type with one writer and one reader, versioned, and the names every
stage shares."""
from __future__ import annotations

import json

import pytest

from sc2deploy.config import preset
from sc2deploy.contract import (ARTIFACT, ENGINE, FORMATS, MANIFEST, Manifest, files_table, folder_kind, graph_io,
                                read_manifest, verify_files, write_manifest)
from sc2deploy.errors import UserError


def artifact_manifest(folder) -> Manifest:
    (folder / "model.onnx").write_bytes(b"graph")
    return Manifest(ARTIFACT, preset("tiny").to_hf_dict(), "fp32", files_table(folder),
                    {"target": "ort", "source": {"kind": "random", "seed": 1}})


def test_round_trip(tmp_path):
    written = artifact_manifest(tmp_path)
    write_manifest(tmp_path, written)
    read = read_manifest(tmp_path, ARTIFACT)
    assert read == written and read.version == FORMATS[ARTIFACT][1]
    assert read.target == "ort" and read.source == {"kind": "random", "seed": 1}
    assert read_manifest(tmp_path, None) == written  # either kind
    assert folder_kind(tmp_path) == ARTIFACT
    verify_files(tmp_path, read)
    (tmp_path / "model.onnx").write_bytes(b"GRAPH")
    with pytest.raises(UserError, match="does not match the sha256"):
        verify_files(tmp_path, read)


@pytest.mark.parametrize("version, message", [(FORMATS[ARTIFACT][1] + 1, "upgrade sc2deploy"),
                                              (0, "run `sc2deploy export` again"),
                                              ("1", "run `sc2deploy export` again"),
                                              (None, "run `sc2deploy export` again")])
def test_unknown_versions_are_clear_errors(tmp_path, version, message):
    data = artifact_manifest(tmp_path).to_json()
    data["format_version"] = version
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(UserError, match="format version") as error:
        read_manifest(tmp_path, ARTIFACT)
    assert message in str(error.value)


def test_the_wrong_kind_says_what_the_folder_is(tmp_path):
    write_manifest(tmp_path, artifact_manifest(tmp_path))
    with pytest.raises(UserError, match="is an export artifact, not an engine"):
        read_manifest(tmp_path, ENGINE)


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"), ("[]", "not an sc2deploy manifest"), ('{"format": "other"}', "not an sc2deploy manifest"),
    ('{"format": "sc2deploy-onnx-artifact", "format_version": 1, "target": "ort", "config": {}, "dtype": "fp32"}',
     "lacks 'files'"),
    ('{"format": "sc2deploy-onnx-artifact", "format_version": 1, "target": "ort", "config": {}, "dtype": "fp32", '
     '"files": {"model.onnx": 5}}', "no valid"),
])
def test_damaged_manifests(tmp_path, content, message):
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(UserError, match=message):
        read_manifest(tmp_path, ARTIFACT)


def test_folder_kinds(tmp_path):
    assert folder_kind(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert folder_kind(tmp_path) == "checkpoint"


def test_graph_io_per_target():
    inputs, outputs = graph_io(2, "ort")
    assert inputs == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                      "past_key_values.1.key", "past_key_values.1.value", "logits_to_keep"]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert graph_io(2, "trt")[0] == inputs[:-1]
