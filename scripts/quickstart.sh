#!/usr/bin/env bash
# Set up, then run the main job on an embedded default: a random `tiny` StarCoder2 checkpoint
# (the real 49,152-token vocabulary) -> ONNX export -> parity against the eager model ->
# a fill-in-the-middle completion with ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
work=${SC2DEPLOY_DEMO_DIR:-out/quickstart}
rm -rf "$work" && mkdir -p "$work"
sc2deploy checkpoint --size tiny --out "$work/checkpoint"
sc2deploy export --checkpoint "$work/checkpoint" --out "$work/onnx"
sc2deploy parity "$work/onnx"
sc2deploy generate --artifact "$work/onnx" --backend ort \
  --fim-prefix $'def fibonacci(n):\n    ' --fim-suffix $'\n    return a\n' --max-tokens 24 --json
