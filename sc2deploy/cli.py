"""The `sc2deploy` command: parse, call, print. Each subcommand lives in sc2deploy/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from sc2deploy import __version__
from sc2deploy.commands.environment import BadVariable, CommandParser
from sc2deploy.errors import UserError

# name -> module in sc2deploy.commands; each module has `register(subparsers)` setting `func`.
COMMANDS = ["info", "checkpoint", "generate", "classify", "embed", "export", "parity", "serve", "complete", "build",
            "selftest"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone: each command module imports what it needs (torch,
    gRPC, ...) at import, so `sc2deploy generate` does not pay for the others."""
    parser = argparse.ArgumentParser(
        prog="sc2deploy",
        description="Deploy StarCoder2 (3b, 7b, 15b): reference model, ONNX export, TensorRT engines, "
                    "gRPC completion service, and parity checks of every runtime against the eager model.",
        epilog="Run `sc2deploy COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"sc2deploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name in [command] if command in COMMANDS else COMMANDS:
        try:
            module = importlib.import_module(f"sc2deploy.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sc2deploy.commands.{name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    try:
        args = parser.parse_args(argv)
    except BadVariable as e:  # a SC2DEPLOY_* variable of a command that reads them (commands/environment.py)
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        code = args.func(args)
    except UserError as e:
        print(f"sc2deploy {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sc2deploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sc2deploy ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
