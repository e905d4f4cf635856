#!/usr/bin/env bash
# The GPU check, for a GPU host (one H200: under 10 minutes). Prints one JSON summary on stdout
# (progress on stderr): the Triton sliding-window GQA kernel against the reference at
# StarCoder2-15b shapes and its time against torch SDPA with a window mask, eager bf16 decode
# tokens/s of a random 15b, and - where TensorRT is importable (the GPU image,
# docker/Dockerfile.gpu) - tiny engines built and checked with `parity` against the eager model.
# Each part records its own failure in the JSON; the others still run.
#
#   bash scripts/gpu-check.sh > gpu-check.json          # everything
#   bash scripts/gpu-check.sh --quick                   # smaller: sequences <= 4096, one engine
#   bash scripts/gpu-check.sh --skip tensorrt           # extra arguments go to `sc2deploy selftest --gpu`
#
# Also runs the kernel's unit tests natively on the GPU (TRITON_INTERPRET=0) when pytest is
# installed, and reports them in the same JSON. Exit: 0 passed, 1 a check failed, 2 no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

summary=$(mktemp)
trap 'rm -f "$summary" "$summary.tests"' EXIT
"$PY" -m sc2deploy.cli selftest --gpu "$@" > "$summary"
status=$?
if [ "$status" -eq 2 ]; then exit 2; fi

tests_status=skipped
if "$PY" -c "import pytest" 2>/dev/null && [ -d tests/plugins ]; then
  if TRITON_INTERPRET=0 timeout 300 "$PY" -m pytest -q -x tests/plugins >"$summary.tests" 2>&1; then
    tests_status=passed
  else
    tests_status=failed; status=1
  fi
fi

"$PY" - "$summary" "$summary.tests" "$tests_status" <<'PYEOF'
import json, pathlib, sys
summary = json.loads(pathlib.Path(sys.argv[1]).read_text())
tail = pathlib.Path(sys.argv[2]).read_text()[-2000:] if pathlib.Path(sys.argv[2]).exists() else ""
summary["plugin_tests_on_gpu"] = {"status": sys.argv[3], "tail": tail}
summary["ok"] = bool(summary.get("ok")) and sys.argv[3] != "failed"
print(json.dumps(summary, indent=2))
PYEOF
exit "$status"
