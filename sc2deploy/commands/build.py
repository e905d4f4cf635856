"""sc2deploy build: a trt-target export artifact -> a TensorRT engine folder (logic in sc2deploy/build.py)."""
from __future__ import annotations

import argparse

from sc2deploy.build import BUILD_DTYPES, PLUGIN_MODES, PRESET_LIMITS
from sc2deploy.commands.common import notice, positive_int, print_json


def register(subparsers) -> None:
    presets = "; ".join(f"{name}: batch {lim.max_batch}, input {lim.max_input_len}, sequence {lim.max_seq_len}"
                        for name, lim in PRESET_LIMITS.items())
    p = subparsers.add_parser(
        "build", help="build a TensorRT engine from an `export --target trt` artifact (needs TensorRT and a GPU)",
        description="Parse the artifact's ONNX graph (its RopeCache and SlidingWindowGQA nodes become the sc2deploy "
                    "TensorRT plugins: Triton kernels for RoPE with the ring-cache write, and flash attention over "
                    "the sliding window), build one engine with two "
                    "optimization profiles - prefill (batch <= --max-batch, prompt <= --max-input-len tokens) and "
                    "decode (one token per row) - and write ENGINE_DIR: model.plan, sc2deploy.json (TensorRT "
                    "version, GPU and compute capability, plugin hash, build flags, profiles), config.json and "
                    "tokenizer.json. The engine runs only with the TensorRT version and GPU architecture that "
                    "built it. With --plugin aot (default) the kernels are compiled into the engine, which then runs "
                    "without Python (trtexec, C++); --plugin jit calls the kernels from Python at run time. "
                    "Needs TensorRT >= 10.9, triton and a CUDA GPU: use the GPU image (docker/Dockerfile.gpu).",
        epilog=f"defaults by model size - {presets}. The KV cache keeps min(--max-seq-len, window) positions per "
               "sequence. example: sc2deploy export --size 15b --target trt --dtype bf16 --out out/15b-trt && "
               "sc2deploy build out/15b-trt --out out/15b-engine",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="ARTIFACT_DIR", help="folder written by `sc2deploy export --target trt`")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="engine folder to write")
    p.add_argument("--dtype", metavar="DTYPE", choices=BUILD_DTYPES,
                   help=f"engine dtype: {', '.join(BUILD_DTYPES)} (default and only choice: the artifact's; the "
                        "network is strongly typed)")
    p.add_argument("--max-batch", type=positive_int, metavar="N", help="most sequences per call (default by size)")
    p.add_argument("--max-input-len", type=positive_int, metavar="N",
                   help="most prompt tokens per prefill call; longer prompts are prefilled in chunks (default by size)")
    p.add_argument("--max-seq-len", type=positive_int, metavar="N",
                   help="longest sequence, prompt and completion (default by size, at most the model's context)")
    p.add_argument("--plugin", default="aot", choices=PLUGIN_MODES,
                   help="aot: kernels compiled into the engine (default); jit: Python plugins at run time")
    p.add_argument("--optimization-level", type=int, default=3, metavar="N",
                   help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--workspace-mib", type=positive_int, metavar="MIB", help="TensorRT workspace limit (default: none)")
    p.add_argument("--force", action="store_true", help="replace an earlier engine in ENGINE_DIR")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.add_argument("--json", action="store_true", help="print the engine manifest as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from sc2deploy.build import build_engine

    result = build_engine(args.artifact, args.out, force=args.force, verbose=args.verbose, log=notice,
                          dtype=args.dtype, max_batch=args.max_batch, max_input_len=args.max_input_len,
                          max_seq_len=args.max_seq_len, plugin=args.plugin,
                          optimization_level=args.optimization_level, workspace_mib=args.workspace_mib)
    for warning in result.warnings:
        notice(f"warning: {warning}")
    if args.json:
        print_json(result.manifest.to_json())
    else:
        m = result.manifest.details
        b = m["build"]
        notice(f"wrote {result.folder}: TensorRT {m['tensorrt_version']} engine for {m['gpu']['name']} "
               f"(sm {m['gpu']['compute_capability']}), {b['dtype']}, {b['plugin']} plugin, batch <= {b['max_batch']}, "
               f"prefill <= {b['max_input_len']}, sequence <= {b['max_seq_len']}, built in {b['seconds']} s")
    return 0
