"""sc2deploy generate: one completion from any runtime."""
from __future__ import annotations

import argparse
import sys

from sc2deploy.commands.common import (add_device, add_no_verify, add_run_dtype, add_weights, check_checkpoint,
                                       check_dtype, infer_backend, notice, open_weights, positive_int, print_json,
                                       parse_prompt_ids, resolve_device, runtime_folder)
from sc2deploy.commands.progress import StageLog
from sc2deploy.errors import UserError
from sc2deploy.runtime import BACKENDS, open_runtime
from sc2deploy.tokenizer import Tokenizer, validate_text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="complete a prompt (plain or fill-in-the-middle) with any runtime",
        description="Generate a completion. The weights come from --checkpoint, from --size (seeded random "
                    "weights), from an export --artifact (ort backend) or an --engine (trt backend). The prompt is "
                    "text, token ids, or a fill-in-the-middle pair (--fim-prefix/--fim-suffix). Greedy unless "
                    "--temperature is above 0. Without --backend: ort with --artifact, trt with --engine, else "
                    "eager.",
        epilog="example: sc2deploy generate --size tiny --prompt 'def fib(n):' --max-tokens 16 --json")
    add_weights(p, seed_flag="--weights-seed")
    p.add_argument("--artifact", metavar="DIR", help="export artifact folder (for --backend ort)")
    p.add_argument("--engine", metavar="DIR", help="TensorRT engine folder (for --backend trt)")
    p.add_argument("--backend", metavar="NAME",
                   help=f"runtime: {', '.join(BACKENDS)} (default: ort with --artifact, trt with --engine, else eager)")
    add_run_dtype(p)
    add_device(p)
    add_no_verify(p)
    prompt = p.add_argument_group("prompt (one of)")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--fim-prefix", metavar="TEXT", help="code before the cursor (with --fim-suffix)")
    prompt.add_argument("--fim-suffix", metavar="TEXT", help="code after the cursor (with --fim-prefix)")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    sampling.add_argument("--max-new-tokens", dest="max_tokens", type=int, default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS)  # the earlier name, kept working
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    sampling.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy")
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    sampling.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = all)")
    sampling.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed, for reproducible samples")
    sampling.add_argument("--stop", action="append", default=[], metavar="STR", help="stop before this string (repeatable)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text, finish reason and timings")
    p.set_defaults(func=run)


def prompt_ids(args, tokenizer: Tokenizer) -> list[int]:
    given = [x for x in ("prompt", "prompt_ids", "fim_prefix") if getattr(args, x) is not None]
    if (args.fim_prefix is None) != (args.fim_suffix is None):
        raise UserError("--fim-prefix and --fim-suffix go together")
    if len(given) != 1:
        raise UserError("give exactly one of --prompt, --prompt-ids, or --fim-prefix with --fim-suffix")
    if args.prompt is not None:
        ids = tokenizer.encode(validate_text(args.prompt, "--prompt"))
    elif args.fim_prefix is not None:
        ids = tokenizer.fim_prompt_ids(validate_text(args.fim_prefix, "--fim-prefix"),
                                       validate_text(args.fim_suffix, "--fim-suffix"))
    else:
        ids = parse_prompt_ids(args.prompt_ids)
    if not ids:
        raise UserError("the prompt is empty; give some text or token ids")
    return ids


def run(args) -> int:
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)  # first: what follows imports torch
    from sc2deploy.generation import check_fits, generate
    from sc2deploy.sampling import SamplingParams

    backend = infer_backend(args)
    device = resolve_device(args.device, backend)
    if backend == "trt":
        from sc2deploy.plugins.trt_env import require_tensorrt

        require_tensorrt("--backend trt")
    if args.greedy and args.temperature:
        raise UserError("--greedy and --temperature > 0 contradict each other; give one")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(validate_text(s, "--stop") for s in args.stop))
    on_weights = backend in ("eager", "cuda")
    folder = None if on_weights else runtime_folder(args, backend)
    dtype = check_dtype(args, backend, folder)
    if on_weights and args.checkpoint is None and args.size is None and (args.artifact or args.engine):
        given = "--artifact" if args.artifact else "--engine"
        raise UserError(f"the {backend} backend runs --checkpoint DIR or --size SIZE; {given} is for --backend "
                        f"{'ort' if args.artifact else 'trt'} (or leave --backend out)")
    source = open_weights(args.checkpoint, args.size, args.weights_seed) if on_weights else None
    tokenizer = Tokenizer.load(args.checkpoint if on_weights else folder)
    ids = prompt_ids(args, tokenizer)
    if source is not None:
        check_fits(len(ids), params.max_new_tokens, source.config.max_position_embeddings)
    options: dict = {"threads": args.threads} if args.threads else {}
    if on_weights:
        options["device"] = device
    if backend == "ort" and args.no_verify:
        options["verify"] = False
    with StageLog() as stage:
        where = args.checkpoint or (f"--size {args.size}" if on_weights else folder)
        stage(f"generate: loading the {backend} runtime ({where}) ...", show=False)
        runtime = open_runtime(backend, source=source, artifact=args.artifact, engine=args.engine, dtype=dtype,
                               capacity=len(ids) + params.max_new_tokens, **options)
        stage.end()
    stop_ids = tokenizer.fim_stop_token_ids if args.fim_prefix is not None else tokenizer.stop_token_ids
    result = generate(runtime, tokenizer, ids, params, stop_ids)
    scheme = runtime.quantization
    if args.json:
        print_json({**result.to_dict(), "backend": runtime.name, "dtype": runtime.dtype,
                    "quantization": scheme.to_manifest() if scheme else None})
    else:
        sys.stdout.write(result.text + "\n")
        notice(f"[{result.finish_reason}; {len(result.output_ids)} tokens; prefill {result.prefill_ms:.1f} ms; "
               f"decode {result.decode_tokens_per_s:.1f} tok/s; {runtime.name} {runtime.dtype}"
               f"{' ' + scheme.name if scheme else ''}]")
    return 0

