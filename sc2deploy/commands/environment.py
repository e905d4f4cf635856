"""Options from the environment: `SC2DEPLOY_<OPTION>` for every option of a command that opts in (as TGI and vLLM
offer), e.g. SC2DEPLOY_MAX_BATCH=16 for --max-batch 16. An option on the command line wins; an empty variable
counts as unset; a switch takes 1/true/yes/on or 0/false/no/off. A bad value is a one-line error naming the variable.
"""
from __future__ import annotations

import argparse
import os
from typing import NamedTuple

from sc2deploy.errors import UserError

PREFIX = "SC2DEPLOY_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class BadVariable(UserError):
    """A SC2DEPLOY_* variable that does not parse; `prog` names the command for the error line."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Unparsed(NamedTuple):
    """A variable's text, held in the namespace until the command line has had its say."""

    name: str
    text: str


def variable(action: argparse.Action) -> str:
    """SC2DEPLOY_MAX_BATCH for --max-batch."""
    flag = next(s for s in action.option_strings if s.startswith("--"))
    return PREFIX + flag[2:].upper().replace("-", "_")


class CommandParser(argparse.ArgumentParser):
    """The parser of one command. After `read_environment()`, each option without a value on the command line
    takes its SC2DEPLOY_<OPTION> variable, converted and checked as the option's own value would be."""

    environment = False

    def read_environment(self) -> None:
        self.environment = True
        for action in self._options():
            if action.help != argparse.SUPPRESS:
                action.help = f"{action.help or ''} [env {variable(action)}]".lstrip()

    def _options(self) -> list[argparse.Action]:
        return [a for a in self._actions if any(s.startswith("--") for s in a.option_strings)
                and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not self.environment:
            return super().parse_known_args(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        for action in self._options():
            name = variable(action)
            text = os.environ.get(name, "")
            if text != "" and not hasattr(namespace, action.dest):
                setattr(namespace, action.dest, _Unparsed(name, text))
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._options():  # what the command line did not replace; a bad value there is moot
            value = getattr(namespace, action.dest, None)
            if isinstance(value, _Unparsed):
                setattr(namespace, action.dest, self._from_environment(action, value.name, value.text))
        return namespace, extras

    def _from_environment(self, action: argparse.Action, name: str, text: str):
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # a switch: store_true / store_false / store_const
            if text.strip().lower() not in TRUE + FALSE:
                raise BadVariable(self.prog, f"{name}={text!r} is not a switch value for {flag}; set it to 1 or 0 "
                                             f"(true/false, yes/no), or unset {name}")
            return action.const if text.strip().lower() in TRUE else action.default
        try:
            value = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            reason = str(e) if isinstance(e, argparse.ArgumentTypeError) else \
                f"not a valid {getattr(action.type, '__name__', 'value')}"
            raise BadVariable(self.prog, f"{name}={text!r} is not a valid {flag} ({reason}); fix or unset "
                                         f"{name}") from None
        if action.choices is not None and value not in action.choices:
            raise BadVariable(self.prog, f"{name}={text!r} is not a valid {flag}; choose one of "
                                         f"{', '.join(map(str, action.choices))}, or unset {name}")
        return value
