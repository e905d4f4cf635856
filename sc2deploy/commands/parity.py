"""sc2deploy parity: a runtime against the eager reference model (logic in sc2deploy/parity/)."""
from __future__ import annotations

import argparse
from pathlib import Path

from sc2deploy.commands.common import (add_device, check_choice, folder_kind, positive_int, print_json,
                                       refuse_export_as_checkpoint, resolve_device)
from sc2deploy.commands.progress import StageLog
from sc2deploy.errors import UserError
from sc2deploy.parity import DECODE_STEPS, DEFAULT_TOLERANCES


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


DESCRIPTION = """\
Check a runtime against the eager reference model (float32, the truth whatever the
runtime's dtype). Both run a suite of cases:
  short    a short code prompt, then 8 greedy tokens
  long     a prompt of 2W+5 tokens (W = the sliding window), then 8 greedy tokens
  fim      a fill-in-the-middle prompt, then 8 greedy tokens
  batch    three prompts of unequal lengths in one batch, then 8 greedy tokens each
  decode   64 greedy tokens after a prompt of W-8, decoded past the window
and any --prompts. Per case: max absolute and relative logit error, top-1 agreement,
KL(eager || runtime), the first decode step where the greedy tokens differ, and whether
that step is a near-tie (eager's top-2 margin within the tolerance: noise, not a bug).
The runtime under test is fed eager's greedy tokens, so logits stay comparable after a
near-tie. Reference weights: --checkpoint, else the source checkpoint or random seed that
the folder's sc2deploy.json records; a source checkpoint must still match the sha256 of its
files recorded at export (if it changed since, re-export). The reference prefills prompts
512 tokens at a time through its KV cache (exact), so its memory does not grow with the
prompt beyond the logits compared. Each step prints a line on stderr, and a line every 5 s
while it runs, whether stderr is a terminal or not.

exit status: 0 every case passes, 1 a case fails, 2 the check could not run."""


def epilog() -> str:
    rows = "\n".join(f"  {d:<6}{t.atol:<8g}{t.rtol:<8g}{t.kl:g}" for d, t in DEFAULT_TOLERANCES.items())
    return (f"tolerances by the runtime's dtype (override with --atol/--rtol/--kl):\n"
            f"  {'dtype':<6}{'atol':<8}{'rtol':<8}kl\n{rows}\n"
            "A position passes when max|runtime - eager| <= atol + rtol * max|eager|, a case when\n"
            "every position does and its largest KL <= kl.\n\n"
            "examples:\n"
            "  sc2deploy export --size tiny --out out/tiny-ort && sc2deploy parity out/tiny-ort\n"
            "  sc2deploy parity out/15b-ort --checkpoint ckpt/starcoder2-15b --json\n"
            "  sc2deploy parity out/15b-engine --backend trt --prompts my-prompts.jsonl\n"
            "  sc2deploy parity ckpt/starcoder2-3b --backend cuda --dtype bf16   # a GPU host")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="check a runtime (ONNX Runtime artifact, TensorRT engine) against the eager model",
        description=DESCRIPTION, epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR",
                   help="what to check: the export artifact (--backend ort), the engine folder (trt), "
                        "or a checkpoint folder (eager, cuda)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="reference weights (default: what the folder's sc2deploy.json records)")
    p.add_argument("--backend", default="ort", metavar="NAME",
                   help="runtime under test: ort, trt, cuda (the GPU runtime, on a checkpoint folder) or eager "
                        "(default ort)")
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
    add_device(p)
    p.add_argument("--dtype", default="bf16", metavar="DTYPE",
                   help="weights and activations of the cuda runtime under test: bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: passed, backend, dtype, reference, tolerances, cases, notes")
    p.add_argument("--save-results", metavar="FILE",
                   help="also write every output of both runners as Polygraphy RunResults (JSON; read it with "
                        "`polygraphy inspect data FILE`). It holds every logit of every case: about "
                        "positions x vocab x 4 bytes x 2, so mind a long --prompts file")
    p.set_defaults(func=run)


def run(args) -> int:
    from sc2deploy.parity import check, format_table

    check_choice(args.backend, ("ort", "trt", "eager", "cuda"), "backend")
    if args.backend == "trt" and folder_kind(args.folder) == "engine":  # before any work: TensorRT is there
        from sc2deploy.plugins.trt_env import require_tensorrt

        require_tensorrt("--backend trt")
    device = resolve_device(args.device, args.backend)
    if args.checkpoint is not None:
        refuse_export_as_checkpoint(args.checkpoint, "--checkpoint names the reference weights: the Hugging Face "
                                    "checkpoint the folder was made from (or leave it out: sc2deploy.json names it)")
    kind = folder_kind(args.folder)
    if args.backend in ("eager", "cuda") and kind in ("artifact", "engine"):
        other = "ort" if kind == "artifact" else "trt"
        raise UserError(f"{args.folder} is {'an export artifact' if kind == 'artifact' else 'a TensorRT engine folder'}"
                        f", not a checkpoint; check it with --backend {other}"
                        + (" (the default)" if other == "ort" else ""))
    if args.save_results is not None and not Path(args.save_results).resolve().parent.is_dir():
        raise UserError(f"--save-results {args.save_results}: its folder does not exist; create it or choose another")
    with StageLog() as progress:  # stage lines, and a line every few seconds while one runs: also when piped
        report = check(args.folder, backend=args.backend, checkpoint=args.checkpoint, prompts=args.prompts,
                       decode_steps=args.decode_steps, atol=args.atol, rtol=args.rtol, kl=args.kl,
                       threads=args.threads, device=device, dtype=args.dtype, progress=progress,
                       save_results=args.save_results)
    if args.json:
        print_json(report.to_dict())
    else:
        print(format_table(report))
    return report.exit_code
