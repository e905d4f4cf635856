#!/usr/bin/env bash
# The GPU check: the one prepared command for a GPU host. Under 6 minutes on one H200; prints one
# JSON on stdout (progress on stderr). Runs from a plain checkout with the machine's own python
# (PYTHONPATH=., no venv needed; .venv/bin/python when there is one). Each part runs in its own
# process under its own time limit, and a failed part does not stop the others:
#   kernels     the Triton kernels at StarCoder2-15b shapes (bf16) against the reference, and their
#               time against torch SDPA: prefill to 16,384 tokens, decode at past 8,192 (flash-decoding)
#   pytest_gpu  `pytest -m gpu`: the kernels natively, the cuda runtime (CUDA graphs) against eager,
#               one request served by the cuda backend
#   decode      bench/gpu_decode.py: decode tokens/s at batch 1/8/32 of random bf16 3b and 15b for
#               eager, transformers generate and the cuda runtime, against the HBM bound measured there
#   serve_load  bench/serve_load.py on `serve --backend cuda` (3b): 1 and 16 concurrent clients
#   tensorrt    where TensorRT imports: tiny engines built and checked with parity (sc2deploy selftest)
# The JSON ends with "targets": each GPU target, its measured value and whether it is met.
#
#   bash scripts/gpu-check.sh > gpu-check.json
# Exit: 0 every part passed, 1 a part failed, 2 no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: error: no CUDA GPU visible to torch; run this on a GPU host" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

part() {  # part NAME json|log SECONDS COMMAND...: stdout to NAME.json or NAME.log, stderr NAME.err, status NAME.rc
  local name=$1 kind=$2 limit=$3
  shift 3
  echo "gpu-check: $name (at most ${limit} s) ..." >&2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$work/$name.$kind" 2> "$work/$name.err"
  echo $? > "$work/$name.rc"
  echo "gpu-check: $name exit $(cat "$work/$name.rc") in $((SECONDS - start)) s" >&2
}

# Time limits sum to 350 s; they were set without a GPU to try them on (see README, What has run where).
part kernels json 60 "$PY" -c 'import json; from bench.gpu_check import kernel_check
print(json.dumps(kernel_check(dtypes=("bfloat16",), iters=10)))'
part pytest_gpu log 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider
part decode json 110 "$PY" bench/gpu_decode.py --json
part serve_load log 90 "$PY" bench/serve_load.py --backend cuda --size 3b --levels 1,16 --duration 8 --warmup 3 \
  --max-batch 32 --json "$work/serve_load.json"
if "$PY" -c "import tensorrt" 2>/dev/null; then
  part tensorrt json 300 "$PY" -m sc2deploy.cli selftest --gpu --skip eager
fi
"$PY" bench/gpu_targets.py "$work"
