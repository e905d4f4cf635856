"""llama.cpp's /infill (the llama.vscode and llama.vim plugins' endpoint): its request -> a repository-level FIM
CompleteRequest, and the engine's events -> llama.cpp's response and stream objects.

The prompt is StarCoder2's own repository layout, the one gRPC builds from repo_name / file_path / context_files:
each `input_extra` chunk is a context file (`filename`, default "tmp" as in llama.cpp), the code before the cursor is
`input_prefix` + `prompt`, the code after it `input_suffix`. Two fields beyond llama.cpp's name the repository and the
file being completed (`repo_name`, `file_path`); without `file_path` the path line reads "filename", as llama.cpp
writes it. Sampling defaults
are llama.cpp's server defaults (temperature 0.8, top_k 40, top_p 0.95); fields llama.cpp accepts and this server
does not use (n_indent, t_max_prompt_ms, samplers, cache_prompt, id_slot, ...) are ignored, as llama.cpp ignores
unknown ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sc2deploy.serving import json_body as jb
from sc2deploy.serving.json_body import HttpError
from sc2deploy.serving.scheduler import Finished, Step
from sc2deploy.serving.v1 import completion_pb2 as pb

DEFAULT_FILE_PATH = "filename"  # llama.cpp's path line for the file being completed, which its protocol does not name
STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit"}


@dataclass
class InfillSpec:
    request: pb.CompleteRequest
    stream: bool
    return_tokens: bool
    response_fields: list[str]  # llama.cpp's filter of the final response; empty: everything


def parse_infill(data: dict) -> InfillSpec:
    extra = data.get("input_extra")
    if extra is not None and not isinstance(extra, list):
        raise HttpError(400, 'input_extra must be an array of {"filename": string, "text": string}',
                        param="input_extra")
    files = []
    for i, chunk in enumerate(extra or []):
        if not isinstance(chunk, dict):
            raise HttpError(400, f'input_extra[{i}] must be an object {{"filename": string, "text": string}}',
                            param="input_extra")
        files.append(pb.ContextFile(path=jb.string(chunk, "filename", "tmp", path=f"input_extra[{i}].filename"),
                                    content=jb.string(chunk, "text", path=f"input_extra[{i}].text")))
    prefix = jb.string(data, "input_prefix") + jb.string(data, "prompt", "")
    repo_name, file_path = jb.string(data, "repo_name", ""), jb.string(data, "file_path", "")
    request = pb.CompleteRequest(
        prompt=prefix, suffix=jb.string(data, "input_suffix"), repo_name=repo_name, context_files=files,
        file_path=file_path, temperature=jb.number(data, "temperature", 0.8, lo=0),
        top_p=jb.number(data, "top_p", 0.95, 0, 1), top_k=jb.integer(data, "top_k", 40, lo=0),
        stop=jb.strings(data, "stop"))
    if (files or repo_name) and not file_path:
        request.file_path = DEFAULT_FILE_PATH
    n_predict = jb.integer(data, "n_predict", -1, lo=-1)
    if n_predict == 0:
        raise HttpError(400, "n_predict must be -1 (the server's default) or at least 1", param="n_predict")
    if n_predict > 0:
        request.max_tokens = n_predict
    seed = jb.integer(data, "seed", -1, lo=-1, hi=2**63 - 1)
    if seed >= 0:
        request.seed = seed
    return InfillSpec(request, jb.boolean(data, "stream", False), jb.boolean(data, "return_tokens", False),
                      jb.strings(data, "response_fields"))


class InfillOutput:
    """One request's llama.cpp-shaped response, or its stream objects."""

    def __init__(self, spec: InfillSpec, model: str, prompt_tokens: int):
        self.spec, self.model, self.prompt_tokens = spec, model, prompt_tokens
        self.predicted = 0

    def chunk(self, step: Step) -> dict | None:
        self.predicted += len(step.token_ids)
        if not step.text and not self.spec.return_tokens:
            return None
        return {"index": 0, "content": step.text, "tokens": self._tokens(step.token_ids), "stop": False,
                "id_slot": -1, "tokens_predicted": self.predicted, "tokens_evaluated": self.prompt_tokens}

    def final(self, content: str, token_ids: list[int], finished: Finished, timings: dict) -> dict:
        body = {"index": 0, "content": content, "tokens": self._tokens(token_ids), "id_slot": -1, "stop": True,
                "model": self.model, "tokens_predicted": finished.completion_tokens,
                "tokens_evaluated": finished.prompt_tokens, "has_new_line": "\n" in content,
                "truncated": finished.trimmed is not None, "stop_type": STOP_TYPE[finished.reason],
                "stopping_word": finished.stop_sequence, "tokens_cached": 0, "timings": timings}
        if finished.trimmed is not None:
            body["trimmed"] = dataclasses.asdict(finished.trimmed)
        return body

    def response(self, steps: list[Step], finished: Finished, timings: dict) -> dict:
        body = self.final("".join(s.text for s in steps), [t for s in steps for t in s.token_ids], finished, timings)
        return select_fields(self.spec.response_fields, body) if self.spec.response_fields else body

    def _tokens(self, ids: list[int]) -> list[int]:
        return list(ids) if self.spec.return_tokens else []


def timings(prompt_tokens: int, completion_tokens: int, first_token_s: float, total_s: float) -> dict:
    """llama.cpp's timings object, from what the server measured: prompt time is the time to the first token
    (queueing included), and the tokens after the first share the rest."""
    prompt_s, predicted_s = max(first_token_s, 1e-9), max(total_s - first_token_s, 1e-9)
    later = max(completion_tokens - 1, 0)
    return {"cache_n": 0, "prompt_n": prompt_tokens, "prompt_ms": prompt_s * 1000,
            "prompt_per_token_ms": prompt_s * 1000 / max(prompt_tokens, 1), "prompt_per_second": prompt_tokens / prompt_s,
            "predicted_n": completion_tokens, "predicted_ms": predicted_s * 1000,
            "predicted_per_token_ms": predicted_s * 1000 / max(later, 1), "predicted_per_second": later / predicted_s}


def select_fields(paths: list[str], body: dict) -> dict:
    """llama.cpp's `response_fields`: only the named values, nested ones by "a/b" paths, keyed by their path."""
    picked = {}
    for path in paths:
        value: object = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked
