"""Turning a runtime's logits into a completion: sampling, stop tokens and strings, streamed text.

`Sequence` is the state of one generation (used by `generate` here and by the server's
scheduler); `generate`/`stream` drive one sequence alone in one slot of a runtime.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor

from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.sampling import Sampler, SamplingParams, top_logprobs
from sc2deploy.tokenizer import Tokenizer, find_stop, stop_holdback

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED = "length", "eos", "stop", "cancelled"


def check_fits(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise UserError("the prompt is empty; give some text or token ids")
    if prompt_len + max_new_tokens > context:
        raise UserError(f"prompt ({prompt_len} tokens) plus max new tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens")


@dataclass
class Sequence:
    """One generation: feeds on logits, decides the next token and the text that may be shown."""

    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    logprobs: int = 0
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""  # all text decoded so far (stop string cut off once found)
    emitted: int = 0  # characters of `text` already handed out

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.detok = self.tokenizer.stream_decoder()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: Tensor, token: int | None = None) -> str:
        """Choose the next token from `logits` (or take `token`, the caller's argmax of them for a greedy
        sequence); returns the newly showable text."""
        token = self.sampler(logits) if token is None else token
        if self.logprobs:
            self.token_logprobs.append(top_logprobs(logits, token, self.logprobs))
        if token in self.stop_ids:
            self.finish_reason = FINISH_EOS
            self.text += self.detok.flush()
            return self._release(final=True)
        self.output_ids.append(token)
        self.text += self.detok.add(token)
        if len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
            self.text += self.detok.flush()
        return self._release(final=self.done)

    def cancel(self) -> str:
        self.finish_reason = FINISH_CANCELLED
        return ""

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def _release(self, final: bool) -> str:
        if self.params.stop:
            # Text up to `emitted` never ends in a partial stop (it was held back), so a stop starts after it.
            cut, stop = find_stop(self.text[self.emitted:], self.params.stop)
            if stop is not None:
                self.text, self.finish_reason, final = self.text[:self.emitted] + cut, FINISH_STOP, True
        end = len(self.text)
        if self.params.stop and not final:
            end = max(end - stop_holdback(self.text[self.emitted:], self.params.stop), self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    prefill_ms: float
    decode_tokens_per_s: float
    logprobs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "finish_reason": self.finish_reason, "prefill_ms": round(self.prefill_ms, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.output_ids)}


def stream(runtime: Runtime, seq: Sequence, slot: int = 0, timings: dict | None = None) -> Iterator[str]:
    """Run `seq` to the end in `slot`, yielding text deltas as they become showable."""
    check_fits(len(seq.prompt_ids), seq.params.max_new_tokens, runtime.config.max_position_embeddings)
    start = time.perf_counter()
    logits = runtime.prefill(slot, seq.prompt_ids)
    prefilled = time.perf_counter()
    delta = seq.accept(logits)
    if delta:
        yield delta
    while not seq.done:
        delta = seq.accept(runtime.decode([slot], [seq.last_token])[0])
        if delta:
            yield delta
    end = time.perf_counter()
    if timings is not None:
        decoded = max(len(seq.output_ids) - 1, 0)
        timings["prefill_ms"] = (prefilled - start) * 1e3
        timings["decode_tokens_per_s"] = decoded / (end - prefilled) if decoded and end > prefilled else 0.0


def generate(runtime: Runtime, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             stop_ids: frozenset[int] | None = None, logprobs: int = 0) -> Completion:
    seq = Sequence(tokenizer, list(prompt_ids), params,
                   tokenizer.stop_token_ids if stop_ids is None else stop_ids, logprobs=logprobs)
    timings: dict = {}
    for _ in stream(runtime, seq, timings=timings):
        pass
    return Completion(seq.prompt_ids, seq.output_ids, seq.text, seq.finish_reason or FINISH_LENGTH,
                      timings["prefill_ms"], timings["decode_tokens_per_s"], seq.token_logprobs)
