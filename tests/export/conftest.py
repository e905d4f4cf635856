"""Fixtures of the export tests: a session-wide store of checkpoints and artifacts (artifacts.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _artifacts():
    name, path = "sc2deploy_tests_artifacts", Path(__file__).resolve().parents[1] / "export" / "artifacts.py"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def helpers():
    """The helper module tests/export/artifacts.py (make_hf_model, ort_session, run_prompt, ...)."""
    return _artifacts()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return _artifacts().store(tmp_path_factory)
