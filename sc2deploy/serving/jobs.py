"""CompleteRequest -> Job: the exact prompt ids, sampling parameters and stop tokens, or a UserError.

Every rule that makes a request INVALID_ARGUMENT lives here; the prompt is built with the same
tokenizer calls as `sc2deploy generate`, so a request and the equivalent command give the same ids
(unless an over-long FIM or repo-level prompt was trimmed, which `Job.trimmed` reports).
"""
from __future__ import annotations

from dataclasses import dataclass

from sc2deploy.errors import UserError
from sc2deploy.generation import check_fits
from sc2deploy.sampling import SamplingParams
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tokenizer import PromptTooLong, Tokenizer, Trimmed, trimmable


@dataclass(frozen=True)
class Limits:
    context_length: int  # prompt + max_tokens must fit
    default_max_tokens: int = 128
    max_logprobs: int = 20
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    trim: bool = True  # over-long FIM and repo-level prompts are trimmed (Tokenizer.fit_prompt_ids), not refused


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    logprobs: int = 0
    trimmed: Trimmed | None = None  # what trimming dropped from the prompt; None when nothing was


def build_job(request: pb.CompleteRequest, tokenizer: Tokenizer, limits: Limits,
              prompt_tokens: list[int] | None = None, fim: bool | None = None, parse_special: bool = False) -> Job:
    """Validate `request` and build its prompt; raises UserError with a message for the client.

    `prompt_tokens` (ids in the vocabulary) stand for the prompt text: sent as is, or as the FIM prefix. `fim`
    forces (or forbids) fill-in-the-middle; by default a non-empty suffix asks for it. `parse_special` reads
    control tokens spelled in a plain prompt's text (`<fim_prefix>`, `<file_sep>`, ...) as those tokens, for
    clients that lay out the FIM or repo prompt themselves; a FIM completion's stop tokens then apply."""
    fim = bool(request.suffix) if fim is None else fim
    if not request.prompt and not fim and prompt_tokens is None:
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
    if prompt_tokens is None and parse_special and not fim:
        room = limits.context_length - completion_room(request, limits, False)
        try:
            prompt_tokens = tokenizer.encode(request.prompt, parse_special=True, limit=room)
        except PromptTooLong as e:
            raise _too_long(e, limits) from None
    if prompt_tokens is not None:
        return _job_from_ids(request, tokenizer, limits, prompt_tokens, fim)
    suffix = request.suffix if fim else None
    trim = limits.trim and trimmable(suffix, request.repo_name or None, request.context_files)
    room = limits.context_length - completion_room(request, limits, trim)
    try:  # tokenizes about `room` tokens of a prompt that cannot fit: a 4 MiB one is refused or trimmed at once
        ids, trimmed = prompt_ids(request, tokenizer, room, suffix, trim=trim)
    except PromptTooLong as e:
        raise _too_long(e, limits) from None
    return _finish_job(request, tokenizer, limits, ids, fim, trimmed)


def _too_long(e: PromptTooLong, limits: Limits) -> UserError:
    return UserError(f"{e}, more than the model's context of {limits.context_length} tokens leaves beside "
                     f"max_tokens; shorten the prompt or ask for fewer tokens")


def _job_from_ids(request: pb.CompleteRequest, tokenizer: Tokenizer, limits: Limits, tokens: list[int],
                  fim: bool) -> Job:
    """A Job whose prompt (or FIM prefix) is given as token ids; never trimmed."""
    if not tokens:
        raise UserError("the prompt holds no token ids; send at least one")
    if min(tokens) < 0 or max(tokens) >= tokenizer.vocab_size:
        raise UserError(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
    if request.repo_name or request.file_path or request.context_files:
        raise UserError("a prompt of token ids cannot take repo-level context; send the prompt as text")
    ids = list(tokens)
    if fim:
        ids = ([tokenizer.fim_prefix_id] + ids + [tokenizer.fim_suffix_id] + tokenizer.encode(request.suffix)
               + [tokenizer.fim_middle_id])
    room = limits.context_length - completion_room(request, limits, False)
    if len(ids) > room:
        raise UserError(f"the prompt holds {len(ids)} tokens, more than the model's context of "
                        f"{limits.context_length} tokens leaves beside max_tokens; shorten the prompt or ask for "
                        f"fewer tokens")
    return _finish_job(request, tokenizer, limits, ids, fim or tokenizer.fim_middle_id in tokens, None)


def _finish_job(request: pb.CompleteRequest, tokenizer: Tokenizer, limits: Limits, ids: list[int], fim: bool,
                trimmed: Trimmed | None) -> Job:
    """The Job of a built prompt: sampling parameters and stop tokens."""
    # Unset max_tokens: the default, or what the context leaves after the prompt if that is less.
    max_tokens = (request.max_tokens if request.HasField("max_tokens")
                  else max(1, min(limits.default_max_tokens, limits.context_length - len(ids))))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=request.temperature,
                            top_p=request.top_p if request.HasField("top_p") else 1.0, top_k=request.top_k,
                            seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop))
    check_fits(len(ids), max_tokens, limits.context_length)
    stop_ids = tokenizer.fim_stop_token_ids if fim else tokenizer.stop_token_ids
    return Job(ids, params, stop_ids, request.logprobs, trimmed)


def completion_room(request: pb.CompleteRequest, limits: Limits, trim: bool) -> int:
    """Tokens the prompt must leave for the completion: max_tokens (at least 1) if set. Unset, a prompt that may
    be trimmed is trimmed to leave the default max_tokens (at most half the context); others must leave one."""
    if request.HasField("max_tokens"):
        return max(request.max_tokens, 1)
    return max(1, min(limits.default_max_tokens, limits.context_length // 2)) if trim else 1


def prompt_ids(request: pb.CompleteRequest, tokenizer: Tokenizer, budget: int, suffix: str | None, *,
               trim: bool = False) -> tuple[list[int], Trimmed | None]:
    """The exact prompt: plain, fill-in-the-middle (suffix set), and/or repo-level (file_path set), and what
    was dropped to fit it in `budget` tokens if `trim` (see Tokenizer.fit_prompt_ids).

    PromptTooLong once it surely has more than `budget` tokens (and cannot be trimmed)."""
    if (request.repo_name or request.context_files) and not request.file_path:
        raise UserError("repo-level context (repo_name or context_files) needs file_path, the file being completed")
    return tokenizer.fit_prompt_ids(request.prompt, suffix, budget=budget, trim=trim,
                                    repo_name=request.repo_name or None, path=request.file_path or None,
                                    context_files=[(f.path, f.content) for f in request.context_files])
