"""The checked-in generated code is what grpc_tools makes of completion.proto today."""
from __future__ import annotations

import pytest

from sc2deploy.serving import codegen


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    for path in codegen.generate(tmp_path):
        checked_in = codegen.OUT / path.name
        assert checked_in.read_text() == path.read_text(), (
            f"{checked_in} is stale: run `python -m sc2deploy.serving.codegen` and commit the result")


def test_the_proto_ships_with_the_package():
    proto = codegen.PROTO_ROOT / codegen.PROTO
    assert proto.is_file() and 'package sc2deploy.v1;' in proto.read_text()
