"""The whole package type-checks (the TensorRT modules are also checked against tensorrt-stubs in test_build.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_package_type_checks():
    result = subprocess.run([sys.executable, "-m", "mypy", "sc2deploy"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
