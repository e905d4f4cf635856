"""CompleteRequest -> Job: the exact prompt ids, sampling parameters and stop tokens, or a UserError.

Every rule that makes a request INVALID_ARGUMENT lives here; the prompt is built with the same
tokenizer calls as `sc2deploy generate`, so a request and the equivalent command give the same ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from sc2deploy.errors import UserError
from sc2deploy.generation import check_fits
from sc2deploy.sampling import SamplingParams
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tokenizer import PromptTooLong, Tokenizer


@dataclass(frozen=True)
class Limits:
    context_length: int  # prompt + max_tokens must fit
    default_max_tokens: int = 128
    max_logprobs: int = 20
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    logprobs: int = 0


def build_job(request: pb.CompleteRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    """Validate `request` and build its prompt; raises UserError with a message for the client."""
    if not request.prompt and not request.suffix:
        raise UserError("prompt is empty; send the code before the cursor (and suffix for fill-in-the-middle)")
    if len(request.stop) > limits.max_stop:
        raise UserError(f"{len(request.stop)} stop strings; at most {limits.max_stop} are allowed")
    if any(len(s) > limits.max_stop_chars for s in request.stop):
        raise UserError(f"a stop string is longer than {limits.max_stop_chars} characters")
    if not 0 <= request.logprobs <= limits.max_logprobs:
        raise UserError(f"logprobs must be between 0 and {limits.max_logprobs}, got {request.logprobs}")
    asked = request.max_tokens if request.HasField("max_tokens") else 0
    if asked >= limits.context_length:
        raise UserError(f"max_tokens {asked} leaves no room for a prompt in the model's context of "
                        f"{limits.context_length} tokens; ask for fewer tokens")
    room = limits.context_length - max(asked, 1)
    try:  # stops tokenizing once the prompt cannot fit: a 4 MiB prompt is refused after about `room` tokens
        ids = prompt_ids(request, tokenizer, limit=room)
    except PromptTooLong as e:
        raise UserError(f"{e}, more than the model's context of {limits.context_length} tokens leaves beside "
                        f"max_tokens; shorten the prompt or ask for fewer tokens") from None
    # Unset max_tokens: the default, or what the context leaves after the prompt if that is less.
    max_tokens = (request.max_tokens if request.HasField("max_tokens")
                  else max(1, min(limits.default_max_tokens, limits.context_length - len(ids))))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=request.temperature,
                            top_p=request.top_p if request.HasField("top_p") else 1.0, top_k=request.top_k,
                            seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop))
    check_fits(len(ids), max_tokens, limits.context_length)
    stop_ids = tokenizer.fim_stop_token_ids if request.suffix else tokenizer.stop_token_ids
    return Job(ids, params, stop_ids, request.logprobs)


def prompt_ids(request: pb.CompleteRequest, tokenizer: Tokenizer, limit: int | None = None) -> list[int]:
    """The exact prompt: plain, fill-in-the-middle (suffix set), and/or repo-level (file_path set).

    PromptTooLong once it surely has more than `limit` tokens."""
    fim = bool(request.suffix)
    if request.repo_name or request.file_path or request.context_files:
        if not request.file_path:
            raise UserError("repo-level context (repo_name or context_files) needs file_path, the file being completed")
        files = [(f.path, f.content) for f in request.context_files] + [(request.file_path, request.prompt)]
        return tokenizer.repo_prompt_ids(request.repo_name or None, files, suffix=request.suffix if fim else None,
                                         limit=limit)
    if fim:
        return tokenizer.fim_prompt_ids(request.prompt, request.suffix, limit=limit)
    return tokenizer.encode(request.prompt, limit=limit)
