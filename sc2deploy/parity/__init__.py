"""The engine parity checker: a runtime under test against the eager reference model, case by case.

The truth is the eager model in float32, whatever the dtype of the runtime under test: the numbers
reported are the error a user of that runtime sees. Each case of the suite is a feed dict (prompts,
right-padded, and the tokens to decode) run through two Polygraphy runners wrapping `Runtime`s.
Polygraphy is imported only when a check runs.

  suite.py      the cases: the standard suite sized from the config, user prompts from JSONL
  reference.py  the eager fp32 reference, prefilling long prompts in chunks
  compare.py    tolerances, per-position metrics and the verdict of one case
  report.py     the report of a whole check and its terminal table
  running.py    the Polygraphy runner over a Runtime, and the suite run case by case
  opening.py    opening what to compare (artifact, engine or checkpoint, and the reference), `check`
"""
from sc2deploy.errors import UserError
from sc2deploy.parity.compare import (CHUNK, DEFAULT_TOLERANCES, CaseResult, RowLogits, Tolerances, compare_case,
                                      tolerances_for)
from sc2deploy.parity.opening import (BEHAVIOUR_FIELDS, SHAPE_FIELDS, check, config_differences, manifest_source,
                                      recorded_hashes, verify_source)
from sc2deploy.parity.reference import PREFILL_CHUNK, ChunkedReference
from sc2deploy.parity.report import Report, format_table
from sc2deploy.parity.running import row_logits, run_feed, run_suite, runtime_runner
from sc2deploy.parity.suite import (DECODE_STEPS, FOLLOW_UP_STEPS, PROMPT_SOURCES, Case, PromptText, build_suite,
                                    load_prompts)

__all__ = ["BEHAVIOUR_FIELDS", "CHUNK", "DECODE_STEPS", "DEFAULT_TOLERANCES", "FOLLOW_UP_STEPS", "PREFILL_CHUNK",
           "PROMPT_SOURCES", "SHAPE_FIELDS", "Case", "CaseResult", "ChunkedReference", "PromptText", "Report",
           "RowLogits", "Tolerances", "UserError", "build_suite", "check", "compare_case", "config_differences",
           "format_table", "load_prompts", "manifest_source", "recorded_hashes", "row_logits", "run_feed",
           "run_suite", "runtime_runner", "tolerances_for", "verify_source"]
