"""sc2deploy embed: a base model's hidden states (code embeddings) for one prompt."""
from __future__ import annotations

import argparse
import sys

from sc2deploy.commands.common import check_choice, print_json
from sc2deploy.commands.heads import add_model_and_prompt, floats, model_config, open_model, prompt_ids
from sc2deploy.tasks import FEATURE_EXTRACTION

POOLINGS = ("last", "mean", "none")

DESCRIPTION = """\
Embed a prompt with a StarCoder2 base model (a Starcoder2Model checkpoint, as transformers'
AutoModel saves it, or its `sc2deploy export` artifact): last_hidden_state, the output of the final
LayerNorm. --pooling last (default) gives the last token's hidden state, which has seen the whole
prompt; mean the average over the prompt's tokens; none every token's.

Output: one line of space-separated numbers per vector (one vector, or one per token with --pooling
none). --json: {"task": "feature-extraction", "pooling", "hidden_size", "embedding", "ids",
"backend", "dtype"}, "embedding" one vector or one per token.

exit status: 0 done, 2 bad input (a checkpoint or artifact that is not a base model included)."""

EPILOG = """\
examples:
  sc2deploy embed --checkpoint ./starcoder2-base --prompt 'def add(a, b): return a + b' --pooling mean
  sc2deploy embed --artifact base-ort --prompt-ids 1,2,3 --json"""


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="hidden states of a base model (code embeddings)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_prompt(p)
    p.add_argument("--pooling", default="last", metavar="HOW",
                   help="last (the last token's hidden state, default), mean (over the tokens) or none (every token)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_choice(args.pooling, POOLINGS, "pooling")
    backend, config = model_config(args, (FEATURE_EXTRACTION,))
    runtime, tokenizer = open_model(args, backend)
    ids = prompt_ids(args, tokenizer)
    hidden = runtime.run([ids])[0]  # (tokens, hidden)
    vectors = {"last": hidden[-1], "mean": hidden.astype("float64").mean(axis=0).astype("float32"),
               "none": hidden}[args.pooling]
    if args.json:
        print_json({"task": FEATURE_EXTRACTION, "pooling": args.pooling, "hidden_size": config.hidden_size,
                    "embedding": floats(vectors), "ids": ids, "backend": runtime.name, "dtype": runtime.dtype})
    else:
        for row in (vectors if vectors.ndim == 2 else [vectors]):
            sys.stdout.write(" ".join(f"{v:.7g}" for v in row) + "\n")
    return 0
