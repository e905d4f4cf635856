"""`python -m sc2deploy` is the `sc2deploy` command: the same help, output and exit statuses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sc2deploy", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command():
    from sc2deploy.cli import COMMANDS

    done = run_module("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: sc2deploy ")
    assert all(name in done.stdout for name in COMMANDS)


def test_runs_a_command_and_passes_its_exit_status():
    done = run_module("info", "--size", "15b", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["kv_bytes_per_token"]["bf16"] == 80 * 1024
    bad = run_module("info", "--size", "20b")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown size '20b'" in bad.stderr
