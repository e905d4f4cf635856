#!/usr/bin/env bash
# Create .venv and install sc2deploy with everything the tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (docs/machines.md#installing).
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[onnx,serve,test]"
python -m pip install --quiet --no-deps tensorrt-stubs
python -c "import sc2deploy, torch, onnxruntime, grpc; print('sc2deploy ready: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
