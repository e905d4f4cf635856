"""Parity of a head artifact (sequence or token classification, base model: sc2deploy/tasks.py) against the
eager reference head model in float32, with the causal LM's tolerances, metrics and report.

The cases are the standard suite's prompts without decoding (short, long past the window, fim, a right-padded
batch), plus the same batch left-padded; every case feeds both runtimes the same input_ids and attention_mask
(runtime/heads.py: padded with pad_token_id, as a tokenizer pads). Compared: each row's pooled logits (sequence
classification), or each real token's logits or hidden state. Logits get the causal LM's verdict (per-position
bound, KL, top-1 flips that are not near-ties); hidden states the per-position bound alone. Without a
pad_token_id a sequence classifier cannot run batches (transformers' rule), so those cases are left out with
a note. Each case runs through Polygraphy's Comparator, one runner per runtime, as the causal LM's do.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from sc2deploy.config import SHAPE_FIELDS, config_differences
from sc2deploy.errors import UserError
from sc2deploy.parity.compare import CaseResult, Tolerances, compare_case
from sc2deploy.parity.report import Report
from sc2deploy.parity.suite import Case, build_suite
from sc2deploy.runtime.heads import HeadRuntime, pad_batch
from sc2deploy.tasks import FEATURE_EXTRACTION, SEQUENCE_TASK


def head_cases(config, tokenizer, extra: Sequence[Case] = ()) -> list[tuple[Case, str]]:
    """(case, padding side) pairs: the standard prompts with no decode steps, the batch also left-padded."""
    cases = [c for c in build_suite(config, tokenizer, 0, extra) if c.name != "decode"]
    pairs = []
    for case in cases:
        case.decode_steps = 0
        pairs.append((case, "right"))
        if case.name == "batch":
            pairs.append((Case("batch-left", case.description.replace("in one batch", "left-padded"),
                               case.prompts, 0), "left"))
    if config.head.task == SEQUENCE_TASK and config.head.pad_token_id is None:
        pairs = [(c, side) for c, side in pairs if len(c.prompts) == 1]
    return pairs


@cache
def _runner_class():
    """HeadRunner, defined on first use so that Polygraphy is imported only by parity checks."""
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
    except ImportError:
        raise UserError("parity checks need Polygraphy: pip install 'sc2deploy[onnx]' (or polygraphy)") from None

    class HeadRunner(BaseRunner):
        """A Polygraphy runner over a HeadRuntime: feed input_ids and attention_mask (B, S), output "output"."""

        def __init__(self, runtime: HeadRuntime, name: str):
            super().__init__(name=name)
            self.runtime = runtime

        def get_input_metadata_impl(self):
            return TensorMetadata().add("input_ids", np.int64, (None, None)).add("attention_mask", np.int64, (None, None))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = self.runtime.forward(feed_dict["input_ids"], feed_dict["attention_mask"])
            self.inference_time = time.perf_counter() - start
            return OrderedDict(output=out)

    return HeadRunner


def _rows(output: np.ndarray, mask: np.ndarray, pooled: bool) -> list:
    """One list of parts per row: the pooled logits, or the real tokens' outputs."""
    if pooled:
        return [[output[row:row + 1]] for row in range(output.shape[0])]
    return [[output[row][mask[row].astype(bool)]] for row in range(output.shape[0])]


def run_head_suite(reference: HeadRuntime, runtime: HeadRuntime, cases: Sequence[tuple[Case, str]],
                   tolerances: Tolerances, progress: Callable[[str], None] | None = None,
                   save_results: str | Path | None = None) -> Report:
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.logger import G_LOGGER

    task = runtime.head.task
    pooled, distributions = task == SEQUENCE_TASK, task != FEATURE_EXTRACTION
    runners = [_runner_class()(rt, f"{rt.name}-{rt.dtype}") for rt in (reference, runtime)]
    pad = runtime.head.pad_token_id
    kept: dict[str, list] = {}
    results = []
    for number, (case, side) in enumerate(cases, 1):
        if progress:
            progress(f"parity: case {number}/{len(cases)} {case.name} ({case.description}) ...")
        ids, mask = pad_batch(case.prompts, 0 if pad is None else pad, side)
        feed = OrderedDict(input_ids=ids, attention_mask=mask)
        outputs, seconds, finite = [], [], []
        try:
            for runner in runners:
                with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
                    run = Comparator.run([runner], data_loader=[feed])
                    finite.append(bool(Comparator.validate(run, check_inf=True, check_nan=True)))
                iteration = run[0][1][0]
                if save_results:
                    kept.setdefault(runner.name, []).append(iteration)
                outputs.append(_rows(iteration["output"], mask, pooled))
                seconds.append(iteration.runtime)
        except Exception as e:  # the runtime under test failed on a valid input: that is a parity failure
            if len(outputs) == 0:
                raise
            results.append(CaseResult(case.name, case.description, passed=False,
                                      failures=[f"the {runtime.name} runtime raised {type(e).__name__}: {e}"]))
            continue
        result = compare_case(case, outputs[0], outputs[1], tolerances, pooled=pooled, distributions=distributions)
        for ok, who in zip(finite, ("the eager reference", f"the {runtime.name} runtime")):
            if not ok:
                result.passed = False
                result.failures.insert(0, f"{who} produced NaN or inf outputs")
        result.reference_s, result.runtime_s = round(seconds[0], 4), round(seconds[1], 4)
        results.append(result)
    if save_results:
        RunResults(list(kept.items())).save(str(save_results))
    what = {SEQUENCE_TASK: "each row's pooled logits", FEATURE_EXTRACTION: "each real token's last_hidden_state "
            "(no KL or top-1: not logits)"}.get(task, "each real token's logits")
    report = Report(runtime.name, runtime.dtype, tolerances, results, reference=f"{reference.name} {reference.dtype}",
                    notes=[f"{task}: compared {what}"])
    if runtime.head.task == SEQUENCE_TASK and pad is None:
        report.notes.append("no pad_token_id: batch cases left out (transformers cannot pool a batch without one)")
    return report


def check_heads(folder: Path, source, prompts: str | Path | None, tolerances_of: Callable[[str], Tolerances],
                threads: int | None = None, progress: Callable[[str], None] | None = None,
                save_results: str | Path | None = None) -> Report:
    """`sc2deploy parity` of the head artifact at `folder` against the eager fp32 head model on `source`."""
    from sc2deploy.parity.suite import load_prompts
    from sc2deploy.runtime.heads import EagerHeads
    from sc2deploy.runtime.ort_heads import OrtHeads, load_ort_head_artifact
    from sc2deploy.tokenizer import Tokenizer

    if progress:
        progress(f"parity: loading the ort runtime under test ({folder}) ...")
    runtime = OrtHeads(load_ort_head_artifact(folder, trust_cache=False), threads=threads)
    shape = config_differences(source.config, runtime.config, SHAPE_FIELDS)
    if shape or source.config.head != runtime.config.head:
        what = ", ".join(shape) or f"head {runtime.config.head} (reference {source.config.head})"
        raise UserError(f"{folder} holds a different model than the reference ({source.description}): {what}; pass "
                        "the checkpoint it was made from with --checkpoint DIR")
    tokenizer = Tokenizer.load(folder)
    extra = load_prompts(prompts, tokenizer, source.config.vocab_size) if prompts else ()
    cases = head_cases(source.config, tokenizer, extra)
    if progress:
        progress(f"parity: loading the eager fp32 reference ({source.description}) ...")
    reference = EagerHeads(source, dtype="fp32", threads=threads)
    report = run_head_suite(reference, runtime, cases, tolerances_of(runtime.dtype), progress, save_results)
    report.reference = f"eager fp32 on {source.description}"
    return report
