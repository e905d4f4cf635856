"""The engine parity checker: a runtime under test against the eager reference model, case by case.

The truth is the eager model in float32, whatever the dtype of the runtime under test: the numbers
reported are the error a user of that runtime sees. Each case of the suite is a feed dict (prompts,
right-padded, and the tokens to decode) run through two Polygraphy runners wrapping `Runtime`s.

Greedy decoding is teacher-forced. The reference decodes greedily on its own; the runtime under
test is then fed the reference's tokens. Up to the first step where the runtime's own argmax differs,
this is exactly free-running greedy decoding (both have seen the same tokens), so "first divergence"
means what it says; after it, the two still see the same history and every later logit stays
comparable instead of being lost to a harmless near-tie.

Metrics, per case over every real position (prompt and decode) of every row, e = eager, r = runtime:
  max abs    max |r - e|
  max rel    max over positions of max|r - e| / max|e|: the error relative to that position's logit
             range (elementwise |r - e| / |e| is unbounded where a logit crosses zero)
  top-1      fraction of positions where argmax r == argmax e
  KL         KL(softmax e || softmax r) in float64, mean and max over positions
  diverges   first decode step (0 = the prediction after the prompt) where argmax r != e's token
  near-tie   whether e's top-2 margin at that step is within twice the logit tolerance, i.e. noise
A case passes when every logit is finite, every position has max|r - e| <= atol + rtol * max|e|, and
KL max <= kl. A top-1 flip that is not a near-tie always fails: it needs a logit out of tolerance.

Polygraphy: `RuntimeRunner` is a `polygraphy.backend.base.BaseRunner` (PytRunner was the template), so
our runtimes run under `Comparator.run` (activation, timing, RunResults) and fit any Polygraphy workflow.
Two parts of the comparator do not fit and are not used: one `Comparator.run` over both runners, since the
runtime's feed (the greedy tokens) is the reference's output, so each case runs the reference, then the
runtime; and `CompareFunc.simple`, whose relative error is elementwise (|r - e| / |e|, unbounded where a
logit crosses zero, while logit errors scale with the position's logit range) and which has no KL, top-1
or greedy divergence. Polygraphy is imported only when a check runs.
"""
from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

from sc2deploy.config import Config
from sc2deploy.contract import MANIFEST, Manifest, read_manifest
from sc2deploy.errors import UserError
from sc2deploy.runtime.base import Runtime
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.tokenizer import Tokenizer

DECODE_STEPS = 64  # greedy tokens of the decode case
FOLLOW_UP_STEPS = 8  # greedy tokens after the prompt of every other case
BATCH_OFFSETS, DECODE_OFFSET = (0, 3001, 7919), 1000  # where prompts start in the code text (PromptText)
CHUNK = 256  # positions compared at a time (a real vocabulary in float64 is 390 KB per position)
PREFILL_CHUNK = 512  # prompt tokens the eager reference prefills at a time (ChunkedReference)


# ---------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerances:
    """A position passes when max|r - e| <= atol + rtol * max|e|; a case when also KL max <= kl."""

    atol: float
    rtol: float
    kl: float

    def allowed(self, scale):
        return self.atol + self.rtol * scale


# Runtime dtype -> tolerances against the float32 eager model. fp32 sides differ only in the order of
# summation (~1e-6 relative); on the tiny preset a weight moved by 1.0 shifts logits by ~7e-4 and a window
# off by one by ~2e-2, so atol 1e-4 fails both. fp16/bf16 are dominated by rounding the weights and
# activations (unit roundoff 4.9e-4 / 3.9e-3): random-weight models show max|r - e| / max|e| of 1e-3-2e-3
# (fp16) and 8e-3-1.5e-2 (bf16); the bounds leave 5-10x headroom. Low-precision runs hide small bugs in
# their noise: check structure with an fp32 export of the same checkpoint.
DEFAULT_TOLERANCES = {
    "fp32": Tolerances(atol=1e-4, rtol=1e-5, kl=1e-6),
    "fp16": Tolerances(atol=1e-2, rtol=1e-2, kl=5e-3),
    "bf16": Tolerances(atol=5e-2, rtol=5e-2, kl=5e-2),
}


def tolerances_for(dtype: str, atol: float | None = None, rtol: float | None = None,
                   kl: float | None = None) -> Tolerances:
    if dtype not in DEFAULT_TOLERANCES:
        raise UserError(f"no parity tolerances for dtype {dtype!r}; expected one of {', '.join(DEFAULT_TOLERANCES)}")
    base = DEFAULT_TOLERANCES[dtype]
    values = {"atol": base.atol if atol is None else atol, "rtol": base.rtol if rtol is None else rtol,
              "kl": base.kl if kl is None else kl}
    for name, value in values.items():
        if not value >= 0:
            raise UserError(f"--{name} must be a number >= 0, got {value}")
    return Tolerances(**values)


# ---------------------------------------------------------------- the suite
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
                package = Path(__file__).resolve().parent
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


# ---------------------------------------------------------------- the reference
class ChunkedReference(EagerRuntime):
    """The eager reference model (float32), prefilling prompts `chunk` tokens at a time through its KV cache.

    A one-shot prefill of an S-token prompt holds every layer's (S, hidden) and (S, intermediate) activations
    and (S, vocab) logits at once: 8,205 positions of the bench preset reached a 10 GiB peak. In chunks, a prefill
    holds one chunk's activations and logits besides the (S, vocab) result. It is exact, not an approximation:
    the cache keeps the last W positions (the ring of attention.py) and a chunk's queries see exactly the keys
    of their window, cached or new, as in one pass (the contract's "chunk of a longer prompt" rows). Batches of
    prompts longer than a chunk are prefilled row by row, each in chunks.
    """

    def __init__(self, source, max_batch: int = 1, chunk: int = PREFILL_CHUNK, device: torch.device | str = "cpu"):
        super().__init__(source, dtype="fp32", max_batch=max_batch, device=device)
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = chunk

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        self._check_prefill(slot, token_ids)
        ids, n = list(token_ids), len(token_ids)
        rows = slice(slot, slot + 1)
        out = torch.empty((n, self.config.vocab_size), dtype=torch.float32) if all_logits else None
        last = None
        for start in range(0, n, self.chunk):
            piece = self._tensor([ids[start:start + self.chunk]])
            end = start + piece.shape[1]
            # mask width = past + new: the first chunk is a first prompt, the others continue the row
            mask = torch.ones((1, end), dtype=torch.int64, device=self.device)
            logits = self._run(piece, mask, rows, fresh=start == 0)[0]
            if out is not None:
                out[start:end] = logits.cpu()
            last = logits[-1]
            del logits
        self._lengths[slot] = n
        if out is not None:
            return out
        assert last is not None  # _check_prefill refuses empty prompts
        return last

    @torch.inference_mode()
    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if max(len(p) for p in prompts) <= self.chunk:
            return super().prefill_batch(prompts)
        for slot, prompt in enumerate(prompts):
            self._check_prefill(slot, prompt)
        return [self.prefill(slot, prompt, all_logits=True) for slot, prompt in enumerate(prompts)]


# ---------------------------------------------------------------- running
@cache
def _runner_class():
    """RuntimeRunner, defined on first use so that Polygraphy is imported only by parity checks."""
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
    except ImportError:
        raise UserError("parity checks need Polygraphy: pip install 'sc2deploy[onnx]' (or polygraphy)") from None

    class RuntimeRunner(BaseRunner):
        """A Polygraphy runner over any `Runtime`.

        Feed dict: input_ids (B, S) int64 right-padded, lengths (B,), decode_ids (B, T) (-1: take your own
        argmax). Outputs: "logits.b" (len_b, V) float32, row b's prompt logits as the runtime returned them
        (not copied: a long prompt's logits are the largest arrays of a check), "decode_logits" (B, T, V)
        and "tokens" (B, T), the decode tokens fed. `row_logits` turns them into one list per row.
        """

        def __init__(self, runtime: Runtime, name: str):
            super().__init__(name=name)
            self.runtime = runtime

        def get_input_metadata_impl(self):
            return (TensorMetadata().add("input_ids", np.int64, (None, None)).add("lengths", np.int64, (None,))
                    .add("decode_ids", np.int64, (None, None)))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            prefilled, decoded, tokens = run_feed(self.runtime, feed_dict)
            self.inference_time = time.perf_counter() - start
            outputs = OrderedDict((f"logits.{row}", logits) for row, logits in enumerate(prefilled))
            outputs.update(decode_logits=decoded, tokens=tokens)
            return outputs

    return RuntimeRunner


def runtime_runner(runtime: Runtime, name: str):
    return _runner_class()(runtime, name)


def run_feed(runtime: Runtime, feed: dict) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Prefill the prompts into slots 0..B-1, then decode: (prompt logits per row, decode logits, tokens); see
    RuntimeRunner. The prompt logits are the runtime's own arrays (a float32 CPU tensor is not copied)."""
    lengths = [int(n) for n in feed["lengths"]]
    prompts = [feed["input_ids"][row, :n].tolist() for row, n in enumerate(lengths)]
    forced = feed["decode_ids"]
    steps = forced.shape[1]
    if len(prompts) == 1:
        prefilled = [runtime.prefill(0, prompts[0], all_logits=True)]
    else:
        prefilled = list(runtime.prefill_batch(prompts))
    prompt_logits = [np.asarray(logits.float().cpu().numpy(), dtype=np.float32) for logits in prefilled]
    del prefilled
    vocab = prompt_logits[0].shape[-1]
    decoded = np.zeros((len(prompts), steps, vocab), dtype=np.float32)
    tokens = np.zeros((len(prompts), steps), dtype=np.int64)
    last = [logits[-1] for logits in prompt_logits]
    slots = list(range(len(prompts)))
    for t in range(steps):
        tokens[:, t] = [int(forced[row, t]) if forced[row, t] >= 0 else int(np.argmax(last[row])) for row in slots]
        out = runtime.decode(slots, tokens[:, t].tolist()).float().cpu().numpy()
        decoded[:, t] = out
        last = list(decoded[:, t])
    return prompt_logits, decoded, tokens


RowLogits = list  # one list per row of (n_i, V) float32 arrays whose concatenation is the row's logits


def row_logits(outputs) -> RowLogits:
    """A RuntimeRunner's outputs as one list per row: [prompt logits, decode logits]."""
    decoded = outputs["decode_logits"]
    return [[outputs[f"logits.{row}"], decoded[row]] for row in range(decoded.shape[0])]


def _run(runner, feed: dict, kept=None):
    """Run one case's feed through `runner` (Polygraphy activates it for the run and deactivates it after):
    (row logits, tokens, seconds, whether every output is finite: Comparator.validate). With `kept` (a
    RunResults), the iteration is added to it under the runner's name."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run([runner], data_loader=[feed])
        finite = bool(Comparator.validate(results, check_inf=True, check_nan=True))
    iteration = results[0][1][0]
    if kept is not None:
        kept.setdefault(runner.name, []).append(iteration)
    return row_logits(iteration), iteration["tokens"], iteration.runtime, finite


# ---------------------------------------------------------------- comparing
@dataclass
class CaseResult:
    name: str
    description: str
    passed: bool
    positions: int = 0
    decode_steps: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    top1: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    first_divergence: int | None = None  # decode step; None when the greedy tokens never differ
    near_tie: bool | None = None
    margin: float | None = None  # eager's top-2 margin at the first divergence
    worst: str | None = None  # where max abs occurs
    failures: list[str] = field(default_factory=list)
    reference_s: float | None = None
    runtime_s: float | None = None

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _positions(parts: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Positions [start, stop) of a row held as consecutive (n_i, V) parts (a copy only across a boundary)."""
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
        if lo < hi:
            pieces.append(part[lo:hi])
        offset += part.shape[0]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _position_stats(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-position error, logit range, KL, argmaxes, reference top-2 margin and finiteness of one row's
    logits, each side given as consecutive (n_i, V) parts."""
    out: dict[str, list] = {k: [] for k in ("err", "sum_err", "scale", "kl", "ref_top", "test_top", "margin",
                                            "finite")}
    for start in range(0, sum(p.shape[0] for p in ref), CHUNK):
        e = torch.from_numpy(_positions(ref, start, start + CHUNK)).double()
        r = torch.from_numpy(_positions(test, start, start + CHUNK)).double()
        out["finite"].append(r.isfinite().all(-1))
        diff = (r - e).abs()
        out["err"].append(diff.amax(-1))
        out["sum_err"].append(diff.sum(-1))
        out["scale"].append(e.abs().amax(-1))
        log_p, log_q = e.log_softmax(-1), r.log_softmax(-1)
        out["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1))
        top2 = e.topk(min(2, e.shape[-1]), dim=-1).values
        out["margin"].append(top2[:, 0] - top2[:, -1] if top2.shape[-1] > 1 else torch.full_like(top2[:, 0], math.inf))
        out["ref_top"].append(e.argmax(-1))
        out["test_top"].append(r.argmax(-1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _describe_position(case: Case, row: int, pos: int) -> str:
    n = len(case.prompts[row])
    where = f"position {pos}" if pos < n else f"decode step {pos - n + 1}"
    if pos == n - 1 and case.decode_steps:
        where = f"position {pos} (decode step 0)"
    return where if len(case.prompts) == 1 else f"row {row} {where}"


def _as_rows(logits: np.ndarray | RowLogits, case: Case) -> RowLogits:
    """Logits (B, S' + T, V), rows right-padded, or already one list of parts per row: one list per row."""
    if isinstance(logits, np.ndarray):
        return [[logits[row, :len(p) + case.decode_steps]] for row, p in enumerate(case.prompts)]
    return logits


def compare_case(case: Case, ref: np.ndarray | RowLogits, test: np.ndarray | RowLogits,
                 tol: Tolerances) -> CaseResult:
    """Metrics and verdict of one case from the two runners' logits: (B, S' + T, V) arrays, or per row a list
    of consecutive (n_i, V) parts (what the runners return, see `row_logits`)."""
    result = CaseResult(case.name, case.description, passed=False, decode_steps=case.decode_steps)
    ref_rows, test_rows = _as_rows(ref, case), _as_rows(test, case)

    def shapes(rows):
        return [(sum(p.shape[0] for p in parts), parts[0].shape[-1]) for parts in rows]

    expected = [(len(p) + case.decode_steps, shapes(ref_rows)[0][1]) for p in case.prompts]
    if isinstance(ref, np.ndarray) and isinstance(test, np.ndarray) and test.shape != ref.shape:
        result.failures.append(f"the runtime returned logits of shape {test.shape}, the reference {ref.shape}")
        return result
    if shapes(test_rows) != shapes(ref_rows) or shapes(ref_rows) != expected:
        result.failures.append(f"the runtime returned logits of shape {shapes(test_rows)} per row, the reference "
                               f"{shapes(ref_rows)}")
        return result
    index, stats = [], []
    for row, prompt in enumerate(case.prompts):
        n = len(prompt) + case.decode_steps
        stats.append(_position_stats(ref_rows[row], test_rows[row]))
        index += [(row, pos) for pos in range(n)]
    s = {k: np.concatenate([st[k] for st in stats]) for k in stats[0]}
    vocab = expected[0][1]
    result.positions = len(index)
    result.max_abs = float(s["err"].max()) if np.isfinite(s["err"]).all() else math.nan
    result.mean_abs = float(s["sum_err"].sum() / (len(index) * vocab))
    with np.errstate(divide="ignore", invalid="ignore"):
        result.max_rel = float(np.max(s["err"] / s["scale"]))
    result.top1 = float(np.mean(s["ref_top"] == s["test_top"]))
    result.kl_mean, result.kl_max = float(s["kl"].mean()), float(s["kl"].max())
    worst = int(np.nanargmax(s["err"])) if np.isfinite(s["err"]).any() else 0
    result.worst = _describe_position(case, *index[worst])

    allowed = tol.allowed(s["scale"])
    bad = ~(s["err"] <= allowed)  # NaN counts as bad
    finite = bool(s["finite"].all())
    if not finite:
        first = int(np.argmax(~s["finite"]))
        result.failures.append(f"non-finite logits from the runtime (first at {_describe_position(case, *index[first])})")
    elif bad.any():
        first = int(np.argmax(bad))
        result.failures.append(
            f"logits off by up to {result.max_abs:.2e} at {result.worst}; {int(bad.sum())} of {len(index)} positions "
            f"exceed atol + rtol * max|e| (first: {_describe_position(case, *index[first])}, "
            f"off by {s['err'][first]:.2e} > {allowed[first]:.2e})")
    if not result.kl_max <= tol.kl and finite:
        at = _describe_position(case, *index[int(np.nanargmax(s["kl"]))])
        result.failures.append(f"KL up to {result.kl_max:.2e} at {at} > {tol.kl:.0e}")

    # Greedy divergence: decode step k of row b is position len_b - 1 + k.
    for row, prompt in enumerate(case.prompts):
        offset = sum(len(p) + case.decode_steps for p in case.prompts[:row]) + len(prompt) - 1
        steps = range(case.decode_steps + 1) if case.decode_steps else range(0)
        for k in steps:
            i = offset + k
            if s["ref_top"][i] != s["test_top"][i]:
                if result.first_divergence is None or k < result.first_divergence:
                    result.first_divergence, result.margin = k, float(s["margin"][i])
                    result.near_tie = bool(s["margin"][i] <= 2 * allowed[i])
                break
    flips = (s["ref_top"] != s["test_top"]) & ~(s["margin"] <= 2 * allowed)
    if flips.any():
        result.failures.append(f"top-1 differs at {int(flips.sum())} position(s) that are not near-ties "
                               f"(first: {_describe_position(case, *index[int(np.argmax(flips))])})")
    result.passed = not result.failures
    return result


# ---------------------------------------------------------------- the whole check
@dataclass
class Report:
    backend: str
    dtype: str
    tolerances: Tolerances
    cases: list[CaseResult]
    reference: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {"passed": self.passed, "backend": self.backend, "dtype": self.dtype,
                "reference": self.reference, "tolerances": asdict(self.tolerances),
                "cases": [c.to_dict() for c in self.cases], "notes": self.notes}


def run_suite(reference: Runtime, runtime: Runtime, cases: Sequence[Case], tolerances: Tolerances,
              progress: Callable[[str], None] | None = None, save_results: str | Path | None = None) -> Report:
    """Run every case through the reference and the runtime under test; a runtime error, or NaN or inf in its
    outputs, fails its case. `save_results`: write both runners' outputs there as Polygraphy RunResults."""
    need = max(len(c.prompts) for c in cases)
    for rt in (reference, runtime):
        if rt.max_batch < need:
            raise UserError(f"the {rt.name} runtime has {rt.max_batch} slots; the suite needs {need}")
    ref_runner = runtime_runner(reference, f"{reference.name}-{reference.dtype}")
    test_runner = runtime_runner(runtime, f"{runtime.name}-{runtime.dtype}")
    kept: dict[str, list] | None = {} if save_results else None  # runner name -> one iteration per case
    results = []
    for number, case in enumerate(cases, 1):
        where = f"parity: case {number}/{len(cases)} {case.name} ({case.description})"
        if progress:
            progress(f"{where}: the eager reference ...")
        ref_logits, tokens, ref_s, ref_finite = _run(ref_runner, case.feed(), kept)
        forced = case.feed()
        forced["decode_ids"] = tokens
        if progress:
            progress(f"{where}: the {runtime.name} runtime ...")
        try:
            test_logits, _, test_s, test_finite = _run(test_runner, forced, kept)
        except Exception as e:  # the runtime under test failed on a valid input: that is a parity failure
            del ref_logits
            results.append(CaseResult(case.name, case.description, passed=False, decode_steps=case.decode_steps,
                                      failures=[f"the {runtime.name} runtime raised {type(e).__name__}: {e}"]))
            continue
        result = compare_case(case, ref_logits, test_logits, tolerances)
        del ref_logits, test_logits  # (positions, vocab) float32 each: not kept past their case
        for finite, who in ((ref_finite, "the eager reference"), (test_finite, f"the {runtime.name} runtime")):
            if not finite:
                result.passed = False
                result.failures.insert(0, f"{who} produced NaN or inf logits")
        result.reference_s, result.runtime_s = round(ref_s, 4), round(test_s, 4)
        results.append(result)
    if kept is not None:
        from polygraphy.comparator import RunResults

        RunResults(list(kept.items())).save(str(save_results))
    return Report(runtime.name, runtime.dtype, tolerances, results, reference=f"{reference.name} {reference.dtype}")


# ---------------------------------------------------------------- the terminal table
def format_table(report: Report) -> str:
    t = report.tolerances
    lines = [f"parity: {report.backend} {report.dtype} against {report.reference} "
             f"(atol {t.atol:.0e}, rtol {t.rtol:.0e}, kl {t.kl:.0e})"]
    header = f"{'case':<12}{'pos':>6}{'max abs':>10}{'max rel':>10}{'top-1':>8}{'KL mean':>10}{'KL max':>10}" \
             f"{'diverges':>10}{'near-tie':>10}  result"
    lines.append(header)

    def num(x):
        return "-" if x is None else ("nan" if not math.isfinite(x) else f"{x:.1e}")

    for c in report.cases:
        top1 = "-" if c.top1 is None else f"{100 * c.top1:.1f}%"
        diverges = "-" if c.first_divergence is None else str(c.first_divergence)
        tie = "-" if c.near_tie is None else ("yes" if c.near_tie else "no")
        lines.append(f"{c.name[:11]:<12}{c.positions:>6}{num(c.max_abs):>10}{num(c.max_rel):>10}{top1:>8}"
                     f"{num(c.kl_mean):>10}{num(c.kl_max):>10}{diverges:>10}{tie:>10}  {'PASS' if c.passed else 'FAIL'}")
    for c in report.cases:
        for failure in c.failures:
            lines.append(f"FAIL {c.name}: {failure}")
    lines += [f"note: {n}" for n in report.notes]
    failed = sum(not c.passed for c in report.cases)
    lines.append("PASSED" if report.passed else f"FAILED: {failed} of {len(report.cases)} cases")
    return "\n".join(lines)


# ---------------------------------------------------------------- opening what to compare
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "use_bias", "tie_word_embeddings", "head_dim")
BEHAVIOUR_FIELDS = ("sliding_window", "rope_theta", "norm_epsilon", "max_position_embeddings", "hidden_act")


def manifest_source(manifest: Manifest, folder: Path):
    """The weights an artifact was exported from, as its manifest's "source" records them."""
    from sc2deploy.checkpoint import CheckpointSource, RandomSource

    where = str(folder / MANIFEST)
    config = Config.from_hf_dict(manifest.config, source=where)
    source = manifest.source
    kind = source.get("kind")
    if kind == "checkpoint" and isinstance(source.get("path"), str):
        path = Path(source["path"])
        if not path.is_dir():
            raise UserError(f"{where} says the artifact was exported from checkpoint {path}, which is not here; "
                            "pass that checkpoint (or a copy) with --checkpoint DIR")
        return CheckpointSource(path)
    if kind == "random" and isinstance(source.get("seed"), int):
        return RandomSource(config, source["seed"])
    raise UserError(f"{where} records neither a source checkpoint nor a random seed (source: {source or None}); "
                    "pass the checkpoint it was exported from with --checkpoint DIR")


def recorded_hashes(manifest: Manifest | None) -> dict[str, str] | None:
    """The sha256 of the source checkpoint's weight files that the manifest records (export records them)."""
    source = manifest.source if manifest is not None else None
    hashes = source.get("sha256") if isinstance(source, dict) and source.get("kind") == "checkpoint" else None
    if isinstance(hashes, dict) and hashes and all(isinstance(v, str) for v in hashes.values()):
        return hashes
    return None


def verify_source(source, manifest: Manifest, folder: Path, given: bool) -> str | None:
    """Check that the reference checkpoint's weight files are those `folder` was made from (the sha256 its
    manifest records), so that a checkpoint changed since the export is reported as such, not as a runtime that
    disagrees with it. Returns a note for the report; raises a UserError naming the file that differs."""
    hashes = recorded_hashes(manifest)
    if hashes is None:
        return f"{MANIFEST} records no sha256 of the source checkpoint: the reference weights were not verified"
    where = source.folder
    found = source.file_hashes()
    if given:
        if found != hashes:
            changed = sorted(set(found) ^ set(hashes)) or sorted(n for n in found if found[n] != hashes[n])
            raise UserError(f"--checkpoint {where} is not the checkpoint {folder} was made from ({changed[0]} "
                            f"differs from the sha256 in its {MANIFEST}); pass that one, or re-export from this "
                            f"one: sc2deploy export --checkpoint {where} --out {folder} --force")
        return f"reference checkpoint {where} matches the sha256 {MANIFEST} records"
    missing, added = sorted(set(hashes) - set(found)), sorted(set(found) - set(hashes))
    changed = sorted(n for n in set(found) & set(hashes) if found[n] != hashes[n])
    if missing or added or changed:
        what = (f"{changed[0]} differs from the sha256 in {folder / MANIFEST}" if changed else
                f"{missing[0]} is gone" if missing else f"it has a new weight file {added[0]}")
        raise UserError(f"the checkpoint {where} changed since {folder} was exported from it ({what}), so the "
                        f"reference would not be the exported weights; re-export: sc2deploy export --checkpoint "
                        f"{where} --out {folder} --force (with the same --dtype and --target), then run parity again")
    return f"source checkpoint {where} matches the sha256 recorded at export"


def config_differences(reference: Config, tested: Config, fields: Sequence[str]) -> list[str]:
    return [f"{f}={getattr(tested, f)} (reference {getattr(reference, f)})" for f in fields
            if getattr(tested, f) != getattr(reference, f)]


def check(folder: str | Path, backend: str = "ort", checkpoint: str | Path | None = None,
          prompts: str | Path | None = None, decode_steps: int = DECODE_STEPS, atol: float | None = None,
          rtol: float | None = None, kl: float | None = None, threads: int | None = None,
          device: torch.device | str | None = None, dtype: str = "bf16",
          progress: Callable[[str], None] | None = None, save_results: str | Path | None = None) -> Report:
    """`sc2deploy parity`: open the reference and the runtime for `folder`, run the suite, return the report.

    `folder` is the artifact (ort), the engine folder (trt) or a checkpoint folder (eager: a second set of
    weights checked against --checkpoint, or against itself). The reference is fp32 eager on the weights of
    `checkpoint`, else those the folder's manifest names (source checkpoint or random seed), on the CPU.
    cuda: the GPU runtime on the checkpoint folder, in `dtype`. `device`: where an eager or cuda runtime under
    test runs (default: cpu for eager, cuda for cuda).
    """
    from sc2deploy.checkpoint import CheckpointSource
    from sc2deploy.runtime import BACKENDS, open_runtime

    def stage(message: str) -> None:
        if progress:
            progress(message)

    folder = Path(folder)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not folder.is_dir():
        made_by = {"ort": "`sc2deploy export --target ort`", "trt": "`sc2deploy build`", "eager": "a checkpoint",
                   "cuda": "a checkpoint"}
        raise UserError(f"{folder} is not a folder; give the {backend} folder to check (made by {made_by[backend]})")
    notes = []
    if backend in ("eager", "cuda"):
        tested_source = CheckpointSource(folder)
        source = CheckpointSource(checkpoint) if checkpoint else tested_source
    else:
        manifest = read_manifest(folder, None) if (folder / MANIFEST).is_file() else None
        if manifest is None and (folder / "config.json").is_file():
            fix = (f"export it first: sc2deploy export --checkpoint {folder} --out ART, then sc2deploy parity ART"
                   if backend == "ort" else
                   f"export and build it first: sc2deploy export --checkpoint {folder} --target trt --out ART, "
                   f"sc2deploy build ART --out ENGINE, then sc2deploy parity ENGINE --backend trt")
            raise UserError(f"{folder} is a Hugging Face checkpoint, not an export artifact; {fix} (or check a "
                            f"runtime on the checkpoint itself: --backend eager or cuda)")
        if manifest is None:
            writer = "`sc2deploy export`" if backend == "ort" else "`sc2deploy build`"
            raise UserError(f"{folder} has no {MANIFEST}, so it is not a finished {backend} folder; give the folder "
                            f"{writer} wrote")
        source = CheckpointSource(checkpoint) if checkpoint else manifest_source(manifest, folder)
        if isinstance(source, CheckpointSource) and recorded_hashes(manifest):
            stage(f"parity: checking the sha256 of {source.folder}'s weights against {MANIFEST} ...")
        note = verify_source(source, manifest, folder, given=bool(checkpoint)) \
            if isinstance(source, CheckpointSource) else None
        if note:
            notes.append(note)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer.load(checkpoint if checkpoint else folder)
    extra = load_prompts(prompts, tokenizer, source.config.vocab_size) if prompts else ()
    cases = build_suite(source.config, tokenizer, decode_steps, extra)
    slots = max(len(c.prompts) for c in cases)

    options: dict = {"threads": threads} if threads and backend not in ("eager", "cuda") else {}
    runtime: Runtime  # opened first: it is the part most likely to refuse
    stage(f"parity: loading the {backend} runtime under test ({folder}) ...")
    if backend == "eager":
        runtime = EagerRuntime(tested_source, dtype="fp32", max_batch=slots, device=device or "cpu")
    elif backend == "cuda":
        runtime = open_runtime("cuda", source=tested_source, dtype=dtype, max_batch=slots, device=device)
    else:
        try:
            runtime = open_runtime(backend, artifact=folder, engine=folder, max_batch=slots, **options)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # e.g. the backend's library is missing or refuses the model
            raise UserError(f"cannot open {folder} with the {backend} runtime: {type(e).__name__}: {e}") from e
    shape = config_differences(source.config, runtime.config, SHAPE_FIELDS)
    if shape:
        raise UserError(f"{folder} holds a different model than the reference ({source.description}): "
                        f"{', '.join(shape)}; pass the checkpoint it was made from with --checkpoint DIR")
    stage(f"parity: loading the eager fp32 reference ({source.description}) ...")
    reference = ChunkedReference(source, max_batch=slots)
    report = run_suite(reference, runtime, cases, tolerances_for(runtime.dtype, atol, rtol, kl), progress,
                       save_results)
    report.reference = f"eager fp32 on {source.description}"
    report.notes += notes
    behaviour = config_differences(source.config, runtime.config, BEHAVIOUR_FIELDS)
    if behaviour:
        report.notes.append(f"the {backend} model's config differs from the reference: {', '.join(behaviour)}")
    return report
