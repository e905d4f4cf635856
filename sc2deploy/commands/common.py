"""Arguments and helpers shared by several commands."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sc2deploy.config import PRESETS, Config
from sc2deploy.contract import DTYPE_BYTES, MANIFEST, folder_kind, read_manifest
from sc2deploy.errors import UserError

if TYPE_CHECKING:
    import torch


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_size(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--size", required=required, metavar="SIZE",
                        help=f"model size preset: {', '.join(PRESETS)}")


def add_weights(parser: argparse.ArgumentParser, seed_flag: str = "--weights-seed") -> None:
    """--size / --checkpoint / --weights-seed: where the weights come from."""
    add_size(parser)
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    add_weights_seed(parser, seed_flag)


def add_weights_seed(parser, flag: str = "--weights-seed") -> None:
    """--weights-seed, the seed of random weights (`--seed` is the sampling seed in every command)."""
    parser.add_argument(flag, dest="weights_seed", type=int, default=0, metavar="N",
                        help="seed of the random weights used without --checkpoint (default 0)")


def add_renamed_seed(parser) -> None:
    """The old weights-seed spelling of `checkpoint` and `export`, hidden: using it is a one-line error naming
    --weights-seed, not a silent change of meaning."""
    parser.add_argument("--seed", dest="renamed_seed", default=None, help=argparse.SUPPRESS)


def check_renamed_seed(args) -> None:
    if getattr(args, "renamed_seed", None) is not None:
        raise UserError(f"--seed is now --weights-seed here (the seed of the random weights; --seed is the sampling "
                        f"seed of generate, serve and complete): give --weights-seed {args.renamed_seed}")


# ---------------------------------------------------------------- what a folder is
def refuse_export_as_checkpoint(folder: str | Path, fix: str | None = None) -> None:
    """A one-line error when --checkpoint names an export artifact or engine folder instead of a checkpoint."""
    kind = folder_kind(folder)
    if kind == "artifact":
        raise UserError(f"--checkpoint {folder}: this is an export artifact (has {MANIFEST}); "
                        + (fix or f"use --artifact {folder}"))
    if kind == "engine":
        raise UserError(f"--checkpoint {folder}: this is a TensorRT engine folder (has {MANIFEST}); "
                        + (fix or f"use --engine {folder}"))


def check_checkpoint(checkpoint: str, artifact_fix: str | None = None) -> None:
    """Refuse an export folder given as --checkpoint, and a bad config.json, before anything imports torch."""
    refuse_export_as_checkpoint(checkpoint, artifact_fix)
    if (Path(checkpoint) / "config.json").is_file():
        Config.load(checkpoint)


def open_weights(checkpoint: str | None, size: str | None, seed: int, artifact_fix: str | None = None):
    """The TensorSource of --checkpoint or --size/--weights-seed (generate, export, serve)."""
    if checkpoint is not None:
        check_checkpoint(checkpoint, artifact_fix)
    from sc2deploy.checkpoint import open_source

    return open_source(checkpoint, size, seed, notice)


def infer_backend(args) -> str:
    """--backend, else the one the weights imply: ort with --artifact, trt with --engine, else eager."""
    from sc2deploy.runtime import BACKENDS

    backend = args.backend or ("ort" if args.artifact else "trt" if args.engine else "eager")
    return check_choice(backend, BACKENDS, "backend")


def parse_prompt_ids(text: str) -> list[int]:
    """--prompt-ids 1,2,3 as token ids; a UserError naming the flag for anything else."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def check_readable(folder: str | None, flag: str) -> None:
    """A UserError now when `folder` or a file in it cannot be read by this process (a volume mounted with
    another owner, as in a container), instead of a traceback from deep inside a loader."""
    if folder is None or not Path(folder).is_dir():
        return
    path = Path(folder)
    try:
        denied = next((p for p in path.iterdir() if p.is_file() and not os.access(p, os.R_OK)), None)
    except PermissionError:
        denied = path
    if denied is None:
        return
    try:
        owner = f", owned by uid {denied.stat().st_uid}"
    except OSError:
        owner = ""
    raise UserError(f"cannot read {flag} {folder}: permission denied on {denied.name or denied} for uid "
                    f"{os.getuid()}{owner}; make it readable by this user (chmod -R a+rX, a Kubernetes fsGroup, or "
                    f"run as its owner)")


def runtime_folder(args, backend: str) -> str:
    """The --artifact (ort) or --engine (trt) folder, after checking it exists and is of that kind."""
    flag, made_by = ("--artifact", "`sc2deploy export --target ort`") if backend == "ort" else \
        ("--engine", "`sc2deploy build`")
    folder = args.artifact if backend == "ort" else args.engine
    if folder is None:
        raise UserError(f"the {backend} backend needs {flag} DIR (made by {made_by})")
    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: no such folder; give the folder made by {made_by}")
    if folder_kind(folder) == "checkpoint":
        raise UserError(f"{flag} {folder}: this is a Hugging Face checkpoint, not an export; use --checkpoint "
                        f"{folder} (eager or cuda backend), or make one with {made_by}")
    return folder


def add_no_verify(parser) -> None:
    parser.add_argument("--no-verify", action="store_true",
                        help="ort: check only the sizes of the artifact's files, not their sha256 (by default a file "
                             "is rehashed only if its size, mtime or inode changed since it last passed)")


def add_dtype(parser: argparse.ArgumentParser, default: str = "fp32", choices=tuple(DTYPE_BYTES)) -> None:
    parser.add_argument("--dtype", default=default, metavar="DTYPE",
                        help=f"weight and activation dtype: {', '.join(choices)} (default {default})")


def add_run_dtype(parser) -> None:
    """--dtype of a command that runs any backend (generate, serve): see check_dtype."""
    parser.add_argument("--dtype", metavar="DTYPE",
                        help=f"weight and activation dtype of the eager and cuda backends: {', '.join(DTYPE_BYTES)} "
                             "(default fp32); an artifact or engine keeps the dtype it was made with")


def check_dtype(args, backend: str, folder: str | None) -> str:
    """The dtype to run: --dtype for eager and cuda (default fp32); an artifact's or engine's own, which a
    different --dtype cannot change (an error, not a silent fp32 run)."""
    if backend in ("eager", "cuda"):
        dtype = args.dtype or "fp32"
        if dtype not in DTYPE_BYTES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        return dtype
    fixed = _recorded_dtype(folder)
    if args.dtype is not None and fixed is not None and args.dtype != fixed:
        what, remake = (("artifact", f"re-export with `sc2deploy export --dtype {args.dtype}`") if backend == "ort"
                        else ("engine", f"re-export with `sc2deploy export --target trt --dtype {args.dtype}` "
                                        "and build again"))
        raise UserError(f"--dtype {args.dtype}: the {what} {folder} is {fixed} (fixed when it was made; --dtype "
                        f"applies to the eager and cuda backends); {remake}, or drop --dtype")
    return fixed or args.dtype or "fp32"


def _recorded_dtype(folder: str | None) -> str | None:
    try:
        return read_manifest(str(folder), None).dtype
    except UserError:
        return None  # the runtime's own checks say what is wrong with the folder


def add_device(parser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="device of the eager or cuda runtime: cpu, cuda or cuda:N "
                             "(default: cpu for eager, cuda for cuda)")


def resolve_device(text: str | None, backend: str = "eager") -> torch.device:
    """The torch device a --device value names (None: the backend's default), if this machine has it."""
    import torch

    if text is None:
        text = "cuda" if backend == "cuda" else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {text!r}; give --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fix = "--backend eager or ort" if backend == "cuda" else "--device cpu"
            raise UserError(f"--device {text}: CUDA is not available on this machine; use {fix} "
                            "or run on a GPU host with a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: this machine has {count} CUDA device(s); "
                            f"give cuda:0 to cuda:{count - 1}")
    return device


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def notice(message: str) -> None:
    print(message, file=sys.stderr)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------- progress of long work
