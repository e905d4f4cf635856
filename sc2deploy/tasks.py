"""What a StarCoder2 checkpoint computes on top of its transformer body: the head named by config.json's
`architectures`, as transformers defines its four StarCoder2 classes.

  architectures[0]                     task                     head
  Starcoder2ForCausalLM                text-generation          lm_head (or the tied embedding): next-token logits
  Starcoder2ForSequenceClassification  sequence-classification  score (no bias) at the pooled token: (num_labels,)
  Starcoder2ForTokenClassification     token-classification     score (with a bias unless token_classification_bias
                                                                is false) at every token: (S, num_labels)
  Starcoder2Model                      feature-extraction       none: last_hidden_state, after the final LayerNorm

A Starcoder2Model checkpoint names its tensors without the `model.` prefix of the other three. Labels come
from config.json's id2label (else num_labels, else transformers' default of two). No torch here: every Config
holds a Head, and commands read configs before they import torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from sc2deploy.errors import UserError

CAUSAL_LM = "Starcoder2ForCausalLM"
SEQUENCE_CLASSIFICATION = "Starcoder2ForSequenceClassification"
TOKEN_CLASSIFICATION = "Starcoder2ForTokenClassification"
BASE_MODEL = "Starcoder2Model"
TEXT_GENERATION, FEATURE_EXTRACTION = "text-generation", "feature-extraction"
SEQUENCE_TASK, TOKEN_TASK = "sequence-classification", "token-classification"
TASKS = {CAUSAL_LM: TEXT_GENERATION, SEQUENCE_CLASSIFICATION: SEQUENCE_TASK, TOKEN_CLASSIFICATION: TOKEN_TASK,
         BASE_MODEL: FEATURE_EXTRACTION}
CLASSIFIERS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION)
HEAD_TASKS = (SEQUENCE_TASK, TOKEN_TASK, FEATURE_EXTRACTION)  # the prefill-only ones (sc2deploy/heads.py)
# The command that runs each task, for errors that send a user to the right one.
COMMAND_OF_TASK = {TEXT_GENERATION: "generate", SEQUENCE_TASK: "classify", TOKEN_TASK: "classify",
                   FEATURE_EXTRACTION: "embed"}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
MAX_LABELS = 1 << 16
DEFAULT_NUM_LABELS = 2  # transformers' PretrainedConfig default
# transformers' message when a batch of several rows has no pad_token_id to pool by.
NO_PAD_TOKEN_MESSAGE = "Cannot handle batch sizes > 1 if no padding token is defined."


class BatchWithoutPadToken(UserError, ValueError):
    """Sequence classification of several rows without a pad_token_id (a ValueError, as in transformers)."""


@dataclass(frozen=True)
class Head:
    architecture: str = CAUSAL_LM
    labels: tuple[str, ...] = ()  # id2label in id order (classifiers)
    pad_token_id: int | None = None  # sequence classification pools at the rightmost token that is not this one
    score_bias: bool = False  # whether `score` has a bias (token classification)
    problem_type: str | None = None  # transformers' problem_type: how scores are made from logits

    def __post_init__(self) -> None:
        if self.architecture not in TASKS:
            raise UserError(f"architectures is {[self.architecture]}; sc2deploy runs the StarCoder2 classes "
                            f"{', '.join(TASKS)}")
        if self.architecture in CLASSIFIERS:
            if not 1 <= len(self.labels) <= MAX_LABELS:
                raise UserError(f"a {self.architecture} config needs 1 to {MAX_LABELS} labels (id2label or "
                                f"num_labels), found {len(self.labels)}")
        elif self.labels or self.score_bias:
            raise AssertionError(f"{self.architecture} has no score layer")
        if self.architecture == CAUSAL_LM and (self.pad_token_id is not None or self.problem_type is not None):
            raise AssertionError("a causal LM head records no pad_token_id or problem_type")
        if self.pad_token_id is not None and not (isinstance(self.pad_token_id, int) and not isinstance(
                self.pad_token_id, bool) and self.pad_token_id >= 0):
            raise UserError(f"pad_token_id is {self.pad_token_id!r}; expected null or an integer token id")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise UserError(f"problem_type is {self.problem_type!r}; expected null or one of {', '.join(PROBLEM_TYPES)}")

    @property
    def task(self) -> str:
        return TASKS[self.architecture]

    @property
    def body_prefix(self) -> str:
        """The prefix of the body's tensor names in a checkpoint of this architecture."""
        return "" if self.architecture == BASE_MODEL else "model."

    @property
    def scores(self) -> str:
        """How a classifier's logits become scores: transformers' pipelines' rule (sigmoid, softmax or none)."""
        if self.problem_type == "regression":
            return "none"
        if self.problem_type == "multi_label_classification" or len(self.labels) == 1:
            return "sigmoid"
        return "softmax"

    def tensor_shapes(self, hidden_size: int, vocab_size: int, tie_word_embeddings: bool) -> dict[str, tuple[int, ...]]:
        """The head's own tensors in a checkpoint."""
        if self.architecture == CAUSAL_LM:
            return {} if tie_word_embeddings else {"lm_head.weight": (vocab_size, hidden_size)}
        if self.architecture == BASE_MODEL:
            return {}
        shapes: dict[str, tuple[int, ...]] = {"score.weight": (len(self.labels), hidden_size)}
        if self.score_bias:
            shapes["score.bias"] = (len(self.labels),)
        return shapes

    def to_hf_dict(self) -> dict:
        """config.json's entries for this head (the causal LM's: architectures only)."""
        d: dict = {"architectures": [self.architecture]}
        if self.architecture == CAUSAL_LM:
            return d
        d["pad_token_id"] = self.pad_token_id
        if self.labels:
            d["id2label"] = {str(i): label for i, label in enumerate(self.labels)}
            d["label2id"] = {label: i for i, label in enumerate(self.labels)}
            d["problem_type"] = self.problem_type
        if self.architecture == TOKEN_CLASSIFICATION and not self.score_bias:
            d["token_classification_bias"] = False
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> Head:
        """The head a parsed config.json names (no architectures: a causal LM, as sc2deploy always read them)."""
        architectures = d.get("architectures")
        if architectures is None:
            return cls()
        if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
            raise UserError(f"architectures is {str(architectures)[:80]!r}; expected a list of class names such as "
                            f'["{CAUSAL_LM}"]')
        architecture = architectures[0]
        if architecture == CAUSAL_LM:
            return cls()
        if architecture not in TASKS:
            raise UserError(f"architectures is {architectures}: not a StarCoder2 class; sc2deploy runs "
                            f"{', '.join(TASKS)}")
        labels: tuple[str, ...] = ()
        if architecture in CLASSIFIERS:
            labels = _labels(d)
        bias = d.get("token_classification_bias", True)
        if not isinstance(bias, bool):
            raise UserError(f"token_classification_bias is {bias!r}; expected true or false")
        return cls(architecture, labels, d.get("pad_token_id"), architecture == TOKEN_CLASSIFICATION and bias,
                   d.get("problem_type") if architecture in CLASSIFIERS else None)


def _labels(d: dict) -> tuple[str, ...]:
    """id2label in id order; else LABEL_i for num_labels (default 2), as transformers names them."""
    id2label = d.get("id2label")
    if id2label is None:
        n = d.get("num_labels", DEFAULT_NUM_LABELS)
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_LABELS):
            raise UserError(f"num_labels is {n!r}; expected an integer from 1 to {MAX_LABELS}")
        return tuple(f"LABEL_{i}" for i in range(n))
    if not isinstance(id2label, dict) or not 1 <= len(id2label) <= MAX_LABELS:
        raise UserError(f"id2label must be an object of 1 to {MAX_LABELS} labels such as "
                        '{"0": "negative", "1": "positive"}')
    by_id: dict[int, str] = {}
    for key, label in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(id2label) or not isinstance(label, str):
            raise UserError(f"id2label has the entry {str(key)[:20]!r}: {str(label)[:40]!r}; expected ids 0 to "
                            f"{len(id2label) - 1}, each with a label string")
        by_id[index] = label
    if len(by_id) != len(id2label):
        raise UserError("id2label names an id twice; expected each id from 0 once")
    return tuple(by_id[i] for i in range(len(by_id)))


def require_task(head: Head, tasks: tuple[str, ...], what: str, rerun: str = "") -> None:
    """A one-line UserError unless `head` does one of `tasks`. `what` names the model ("checkpoint DIR"), `rerun`
    the flags that give it to the command that runs its task ("--checkpoint DIR")."""
    if head.task in tasks:
        return
    wanted = " or ".join(tasks)
    command = " ".join(filter(None, ("sc2deploy", COMMAND_OF_TASK[head.task], rerun)))
    raise UserError(f"{what} is a {head.architecture} model ({head.task}), not {_article(wanted)} {wanted} model; "
                    f"run it with `{command}`")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
