"""sc2deploy export: the reference model -> an ONNX artifact folder for ONNX Runtime or TensorRT."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sc2deploy.commands.common import (add_renamed_seed, add_size, add_weights_seed, check_renamed_seed,
                                       open_weights, print_json)
from sc2deploy.commands.progress import StageLog, progress_bar
from sc2deploy.errors import UserError

DESCRIPTION = """\
Export StarCoder2 to ONNX. The graph is traced from sc2deploy's reference model (on PyTorch's
meta device, so no weights are held while tracing); the weights then stream from the checkpoint
into model.onnx.data one tensor at a time, so peak memory follows the largest single tensor, not
the model (15b fp16 exports in 1.3 GiB of RSS: bench/export_memory.py). When stderr is not a
terminal, progress is a line every few seconds.

Targets:
  ort  attention becomes com.microsoft::GroupQueryAttention with local_window_size (and a
       window-sized KV cache); runs in ONNX Runtime on CPU (fp32, fp16) and CUDA, in
       onnxruntime-genai, and in `sc2deploy generate --backend ort`.
  trt  attention becomes the TensorRT plugin nodes trt.plugins::RopeCache -> SlidingWindowGQA
       (plugin_namespace "sc2deploy", plugin_version "1"); for `sc2deploy build`. fp32, fp16, bf16.

The folder holds model.onnx, model.onnx.data, tokenizer.json, genai_config.json and
tokenizer_config.json (ort target), and sc2deploy.json: the config, dtype, target, source
checkpoint (and the sha256 of its files) or random seed, tool versions and the sha256 of every
file. Runtimes verify it before loading. The export is written to a hidden temporary folder
beside DIR and renamed into place at the end: an interrupted export never leaves a folder that
looks finished.

Inputs: input_ids int64 [batch, sequence]; attention_mask int64 [batch, total_sequence];
past_key_values.N.key/.value [batch, kv_heads, past_sequence, head_dim]; logits_to_keep
int64 [1] (optional, default 0 = logits of every position). Outputs: logits [batch, sequence,
vocab]; present.N.key/.value.

Without --checkpoint, the weights are seeded random ones for --size (a notice says so)."""

EPILOG = """\
examples:
  sc2deploy export --size 15b --dtype fp16 --out sc2-15b-ort-fp16
  sc2deploy export --checkpoint ./starcoder2-3b --target trt --dtype bf16
  sc2deploy generate --backend ort --artifact sc2-15b-ort-fp16 --prompt 'def fib(n):'

exit status: 0 done, 2 bad input (message on stderr; nothing is left behind)."""


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("export", help="export the model to an ONNX artifact (ONNX Runtime or TensorRT)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("weights (one of)")
    add_size(source)
    source.add_argument("--checkpoint", metavar="DIR",
                        help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json); with "
                             "--size, its config.json must match that size")
    add_weights_seed(source)
    add_renamed_seed(source)
    p.add_argument("--dtype", default="fp32", metavar="DTYPE",
                   help="weight and activation dtype: fp32 or fp16 (ort), fp32, fp16 or bf16 (trt); default fp32")
    p.add_argument("--target", default="ort", metavar="TARGET", help="ort (default) or trt")
    p.add_argument("--out", metavar="DIR", help="artifact folder to create (default: ./starcoder2-NAME-TARGET-DTYPE)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip onnx.checker.check_model(full_check=True) on the written graph")
    p.add_argument("--json", action="store_true", help="print one JSON object describing the artifact")
    p.set_defaults(func=run)


def default_out(args) -> Path:
    name = args.size if args.size else Path(args.checkpoint).resolve().name
    return Path(f"starcoder2-{name}-{args.target}-{args.dtype}")


def run(args) -> int:
    from sc2deploy.export import export_artifact
    from sc2deploy.export.targets import check_target_dtype

    check_target_dtype(args.target, args.dtype)
    if args.size is None and args.checkpoint is None:
        raise UserError("give --size SIZE (random weights) or --checkpoint DIR")
    check_renamed_seed(args)
    source = open_weights(args.checkpoint, args.size, args.weights_seed,
                          artifact_fix="export reads a Hugging Face checkpoint (config.json, *.safetensors): give the "
                                       "checkpoint it was exported from")
    out = Path(args.out) if args.out else default_out(args)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar, written, weights = None, 0, 0
        stage = stack.enter_context(StageLog())  # a line every few seconds, also when stderr is not a terminal
        stage("export: tracing the model graph ...", show=False)

        def on_total(total: int) -> None:
            nonlocal bar, weights
            weights = total
            stage("export: writing weights ...", show=False)
            bar = stack.enter_context(progress_bar(total, "export: writing weights", stage=stage))

        def progress(n: int) -> None:
            nonlocal written, weights
            if bar is not None:
                bar.update(n)
            written += n
            if written >= weights > 0:
                weights = 0
                stage("export: checking the graph and hashing the files ...", show=False)

        export_artifact(source, out, args.dtype, args.target, force=args.force, progress=progress,
                        on_total=on_total, check=args.check)
    seconds = time.perf_counter() - start
    from sc2deploy.contract import ARTIFACT, read_manifest

    manifest = read_manifest(out, ARTIFACT)
    total = sum(f["bytes"] for f in manifest.files.values())
    if args.json:
        print_json({"artifact": str(out), "target": args.target, "dtype": args.dtype, "source": manifest.source,
                    "bytes": total, "seconds": round(seconds, 3), "files": manifest.files})
    else:
        print(f"wrote {out} ({total / 1e9:.2f} GB, {args.dtype}, target {args.target}) in {seconds:.1f} s")
    return 0
