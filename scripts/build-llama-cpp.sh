#!/usr/bin/env bash
# Build llama.cpp's CPU tools for bench/quant.py: llama-bench, llama-batched-bench, llama-quantize and
# llama-perplexity (its --kl-divergence-base dumps per-position log-probabilities). The source is the llama.cpp
# vendored in the llama-cpp-python sdist from PyPI (GitHub is not needed): downloaded with pip, unpacked, built
# with cmake: Release, CPU only, static, -march=native without AMX (see NO_AMX below), OpenMP, no
# curl/openssl/server/examples/tests.
#
#   bash scripts/build-llama-cpp.sh            # the last line of stdout is the folder for bench/quant.py --llama-cpp
#
# Idempotent: a finished build with the same cmake arguments is reused. Everything lives under
# $SC2_LLAMA_CPP_CACHE (default ~/.cache/sc2deploy/llama.cpp)/<llama-cpp-python version>/:
#   bin/          the tools, and cmake-args (what they were built with)
#   llama.cpp/    the vendored source: convert_hf_to_gguf.py, conversion/, gguf-py/ (put gguf-py on PYTHONPATH)
#   build/        the cmake build tree; build-seconds: how long the last (re)build took
# Env: SC2_LLAMA_CPP_VERSION (default: the newest llama-cpp-python on PyPI, else the newest cached),
# SC2_LLAMA_CPP_AMX=1 (keep the AMX kernels), PYTHON (default .venv/bin/python, else python3), JOBS (default nproc).
# cmake is pip-installed into the cache when missing or older than 3.14. Progress goes to stderr.
# From scratch it took 5.6 to 9 minutes (335 s and 539 s; the 77 MB download ~1 minute) on 2 cores shared with
# other work; a rerun with everything built takes 2 s.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "build-llama-cpp: $*" >&2; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
CACHE=${SC2_LLAMA_CPP_CACHE:-$HOME/.cache/sc2deploy/llama.cpp}
JOBS=${JOBS:-$(nproc)}
TOOLS=(llama-bench llama-quantize llama-perplexity llama-batched-bench)

newest_version() {  # the newest llama-cpp-python on the package index, as pip sees it
  "$PY" -m pip index versions llama-cpp-python 2>/dev/null | sed -n 's/^llama-cpp-python (\(.*\))$/\1/p' | head -1
}

VERSION=${SC2_LLAMA_CPP_VERSION:-}
if [ -z "$VERSION" ]; then
  # Offline or pip too old for `index`: reuse the newest build already in the cache.
  VERSION=$(newest_version || true)
  [ -n "$VERSION" ] || VERSION=$(ls -1 "$CACHE" 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$VERSION" ] || { log "error: cannot find llama-cpp-python's version (set SC2_LLAMA_CPP_VERSION)"; exit 1; }
fi
ROOT=$CACHE/$VERSION
SRC=$ROOT/llama.cpp

fetch_source() {  # the sdist from PyPI, unpacked; its vendor/llama.cpp moved to $SRC
  local tmp
  rm -rf "$ROOT"/download.*  # left by an interrupted run
  tmp=$(mktemp -d "$ROOT/download.XXXXXX")
  log "downloading the llama-cpp-python $VERSION sdist ..."
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$SRC"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$SRC"
  rm -f "$SRC/.git"  # a submodule pointer into llama-cpp-python's repository, which is not here
  rm -rf "$tmp"
}

cmake_binary() {  # a cmake >= 3.14 (llama.cpp's minimum); pip-installed into the cache when the system has none
  local found
  if command -v cmake >/dev/null; then
    found=$(cmake --version | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')
    if [ "$(printf '%s\n3.14\n' "$found" | sort -V | head -1)" = 3.14 ]; then
      command -v cmake
      return
    fi
  fi
  if [ ! -x "$CACHE/cmake/bin/cmake" ]; then
    log "installing cmake with pip into $CACHE/cmake ..."
    "$PY" -m pip install --quiet --target "$CACHE/cmake/lib" cmake
    mkdir -p "$CACHE/cmake/bin"
    ln -sf "$CACHE/cmake/lib/cmake/data/bin/cmake" "$CACHE/cmake/bin/cmake"  # the wheel's own binary
  fi
  echo "$CACHE/cmake/bin/cmake"
}

# -march=native, minus AMX by default: on this project's AMX-capable CPU VM, llama.cpp's AMX kernels
# (ggml_backend_amx_mul_mat) crash with SIGSEGV on q8_0 and on q4_0 / q4_K_M prefill. SC2_LLAMA_CPP_AMX=1 keeps them.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
[ "${SC2_LLAMA_CPP_AMX:-0}" = 1 ] && NO_AMX=""
CMAKE_ARGS=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CCACHE=OFF
  "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX"
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF -DGGML_BACKEND_DL=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
)

all_built() {  # every tool there, built with these cmake arguments
  local tool
  for tool in "${TOOLS[@]}"; do [ -x "$ROOT/bin/$tool" ] || return 1; done
  [ -f "$SRC/convert_hf_to_gguf.py" ] && [ "$(cat "$ROOT/bin/cmake-args" 2>/dev/null)" = "${CMAKE_ARGS[*]}" ]
}

build_tools() {
  local cmake generator=()
  cmake=$(cmake_binary)
  command -v ninja >/dev/null && generator=(-G Ninja)
  log "configuring with $cmake ($("$cmake" --version | head -1)) ..."
  "$cmake" -S "$SRC" -B "$ROOT/build" "${generator[@]}" -Wno-dev "${CMAKE_ARGS[@]}" >&2
  log "building ${TOOLS[*]} with $JOBS jobs ..."
  "$cmake" --build "$ROOT/build" --config Release -j "$JOBS" --target "${TOOLS[@]}" >&2
  mkdir -p "$ROOT/bin"
  local tool
  for tool in "${TOOLS[@]}"; do cp "$ROOT/build/bin/$tool" "$ROOT/bin/$tool"; done
  echo "${CMAKE_ARGS[*]}" > "$ROOT/bin/cmake-args"
}

mkdir -p "$ROOT"
if all_built; then
  log "reusing the build in $ROOT (delete it to rebuild)"
else
  start=$(date +%s)
  [ -f "$SRC/convert_hf_to_gguf.py" ] || fetch_source
  build_tools
  echo $(( $(date +%s) - start )) > "$ROOT/build-seconds"
  log "built in $(cat "$ROOT/build-seconds") s"
fi
"$ROOT/bin/llama-bench" --version >&2 2>&1 || true
for tool in "${TOOLS[@]}"; do log "$tool: $ROOT/bin/$tool"; done
log "converter: PYTHONPATH=$SRC/gguf-py $PY $SRC/convert_hf_to_gguf.py"
echo "$ROOT"
