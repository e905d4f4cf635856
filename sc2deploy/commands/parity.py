"""sc2deploy parity: a runtime against the eager reference model (logic in sc2deploy/parity.py)."""
from __future__ import annotations

import argparse
import sys

from sc2deploy.commands.common import check_choice, notice, positive_int, print_json
from sc2deploy.parity import DECODE_STEPS, DEFAULT_TOLERANCES


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def register(subparsers) -> None:
    table = "; ".join(f"{d}: atol {t.atol:g}, rtol {t.rtol:g}, kl {t.kl:g}" for d, t in DEFAULT_TOLERANCES.items())
    p = subparsers.add_parser(
        "parity", help="check a runtime (ONNX Runtime artifact, TensorRT engine) against the eager model",
        description="Run the eager reference model (float32) and the runtime under test on a suite of cases - a "
                    "short prompt, a prompt longer than the sliding window, a fill-in-the-middle prompt, a batch of "
                    "unequal lengths, and greedy tokens decoded past the window - and report per case: max absolute "
                    "and relative logit error, top-1 agreement, KL(eager || runtime), the first decode step where the "
                    "greedy tokens differ, and whether that step is a near-tie (eager's top-2 margin within the "
                    "tolerance: noise, not a bug). The reference weights come from --checkpoint, else from the "
                    "source checkpoint or random seed in the folder's sc2deploy.json. Exit status: 0 all cases pass, "
                    "1 a case fails, 2 the check could not run.",
        epilog=f"default tolerances by the runtime's dtype - {table}. A position passes when "
               "max|runtime - eager| <= atol + rtol * max|eager|; a case when also its largest KL <= kl. "
               "example: sc2deploy parity out/tiny-ort --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR",
                   help="what to check: the export artifact (--backend ort), the engine folder (trt), "
                        "or a checkpoint folder (eager)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="reference weights (default: what the folder's sc2deploy.json records)")
    p.add_argument("--backend", default="ort", metavar="NAME", help="runtime under test: ort, trt or eager (default ort)")
    p.add_argument("--prompts", metavar="FILE",
                   help='extra cases, JSONL: {"prompt": TEXT} or {"fim_prefix": TEXT, "fim_suffix": TEXT} per '
                        'line, optional "name" and "max_new_tokens" (default 8)')
    p.add_argument("--decode-steps", type=positive_int, default=DECODE_STEPS, metavar="N",
                   help=f"greedy tokens of the decode case (default {DECODE_STEPS})")
    p.add_argument("--atol", type=non_negative_float, metavar="X", help="absolute logit tolerance (default by dtype)")
    p.add_argument("--rtol", type=non_negative_float, metavar="X",
                   help="logit tolerance relative to the position's largest |logit| (default by dtype)")
    p.add_argument("--kl", type=non_negative_float, metavar="X", help="largest KL divergence allowed (default by dtype)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: passed, backend, dtype, reference, tolerances, cases, notes")
    p.set_defaults(func=run)


def run(args) -> int:
    from sc2deploy.parity import check, format_table

    check_choice(args.backend, ("ort", "trt", "eager"), "backend")
    progress = notice if sys.stderr.isatty() else None
    report = check(args.folder, backend=args.backend, checkpoint=args.checkpoint, prompts=args.prompts,
                   decode_steps=args.decode_steps, atol=args.atol, rtol=args.rtol, kl=args.kl,
                   threads=args.threads, progress=progress)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_table(report))
    return report.exit_code
