"""sc2deploy checkpoint: write a random-weight Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path

from sc2deploy.commands.common import (add_dtype, add_renamed_seed, add_size, add_weights_seed, check_renamed_seed,
                                       print_json)
from sc2deploy.commands.progress import progress_bar
from sc2deploy.config import preset
from sc2deploy.errors import UserError
from sc2deploy.tokenizer import packaged_tokenizer_path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoint", help="write a random-weight Hugging Face checkpoint for a size preset",
        description="Write config.json, model.safetensors (sharded at 5 GB with an index, like transformers) and "
                    "tokenizer.json for a size preset, with deterministic random weights. Weights are generated "
                    "and written block by block, so peak memory does not grow with the model; the folder "
                    "appears only when complete.")
    add_size(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist or be empty)")
    add_weights_seed(p)
    add_renamed_seed(p)
    p.add_argument("--force", action="store_true", help="replace an earlier checkpoint in --out")
    add_dtype(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object describing what was written (folder, size, dtype, files and their "
                        "bytes, parameters, seed)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_renamed_seed(args)
    config = preset(args.size)
    if args.dtype not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown dtype {args.dtype!r}; choose one of fp32, fp16, bf16")
    from sc2deploy.checkpoint import RandomSource, write_checkpoint

    source = RandomSource(config, args.weights_seed)
    with progress_bar(config.weight_bytes(args.dtype), f"writing {args.size}") as bar:
        out = write_checkpoint(source, Path(args.out), args.dtype, packaged_tokenizer_path(), progress=bar.update,
                               force=args.force)
    if args.json:
        files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
        print_json({"folder": str(out), "size": args.size, "dtype": args.dtype, "files": files,
                    "bytes": sum(files.values()), "weight_bytes": config.weight_bytes(args.dtype),
                    "parameters": config.num_parameters, "seed": args.weights_seed})
        return 0
    print(f"wrote {out} ({config.weight_bytes(args.dtype) / 1e9:.2f} GB of {args.dtype} weights, "
          f"seed {args.weights_seed})")
    return 0
