"""What `classify` and `embed` share: the model (--checkpoint or --artifact) of the right task, and the prompt."""
from __future__ import annotations

import argparse
from pathlib import Path

from sc2deploy.commands.common import add_no_verify, check_checkpoint, parse_prompt_ids, positive_int
from sc2deploy.config import Config
from sc2deploy.contract import ARTIFACT, MANIFEST, folder_kind, read_manifest
from sc2deploy.errors import UserError
from sc2deploy.tasks import require_task
from sc2deploy.tokenizer import Tokenizer, validate_text


def add_model_and_prompt(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model (one of)")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="Hugging Face checkpoint folder (config.json, *.safetensors): runs the eager reference")
    model.add_argument("--artifact", metavar="DIR", help="`sc2deploy export` artifact folder: runs ONNX Runtime")
    prompt = p.add_argument_group("prompt (one of)")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--dtype", metavar="DTYPE",
                   help="dtype of the eager reference (--checkpoint): fp32, fp16 or bf16 (default fp32); an "
                        "artifact keeps the dtype it was exported with")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default: all)")
    add_no_verify(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def model_config(args, tasks: tuple[str, ...]) -> tuple[str, Config]:
    """("eager" or "ort", the model's config) after checking that the one --checkpoint or --artifact given exists
    and does one of `tasks`; reads only JSON (before torch is imported)."""
    if (args.checkpoint is None) == (args.artifact is None):
        raise UserError("give exactly one of --checkpoint DIR (a Hugging Face checkpoint) or --artifact DIR (an "
                        "`sc2deploy export` artifact)")
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint, f"use --artifact {args.checkpoint}")
        config = Config.load(args.checkpoint)
        require_task(config.head, tasks, f"checkpoint {args.checkpoint}", f"--checkpoint {args.checkpoint}")
        return "eager", config
    folder = args.artifact
    if not Path(folder).is_dir():
        raise UserError(f"--artifact {folder}: no such folder; give the folder `sc2deploy export` wrote")
    if folder_kind(folder) == "checkpoint":
        raise UserError(f"--artifact {folder}: this is a Hugging Face checkpoint, not an export; use --checkpoint "
                        f"{folder}, or export it with `sc2deploy export --checkpoint {folder}`")
    manifest = read_manifest(folder, ARTIFACT)
    config = Config.from_hf_dict(manifest.config, source=str(Path(folder) / MANIFEST))
    require_task(config.head, tasks, f"artifact {folder}", f"--artifact {folder}")
    return "ort", config


def open_model(args, backend: str):
    """The HeadRuntime and the Tokenizer of the model `model_config` accepted."""
    from sc2deploy.runtime import open_head_runtime

    options: dict = {"threads": args.threads} if args.threads else {}
    if backend == "eager":
        from sc2deploy.checkpoint import CheckpointSource
        from sc2deploy.config import dtype_bytes

        dtype = args.dtype or "fp32"
        dtype_bytes(dtype)
        runtime = open_head_runtime("eager", source=CheckpointSource(args.checkpoint), dtype=dtype, **options)
    else:
        runtime = open_head_runtime("ort", artifact=args.artifact, verify=not args.no_verify, **options)
        if args.dtype is not None and args.dtype != runtime.dtype:
            raise UserError(f"--dtype {args.dtype}: the artifact {args.artifact} is {runtime.dtype} (fixed when it "
                            f"was exported); drop --dtype or re-export with `sc2deploy export --dtype {args.dtype}`")
    return runtime, Tokenizer.load(args.checkpoint or args.artifact)


def prompt_ids(args, tokenizer: Tokenizer) -> list[int]:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt is not None:
        ids = tokenizer.encode(validate_text(args.prompt, "--prompt"))
    else:
        ids = parse_prompt_ids(args.prompt_ids)
    if not ids:
        raise UserError("the prompt is empty; give some text or token ids")
    return ids


def floats(values) -> list:
    """A numpy array as nested lists of Python floats (JSON), rounded to float32's precision."""
    return [float(f"{v:.7g}") for v in values] if values.ndim == 1 else [floats(row) for row in values]
