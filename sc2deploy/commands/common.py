"""Arguments and helpers shared by several commands."""
from __future__ import annotations

import argparse
import json
import sys

from sc2deploy.config import DTYPE_BYTES, PRESETS
from sc2deploy.errors import UserError


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
