"""Running the suite: each case through the reference, then through the runtime under test.

Greedy decoding is teacher-forced. The reference decodes greedily on its own; the runtime under
test is then fed the reference's tokens. Up to the first step where the runtime's own argmax differs,
this is exactly free-running greedy decoding (both have seen the same tokens), so "first divergence"
means what it says; after it, the two still see the same history and every later logit stays
comparable instead of being lost to a harmless near-tie.

Polygraphy: `RuntimeRunner` is a `polygraphy.backend.base.BaseRunner` (PytRunner was the template), so
our runtimes run under `Comparator.run` (activation, timing, RunResults) and fit any Polygraphy workflow.
Two parts of the comparator do not fit and are not used: one `Comparator.run` over both runners, since the
runtime's feed (the greedy tokens) is the reference's output, so each case runs the reference, then the
runtime; and `CompareFunc.simple`, whose relative error is elementwise (|r - e| / |e|, unbounded where a
logit crosses zero, while logit errors scale with the position's logit range) and which has no KL, top-1
or greedy divergence. Polygraphy is imported only when a check runs.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from sc2deploy.errors import UserError
from sc2deploy.parity.compare import (CaseResult, FidelityBounds, RowLogits, Tolerances, check_fidelity, compare_case,
                                      fidelity_stats)
from sc2deploy.parity.report import Report
from sc2deploy.parity.suite import Case
from sc2deploy.runtime.base import Runtime


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



def run_suite(reference: Runtime, runtime: Runtime, cases: Sequence[Case], tolerances: Tolerances,
              progress: Callable[[str], None] | None = None, save_results: str | Path | None = None,
              baseline: Runtime | None = None, fidelity: FidelityBounds | None = None) -> Report:
    """Run every case through the reference and the runtime under test; a runtime error, or NaN or inf in its
    outputs, fails its case. `save_results`: write both runners' outputs there as Polygraphy RunResults.
    `baseline` (a quantized runtime's unquantized model): also run it on the reference's tokens, and judge the
    runtime's fidelity_stats against it by `fidelity`."""
    need = max(len(c.prompts) for c in cases)
    for rt in (reference, runtime):
        if rt.max_batch < need:
            raise UserError(f"the {rt.name} runtime has {rt.max_batch} slots; the suite needs {need}")
    ref_runner = runtime_runner(reference, f"{reference.name}-{reference.dtype}")
    base_runner = runtime_runner(baseline, "unquantized") if baseline is not None else None
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
            ref_logits = None  # freed before the next case (not `del`: pyflakes reads it as unbound below)
            results.append(CaseResult(case.name, case.description, passed=False, decode_steps=case.decode_steps,
                                      failures=[f"the {runtime.name} runtime raised {type(e).__name__}: {e}"]))
            continue
        result = compare_case(case, ref_logits, test_logits, tolerances)
        del ref_logits  # (positions, vocab) float32: not kept past its case
        if base_runner is not None and fidelity is not None:
            if progress:
                progress(f"{where}: the unquantized model ...")
            base_logits, *_ = _run(base_runner, forced)
            result.fidelity = fidelity_stats(base_logits, test_logits)
            result.failures += check_fidelity(result.fidelity, fidelity)
            result.passed = result.passed and not result.failures
            del base_logits
        del test_logits
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

