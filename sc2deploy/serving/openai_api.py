"""OpenAI's legacy completions API (POST /v1/completions): the request as OpenAI documents it -> a CompleteRequest,
and the engine's events -> OpenAI's response objects and stream chunks.

StarCoder2's control tokens spelled in a prompt without `suffix` (`<fim_prefix>`, `<fim_suffix>`, `<fim_middle>`,
`<file_sep>`, `<repo_name>`) are read as those tokens, as vLLM and llama.cpp read them: editor plugins such as
Continue lay out the FIM prompt themselves and send it as `prompt`. With `suffix`, the server lays it out and the
texts stay text.

Differences from OpenAI, each on purpose: `max_tokens` left unset takes the server's --default-max-tokens (OpenAI:
16); `top_k` is accepted as vLLM accepts it; a `suffix` that is present, even empty, makes the prompt
fill-in-the-middle; logprobs go up to the server's limit (OpenAI: 5). Fields OpenAI has but this server cannot honour
(n or best_of above 1, penalties, logit_bias, echo with logprobs or suffix) and fields OpenAI does not have are
refused with 400, as OpenAI refuses unknown fields.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from sc2deploy.serving import json_body as jb
from sc2deploy.serving.json_body import HttpError
from sc2deploy.serving.scheduler import Finished, Step
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tokenizer import Tokenizer

# OpenAI fields this server honours only at their no-op value.
NO_OP_VALUES = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
FIELDS = {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "logprobs",
          "echo", "user", "stream", "stream_options", *NO_OP_VALUES}
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class CompletionSpec:
    request: pb.CompleteRequest
    prompt_tokens: list[int] | None  # a prompt sent as token ids
    fim: bool
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    user: str


def parse_completion(data: dict, model_name: str, vocab_size: int) -> CompletionSpec:
    """An OpenAI completions request body -> what to run; HttpError for what OpenAI or this server refuses."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise HttpError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = jb.string(data, "model")
    if model != model_name:
        raise HttpError(404, f"The model `{model}` does not exist: this server serves `{model_name}` (GET /v1/models)",
                        param="model", code="model_not_found")
    for name, no_op in NO_OP_VALUES.items():
        if data.get(name) not in (None, no_op):
            raise HttpError(400, f"{name}={data[name]!r} is not supported by this server; leave it out or send "
                                 f"{no_op!r}", param=name)
    text, ids = _prompt(data.get("prompt"), vocab_size)
    fim = data.get("suffix") is not None
    stream = jb.boolean(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise HttpError(400, "stream_options must be {\"include_usage\": true|false}, and only with stream: true",
                        param="stream_options")
    include_usage = jb.boolean(options or {}, "include_usage", False)
    echo = jb.boolean(data, "echo", False)
    logprobs = jb.integer(data, "logprobs", None, lo=0)
    if echo and (fim or logprobs is not None):
        raise HttpError(400, "echo cannot be combined with suffix or logprobs on this server", param="echo")
    request = pb.CompleteRequest(
        prompt=text, suffix=jb.string(data, "suffix", ""), temperature=jb.number(data, "temperature", 1.0, 0, 2),
        top_k=jb.integer(data, "top_k", 0, lo=0), stop=jb.strings(data, "stop"),
        logprobs=0 if logprobs is None else max(logprobs, 1))
    max_tokens = jb.integer(data, "max_tokens", None, lo=1)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    top_p = jb.number(data, "top_p", None, 0, 1)
    if top_p is not None:
        request.top_p = top_p
    seed = jb.integer(data, "seed", None, lo=-(2**63), hi=2**63 - 1)
    if seed is not None:
        request.seed = seed
    return CompletionSpec(request, ids, fim, stream, include_usage, echo, logprobs, jb.string(data, "user", ""))


def _prompt(value, vocab_size: int) -> tuple[str, list[int] | None]:
    """OpenAI's prompt forms: a string, token ids, or a list holding one of either (several are refused)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return jb.string({"prompt": value}, "prompt"), None
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(0 <= t < vocab_size for t in value):
            raise HttpError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return "", value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise HttpError(400, f"prompt holds {len(value)} prompts; this server takes one per request (send them as "
                             "separate requests: they are batched together)", param="prompt")
    raise HttpError(400, "prompt must be a string or a non-empty list of token ids", param="prompt")


class CompletionOutput:
    """One request's response objects: the whole completion, or its stream chunks."""

    def __init__(self, spec: CompletionSpec, model: str, request_id: str, tokenizer: Tokenizer,
                 prompt_ids: list[int]):
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.id, self.created = f"cmpl-{request_id}", int(time.time())
        self.prefix = ""
        if spec.echo:
            self.prefix = spec.request.prompt if spec.prompt_tokens is None else tokenizer.decode(prompt_ids)
        self.offset = len(self.prefix)  # text_offset of the next token

    def response(self, steps: list[Step], finished: Finished) -> dict:
        text = self.prefix + "".join(s.text for s in steps)
        logprobs = self._logprobs([x for s in steps for x in s.logprobs])
        return self._object([self._choice(text, FINISH_REASON[finished.reason], logprobs)], self._usage(finished))

    def chunk(self, step: Step) -> dict | None:
        text, self.prefix = self.prefix + step.text, ""
        logprobs = self._logprobs(step.logprobs)
        if not text and not step.logprobs:
            return None
        return self._object([self._choice(text, None, logprobs)], None)

    def last_chunks(self, finished: Finished) -> list[dict]:
        chunks = [self._object([self._choice(self.prefix, FINISH_REASON[finished.reason], None)], None)]
        if self.spec.include_usage:
            chunks.append(self._object([], self._usage(finished)))
        return chunks

    def _object(self, choices: list[dict], usage_: dict | None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if usage_ is not None or self.spec.include_usage:
            body["usage"] = usage_
        return body

    def _usage(self, finished: Finished) -> dict:
        """OpenAI's usage, and what trimming dropped from an over-long prompt (`prompt_trimmed`), if anything."""
        body: dict = {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                      "total_tokens": finished.prompt_tokens + finished.completion_tokens}
        if finished.trimmed is not None:
            body["prompt_trimmed"] = dataclasses.asdict(finished.trimmed)
        return body

    @staticmethod
    def _choice(text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, entries) -> dict | None:
        """OpenAI's logprobs object for (token, logprob, top) entries, text offsets continuing across chunks."""
        if self.spec.logprobs is None:
            return None
        tokens, offsets = [], []
        for token, _, _ in entries:
            tokens.append(self.tokenizer.decode([token]))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        top = None
        if self.spec.logprobs:
            top = [{self.tokenizer.decode([t]): p for t, p in alternatives[:self.spec.logprobs]}
                   for _, _, alternatives in entries]
        return {"tokens": tokens, "token_logprobs": [p for _, p, _ in entries], "top_logprobs": top,
                "text_offset": offsets}


def models(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model_name, created)]}


def model_object(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "sc2deploy"}
