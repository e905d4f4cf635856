"""sc2deploy classify: a sequence or token classifier's labels and scores for one prompt."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from sc2deploy.commands.common import print_json
from sc2deploy.commands.heads import add_model_and_prompt, floats, model_config, open_model, prompt_ids
from sc2deploy.runtime.heads import scores
from sc2deploy.tasks import SEQUENCE_TASK, TOKEN_TASK

DESCRIPTION = """\
Classify a prompt with a fine-tuned StarCoder2 classifier: a Starcoder2ForSequenceClassification
(one set of labels for the whole prompt, pooled at its last token as transformers pools) or a
Starcoder2ForTokenClassification (labels for every token). The model is a Hugging Face checkpoint
(--checkpoint, run by the eager reference model) or its `sc2deploy export` artifact (--artifact, run
by ONNX Runtime). Labels come from config.json's id2label. Scores are the softmax of the logits
(sigmoid for one label or problem_type multi_label_classification, the logits themselves for
regression), as transformers' pipelines make them.

Output: one line per label, "LABEL<TAB>score", best first (sequence); one line per token,
"position<TAB>token<TAB>best label<TAB>score" (tokens). --json: {"task", "labels", "logits", "scores",
"predicted", "ids", "backend", "dtype"}, with one row of logits for a sequence and one per token.

exit status: 0 done, 2 bad input (a checkpoint or artifact that is not a classifier included)."""

EPILOG = """\
examples:
  sc2deploy classify --checkpoint ./vuln-classifier --prompt 'strcpy(buf, argv[1]);'
  sc2deploy export --checkpoint ./vuln-classifier --out vuln-ort
  sc2deploy classify --artifact vuln-ort --prompt-ids 1,2,3 --json"""


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="labels and scores of a sequence or token classifier",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_prompt(p)
    p.set_defaults(func=run)


def run(args) -> int:
    backend, config = model_config(args, (SEQUENCE_TASK, TOKEN_TASK))
    runtime, tokenizer = open_model(args, backend)
    ids = prompt_ids(args, tokenizer)
    head = runtime.head
    logits = runtime.run([ids])[0]
    probabilities = scores(logits, head.scores)
    best = probabilities.argmax(axis=-1)
    labels = list(head.labels)
    if args.json:
        predicted = labels[int(best)] if head.task == SEQUENCE_TASK else [labels[int(i)] for i in best]
        print_json({"task": head.task, "labels": labels, "logits": floats(logits), "scores": floats(probabilities),
                    "predicted": predicted, "ids": ids, "backend": runtime.name, "dtype": runtime.dtype})
    elif head.task == SEQUENCE_TASK:
        for i in np.argsort(-probabilities, kind="stable"):
            sys.stdout.write(f"{labels[i]}\t{probabilities[i]:.6g}\n")
    else:
        for position, (token, i) in enumerate(zip(ids, best)):
            text = tokenizer.decode([token])
            sys.stdout.write(f"{position}\t{text!r}\t{labels[i]}\t{probabilities[position, i]:.6g}\n")
    return 0
