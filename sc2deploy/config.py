"""StarCoder2 configuration: one dataclass, the size presets, Hugging Face config.json I/O.

Every derived number (head_dim, parameter count, bytes per dtype, KV bytes per token) is
computed here and nowhere else. So is the validation of every field (`Config.__post_init__`),
which every command meets before anything is allocated: see LIMITS.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sc2deploy.contract import DTYPE_BYTES, TORCH_DTYPE_NAMES
from sc2deploy.errors import UserError
from sc2deploy.tasks import CAUSAL_LM, Head


# Bounds on config values (inclusive), generous for any real model: the largest released dense models
# have hidden 16384, 126 layers, 128 heads, head_dim 256, 256k vocabularies and 1M-position contexts;
# StarCoder2-15b has 6144, 40, 48, 128, 49152 and 16384. They exist so that a corrupt or hostile
# config.json is a one-line error at once instead of a loop or an allocation without bound.
LIMITS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 20),
    "sliding_window": (1, 1 << 20),  # or null: no window
    "head_dim": (2, 1024),  # even; config.json's head_dim, or hidden_size / num_attention_heads
}
MAX_PARAMETERS = 10**12  # 1T: 2 TB of bf16 weights, 60 times StarCoder2-15b
MAX_CACHE_VALUES = 10**12  # KV cache values of one full-context sequence (15b without its window: 6.7e8)
HIDDEN_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int, note: str = "") -> None:
    """A count or id: a JSON integer (not a bool, float or string) from `low` to `high`."""
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise UserError(f"{name} is {_show(value)}; expected an integer from {low} to {high}" + (f" {note}" if note else ""))


def _show(value: object) -> str:
    """A config value for a one-line message: as JSON, cut short, with its JSON type unless a number or null."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return text if _is_number(value) or value is None else f"{text}, a {_json_type(value)}"


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _default(value, default):
    """config.json's value, or `default` when it is absent or null (as transformers reads it)."""
    return default if value is None else value


@dataclass(frozen=True)
class Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    vocab_size: int = 49152
    max_position_embeddings: int = 16384
    sliding_window: int | None = 4096
    norm_epsilon: float = 1e-5
    use_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0
    hidden_act: str = "gelu_pytorch_tanh"
    head_dim_override: int | None = None
    head: Head = Head()  # what runs on top of the body: config.json's architectures (sc2deploy/tasks.py)

    def __post_init__(self) -> None:
        """The one validation of a config, in cheap arithmetic: types, then LIMITS, then how fields relate,
        then the cost (parameters, KV cache). A UserError names the field, its value and what is expected."""
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "max_position_embeddings"):
            _check_int(name, getattr(self, name), *LIMITS[name])
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, *LIMITS["sliding_window"], "or null for no window")
        if self.head_dim_override is not None:
            _check_int("head_dim", self.head_dim_override, *LIMITS["head_dim"])
        for name in ("rope_theta", "norm_epsilon"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise UserError(f"{name} is {_show(value)}; expected a finite number > 0")
        for name in ("use_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} is {_show(getattr(self, name))}; expected true or false")
        for name in ("bos_token_id", "eos_token_id"):
            _check_int(name, getattr(self, name), 0, self.vocab_size - 1, f"(a token id below vocab_size {self.vocab_size})")
        if self.head.pad_token_id is not None:  # padding columns are embedded like any token
            _check_int("pad_token_id", self.head.pad_token_id, 0, self.vocab_size - 1,
                       f"(a token id below vocab_size {self.vocab_size}) or null")
        if self.hidden_act not in HIDDEN_ACTS:
            raise UserError(f"hidden_act is {_show(self.hidden_act)}; expected one of {', '.join(HIDDEN_ACTS)} "
                            "(StarCoder2 uses gelu_pytorch_tanh)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "expected a multiple (or a head_dim entry)"
            )
        low, high = LIMITS["head_dim"]
        if self.head_dim % 2 or not low <= self.head_dim <= high:
            what = "head_dim" if self.head_dim_override else "head_dim (hidden_size / num_attention_heads)"
            raise UserError(f"{what} is {self.head_dim}; expected an even integer (rotary embeddings pair "
                            f"dimensions) from {low} to {high}")
        if self.num_parameters > MAX_PARAMETERS:
            raise UserError(f"this config has {self.num_parameters:.3g} parameters, over sc2deploy's bound of "
                            f"{MAX_PARAMETERS:.0g}; check hidden_size, intermediate_size, num_hidden_layers and vocab_size")
        cache = self.kv_values_per_token * self.cache_positions()
        if cache > MAX_CACHE_VALUES:
            raise UserError(f"one full-context sequence would cache {cache:.3g} key/value numbers, over sc2deploy's "
                            f"bound of {MAX_CACHE_VALUES:.0g}; check num_hidden_layers, num_key_value_heads, "
                            "head_dim, sliding_window and max_position_embeddings")

    # ---- derived numbers ----
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def windowed(self) -> bool:
        """Whether attention has a sliding window: decides the artifact's cache layout and attention attributes."""
        return bool(self.sliding_window)

    @property
    def window(self) -> int:
        """Sliding window in positions; the full context when the model has none."""
        return self.sliding_window or self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a Hugging Face StarCoder2 checkpoint of this head, in file order."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        body = self.head.body_prefix
        shapes: dict[str, tuple[int, ...]] = {f"{body}embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"{body}layers.{n}."
            linears = {
                "self_attn.q_proj": (q, h),
                "self_attn.k_proj": (kv, h),
                "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q),
                "mlp.c_fc": (i, h),
                "mlp.c_proj": (h, i),
            }
            for name, shape in linears.items():
                shapes[p + name + ".weight"] = shape
                if self.use_bias:
                    shapes[p + name + ".bias"] = (shape[0],)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes[p + norm + ".weight"] = (h,)
                shapes[p + norm + ".bias"] = (h,)
        shapes[f"{body}norm.weight"] = (h,)
        shapes[f"{body}norm.bias"] = (h,)
        shapes.update(self.head.tensor_shapes(h, self.vocab_size, self.tie_word_embeddings))
        return shapes

    @property
    def num_parameters(self) -> int:
        """The number of values in tensor_shapes(), counted without building it."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        linears = 2 * h * (q + kv) + 2 * h * i  # q, k, v, o; c_fc, c_proj
        biases = (q + 2 * kv + h + i + h) if self.use_bias else 0
        norms = 2 * 2 * h  # two layer norms, weight and bias
        head = sum(math.prod(s) for s in self.head.tensor_shapes(h, self.vocab_size, self.tie_word_embeddings).values())
        return self.vocab_size * h + head + self.num_hidden_layers * (linears + biases + norms) + 2 * h

    def weight_bytes(self, dtype: str) -> int:
        return self.num_parameters * dtype_bytes(dtype)

    @property
    def kv_values_per_token(self) -> int:
        return 2 * self.num_hidden_layers * self.kv_size

    def kv_bytes_per_token(self, dtype: str) -> int:
        return self.kv_values_per_token * dtype_bytes(dtype)

    def cache_positions(self, context: int | None = None) -> int:
        """Positions a sequence of `context` tokens keeps in a window-bounded KV cache."""
        context = self.max_position_embeddings if context is None else context
        return min(context, self.window)

    # ---- Hugging Face config.json ----
    def to_hf_dict(self) -> dict:
        d = {
            "architectures": [CAUSAL_LM],
            "model_type": "starcoder2",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "norm_epsilon": self.norm_epsilon,
            "use_bias": self.use_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": self.hidden_act,
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.head_dim_override:
            d["head_dim"] = self.head_dim_override
        if self.head != Head():
            d.update(self.head.to_hf_dict())
        return d

    @classmethod
    def from_hf_dict(cls, d: object, source: str = "config.json") -> "Config":
        """A Config from a parsed config.json; values are passed on as found, for __post_init__ to judge."""
        if not isinstance(d, dict):
            raise UserError(f"{source} holds a JSON {_json_type(d)}, not an object; a StarCoder2 config.json is an "
                            'object such as {"model_type": "starcoder2", "hidden_size": 3072, ...}')
        if d.get("model_type", "starcoder2") != "starcoder2":
            raise UserError(f"{source}: model_type is {_show(d.get('model_type'))}, expected \"starcoder2\"")
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}; is this a StarCoder2 config.json?")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            nested = d.get("rope_parameters")
            rope_theta = nested.get("rope_theta", 10000.0) if isinstance(nested, dict) else 10000.0
        eos = d.get("eos_token_id")
        if isinstance(eos, list) and eos:  # several stop ids: the first is the end of text
            eos = eos[0]
        kwargs = dict(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=_default(d.get("num_key_value_heads"), d["num_attention_heads"]),
            rope_theta=float(rope_theta) if _is_number(rope_theta) else rope_theta,
            vocab_size=d["vocab_size"],
            max_position_embeddings=d.get("max_position_embeddings", 16384),
            sliding_window=d.get("sliding_window"),
            norm_epsilon=d.get("norm_epsilon", 1e-5),
            use_bias=d.get("use_bias", True),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=_default(d.get("bos_token_id"), 0),
            eos_token_id=_default(eos, 0),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            head_dim_override=d.get("head_dim"),
        )
        try:
            config = cls(**kwargs, head=Head.from_hf_dict(d))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        if config.head_dim_override == config.hidden_size // config.num_attention_heads:
            config = config.replace(head_dim_override=None)  # transformers 5 writes the derived head_dim
        return config

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; a Hugging Face checkpoint folder needs a config.json")
        try:
            size = path.stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise UserError(f"{path} is {size} bytes, over the {MAX_CONFIG_BYTES >> 20} MiB a config.json may have "
                                "(they are a few KB); is it the checkpoint's config.json?")
            d = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
            raise UserError(f"{path} is not valid JSON ({str(e)[:200]}); re-download or rewrite the checkpoint's "
                            "config.json") from None
        return cls.from_hf_dict(d, source=str(path))

    def save(self, folder: str | Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Config] = {
    # The released models (docs/model.md#released-configs).
    "3b": Config(hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
                 num_key_value_heads=2, rope_theta=999999.4420358813, tie_word_embeddings=True),
    "7b": Config(hidden_size=4608, intermediate_size=18432, num_hidden_layers=32, num_attention_heads=36,
                 num_key_value_heads=4, rope_theta=1000000.0, tie_word_embeddings=False),
    "15b": Config(hidden_size=6144, intermediate_size=24576, num_hidden_layers=40, num_attention_heads=48,
                  num_key_value_heads=4, rope_theta=100000.0, tie_word_embeddings=False),
    # ~111M parameters with StarCoder2's proportions (tied head), for benchmarks: docs/machines.md's anchor shape.
    "bench": Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True),
    # Small and fast for tests, with the real vocabulary and a window short enough to cross.
    "tiny": Config(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=100000.0, max_position_embeddings=1024,
                   sliding_window=32, tie_word_embeddings=False),
}


def preset(name: str) -> Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown size {name!r}; choose one of {', '.join(PRESETS)}") from None


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}") from None


def torch_dtype(dtype: str):
    import torch

    dtype_bytes(dtype)
    return getattr(torch, TORCH_DTYPE_NAMES[dtype])


# The fields that fix the weights' shapes: two configs that differ in one cannot share weights.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "use_bias", "tie_word_embeddings", "head_dim")


def config_differences(reference: Config, tested: Config, fields: Sequence[str]) -> list[str]:
    """`field=value (reference value)` for each of `fields` in which `tested` differs from `reference`."""
    return [f"{f}={getattr(tested, f)} (reference {getattr(reference, f)})" for f in fields
            if getattr(tested, f) != getattr(reference, f)]
