"""sc2deploy export: the reference model -> an ONNX artifact folder for ONNX Runtime or TensorRT."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from sc2deploy.commands.common import (add_renamed_seed, add_size, add_weights_seed, check_renamed_seed,
                                       open_weights, print_json)
from sc2deploy.commands.progress import StageLog, progress_bar
from sc2deploy.errors import UserError
from sc2deploy.quantization import SCHEMES, QuantScheme
from sc2deploy.tasks import TEXT_GENERATION

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

Quantization (--quant, ort only): int8 or int4 weights in blocks of --block-size along each
weight's input dimension, each block with its own scale and zero point. Every linear layer
(q/k/v/o, c_fc, c_proj, lm_head) becomes com.microsoft::MatMulNBits and the token embedding
com.microsoft::GatherBlockQuantized; biases and layer norms keep the dtype. The weights are
quantized while they stream, so quantizing costs no more memory than exporting. --accuracy-level
is MatMulNBits' (4: activations quantized to int8 per block, the fastest on CPU; 0: they stay in
the dtype, the closest to the model). Runtimes (generate, serve, parity) need no new flag.

The other StarCoder2 heads (config.json's architectures Starcoder2ForSequenceClassification,
Starcoder2ForTokenClassification or Starcoder2Model) export for ONNX Runtime, prefill only: inputs
input_ids and attention_mask [batch, sequence] (left or right padding), output logits [batch,
num_labels] (pooled) or [batch, sequence, num_labels], or last_hidden_state [batch, sequence,
hidden]; sc2deploy.json records the task, and config.json's labels. Run them with `sc2deploy
classify` or `sc2deploy embed`.

Without --checkpoint, the weights are seeded random ones for --size (a notice says so)."""

EPILOG = """\
examples:
  sc2deploy export --size 15b --dtype fp16 --out sc2-15b-ort-fp16
  sc2deploy export --checkpoint ./starcoder2-3b --target trt --dtype bf16
  sc2deploy export --checkpoint ./starcoder2-15b --quant int4 --out sc2-15b-int4
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
    quant = p.add_argument_group("quantization (ort)")
    quant.add_argument("--quant", default="none", metavar="SCHEME",
                       help="none (default), int8 or int4: block-quantized weights (MatMulNBits)")
    quant.add_argument("--block-size", type=int, metavar="N",
                       help=f"weights per scale along the input dimension: 16, 32, 64, 128 or 256 (default "
                            f"{SCHEMES['int4'].block_size})")
    quant.add_argument("--accuracy-level", type=int, metavar="N",
                       help=f"MatMulNBits' accuracy_level: 0 (activations in the dtype), 1 fp32, 2 fp16, 3 bf16, 4 "
                            f"(int8 activations; default {SCHEMES['int4'].accuracy_level})")
    quant.add_argument("--symmetric", action="store_true",
                       help="no zero points (each block symmetric around 0); default asymmetric, which is closer "
                            "to the model")
    p.add_argument("--out", metavar="DIR", help="artifact folder to create (default: ./starcoder2-NAME-TARGET-DTYPE)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip onnx.checker.check_model(full_check=True) on the written graph")
    p.add_argument("--json", action="store_true", help="print one JSON object describing the artifact")
    p.set_defaults(func=run)


def default_out(args) -> Path:
    name = args.size if args.size else Path(args.checkpoint).resolve().name
    quant = f"-{args.quant}" if args.quant != "none" else ""
    return Path(f"starcoder2-{name}-{args.target}-{args.dtype}{quant}")


def quant_scheme(args) -> QuantScheme | None:
    """The --quant scheme with --block-size / --accuracy-level / --symmetric applied; None without --quant."""
    if args.quant not in ("none", *SCHEMES):
        raise UserError(f"unknown --quant {args.quant!r}; choose none, {', '.join(SCHEMES)}")
    options = {"block_size": args.block_size, "accuracy_level": args.accuracy_level,
               "symmetric": args.symmetric or None}
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if args.quant == "none":
        if given:
            raise UserError(f"{', '.join(given)}: give --quant int8 or int4 too (they set its scheme)")
        return None
    try:
        return dataclasses.replace(SCHEMES[args.quant], **{k: v for k, v in options.items() if v is not None})
    except ValueError as e:
        raise UserError(f"--quant {args.quant}: {e}") from None


def run(args) -> int:
    from sc2deploy.export import export_artifact
    from sc2deploy.export.targets import check_target_dtype

    check_target_dtype(args.target, args.dtype)
    quant = quant_scheme(args)
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

        export_artifact(source, out, args.dtype, args.target, quant=quant, force=args.force, progress=progress,
                        on_total=on_total, check=args.check)
    seconds = time.perf_counter() - start
    from sc2deploy.contract import ARTIFACT, read_manifest

    manifest = read_manifest(out, ARTIFACT)
    total = sum(f["bytes"] for f in manifest.files.values())
    head = {} if manifest.task == TEXT_GENERATION else {"task": manifest.task}  # a classifier or base model
    if args.json:
        print_json({"artifact": str(out), **head, "target": args.target, "dtype": args.dtype,
                    "quantization": quant.to_manifest() if quant else None, "source": manifest.source,
                    "bytes": total, "seconds": round(seconds, 3), "files": manifest.files})
    else:
        scheme = f", {quant.name} blocks of {quant.block_size}" if quant else ""
        task = f", {manifest.task}" if head else ""
        print(f"wrote {out} ({total / 1e9:.2f} GB, {args.dtype}{scheme}, target {args.target}{task}) in {seconds:.1f} s")
    return 0
