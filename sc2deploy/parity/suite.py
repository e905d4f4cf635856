"""The parity suite: cases of prompts (the standard ones sized from the config, or a user's JSONL file)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sc2deploy.config import Config
from sc2deploy.errors import UserError
from sc2deploy.tokenizer import Tokenizer

DECODE_STEPS = 64  # greedy tokens of the decode case
FOLLOW_UP_STEPS = 8  # greedy tokens after the prompt of every other case
BATCH_OFFSETS, DECODE_OFFSET = (0, 3001, 7919), 1000  # where prompts start in the code text (PromptText)


@dataclass
class Case:
    """Prompts prefilled together (one per slot), then `decode_steps` greedy tokens for each."""

    name: str
    description: str
    prompts: list[list[int]]
    decode_steps: int = FOLLOW_UP_STEPS

    def feed(self) -> OrderedDict:
        """The feed dict of a reference run: decode ids of -1 mean "your own argmax"."""
        lengths = [len(p) for p in self.prompts]
        ids = np.zeros((len(self.prompts), max(lengths)), dtype=np.int64)
        for row, p in enumerate(self.prompts):
            ids[row, :len(p)] = p
        return OrderedDict(input_ids=ids, lengths=np.array(lengths, dtype=np.int64),
                           decode_ids=np.full((len(self.prompts), self.decode_steps), -1, dtype=np.int64))


SHORT_CODE = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
FIM_PREFIX = "def mean(values):\n    total = 0\n    for v in values:\n"
FIM_SUFFIX = "    return total / len(values)\n\n\nprint(mean([1, 2, 3]))\n"


PROMPT_SOURCES = ("model.py", "attention.py", "config.py", "checkpoint.py", "tokenizer.py")


class PromptText:
    """Token ids of real code, cut to any length: the reference model's own sources (PROMPT_SOURCES), repeated as
    needed. Ids beyond a small test vocabulary are folded into it (id % vocab_size)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self.fold(self.tokenizer.encode(text))

    def fold(self, ids: list[int]) -> list[int]:
        return [i % self.vocab_size for i in ids]

    def take(self, n: int, offset: int = 0) -> list[int]:
        if len(self._ids) < offset + n:
            if not self._ids:
                package = Path(__file__).resolve().parents[1]
                self._ids = self.encode("".join((package / f).read_text(encoding="utf-8") for f in PROMPT_SOURCES))
            self._ids = self._ids * math.ceil((offset + n) / len(self._ids))
        return self._ids[offset:offset + n]


def build_suite(config: Config, tokenizer: Tokenizer, decode_steps: int = DECODE_STEPS,
                extra: Sequence[Case] = ()) -> list[Case]:
    """The standard cases, sized from the config's window W and context."""
    window, context = config.window, config.max_position_embeddings
    text = PromptText(tokenizer, config.vocab_size)
    room = max(1, context - FOLLOW_UP_STEPS)

    def fit(n: int) -> int:
        return max(1, min(n, room))

    long_len = fit(2 * window + 5)
    batch_lens = [fit(5), fit(window + 3), fit(window // 2 + 1)]
    decode_steps = min(decode_steps, context - 1)
    decode_len = max(1, min(window - 8, context - decode_steps))
    fim = text.fold(tokenizer.fim_prompt_ids(FIM_PREFIX, FIM_SUFFIX))
    cases = [
        Case("short", "a short code prompt", [text.encode(SHORT_CODE)]),
        Case("long", f"a {long_len}-token prompt, window {window}", [text.take(long_len)]),
        Case("fim", "a fill-in-the-middle prompt", [fim]),
        Case("batch", f"prompts of {', '.join(map(str, batch_lens))} tokens in one batch",
             [text.take(n, off) for n, off in zip(batch_lens, BATCH_OFFSETS)]),
        Case("decode", f"{decode_steps} greedy tokens after {decode_len}, past window {window}",
             [text.take(decode_len, DECODE_OFFSET)], decode_steps),
    ]
    for case in extra:
        if max(len(p) for p in case.prompts) >= context:
            raise UserError(f"prompt {case.name!r} ({case.description}) leaves no room in the model's context of "
                            f"{context} tokens; shorten it")
    for case in [*cases, *extra]:  # tiny test contexts: keep the end of a prompt (a FIM prompt's <fim_middle>)
        case.prompts = [p[-(context - 1):] for p in case.prompts]
        case.decode_steps = min(case.decode_steps, context - max(len(p) for p in case.prompts))
    return [*cases, *extra]


def load_prompts(path: str | Path, tokenizer: Tokenizer, vocab_size: int) -> list[Case]:
    """User cases from a JSONL file: each line {"prompt": TEXT} or {"fim_prefix": ..., "fim_suffix": ...},
    optionally with "name" and "max_new_tokens" (default 8); a line may also be a bare JSON string."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompts file {path} ({e}); give a UTF-8 JSONL file") from None
    text, cases = PromptText(tokenizer, vocab_size), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg}); write one object per line, "
                            '{"prompt": "..."} or {"fim_prefix": "...", "fim_suffix": "..."}') from None
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object or a string, got {type(item).__name__}")
        if "prompt" in item and isinstance(item["prompt"], str):
            ids, kind = text.encode(item["prompt"]), "prompt"
        elif isinstance(item.get("fim_prefix"), str) and isinstance(item.get("fim_suffix"), str):
            ids, kind = text.fold(tokenizer.fim_prompt_ids(item["fim_prefix"], item["fim_suffix"])), "FIM prompt"
        else:
            raise UserError(f'{where} needs a "prompt" string, or "fim_prefix" and "fim_suffix" strings')
        if not ids:
            raise UserError(f"{where}: the prompt is empty; give some text")
        steps = item.get("max_new_tokens", FOLLOW_UP_STEPS)
        if not isinstance(steps, int) or steps < 0:
            raise UserError(f'{where}: "max_new_tokens" must be an integer >= 0, got {steps!r}')
        name = str(item.get("name") or f"prompt-{number}")
        cases.append(Case(name, f"{kind} from {path.name}:{number}, {len(ids)} tokens", [ids], steps))
    if not cases:
        raise UserError(f"{path} holds no prompts; write one JSON object per line")
    return cases

