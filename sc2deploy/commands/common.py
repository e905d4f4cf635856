"""Arguments and helpers shared by several commands."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from sc2deploy.config import DTYPE_BYTES, PRESETS
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


def add_weights(parser: argparse.ArgumentParser, seed_flag: str = "--seed") -> None:
    """--size / --checkpoint / a seed flag: where the weights come from."""
    add_size(parser)
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument(seed_flag, dest="weights_seed", type=int, default=0,
                        help="seed of the random weights used without --checkpoint (default 0)")


def add_dtype(parser: argparse.ArgumentParser, default: str = "fp32", choices=tuple(DTYPE_BYTES)) -> None:
    parser.add_argument("--dtype", default=default, metavar="DTYPE",
                        help=f"weight and activation dtype: {', '.join(choices)} (default {default})")


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


def progress_bar(total: int, desc: str, unit: str = "B"):
    """A tqdm bar on a terminal; silent when stderr is a pipe."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                disable=not sys.stderr.isatty(), file=sys.stderr)
