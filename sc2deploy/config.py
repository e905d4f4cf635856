"""StarCoder2 configuration: one dataclass, the size presets, Hugging Face config.json I/O.

Every derived number (head_dim, parameter count, bytes per dtype, KV bytes per token) is
computed here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sc2deploy.errors import UserError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported; StarCoder2 uses 'gelu_pytorch_tanh'")

    # ---- derived numbers ----
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

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
        """Every tensor of a Hugging Face StarCoder2 checkpoint, in file order."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
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
        shapes["model.norm.weight"] = (h,)
        shapes["model.norm.bias"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def num_parameters(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def weight_bytes(self, dtype: str) -> int:
        return self.num_parameters * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes(dtype)

    def cache_positions(self, context: int | None = None) -> int:
        """Positions a sequence of `context` tokens keeps in a window-bounded KV cache."""
        context = self.max_position_embeddings if context is None else context
        return min(context, self.window)

    # ---- Hugging Face config.json ----
    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["Starcoder2ForCausalLM"],
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
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Config":
        if d.get("model_type", "starcoder2") != "starcoder2":
            raise UserError(f"{source}: model_type is {d.get('model_type')!r}, expected 'starcoder2'")
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}; is this a StarCoder2 config.json?")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = d.get("eos_token_id", 0)
        head_dim = d.get("head_dim")
        kwargs = dict(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            rope_theta=float(rope_theta),
            vocab_size=d["vocab_size"],
            max_position_embeddings=d.get("max_position_embeddings", 16384),
            sliding_window=d.get("sliding_window"),
            norm_epsilon=d.get("norm_epsilon", 1e-5),
            use_bias=d.get("use_bias", True),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=d.get("bos_token_id") if d.get("bos_token_id") is not None else 0,
            eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 0,
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            head_dim_override=head_dim if head_dim and head_dim != d["hidden_size"] // d["num_attention_heads"] else None,
        )
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; a Hugging Face checkpoint folder needs a config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-download or rewrite the checkpoint's config.json")
        return cls.from_hf_dict(d, source=str(path))

    def save(self, folder: str | Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Config] = {
    # The released models (FACTS §1).
    "3b": Config(hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
                 num_key_value_heads=2, rope_theta=999999.4420358813, tie_word_embeddings=True),
    "7b": Config(hidden_size=4608, intermediate_size=18432, num_hidden_layers=32, num_attention_heads=36,
                 num_key_value_heads=4, rope_theta=1000000.0, tie_word_embeddings=False),
    "15b": Config(hidden_size=6144, intermediate_size=24576, num_hidden_layers=40, num_attention_heads=48,
                  num_key_value_heads=4, rope_theta=100000.0, tie_word_embeddings=False),
    # ~111M parameters with StarCoder2's proportions (tied head), for benchmarks: FACTS §4's anchor shape.
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
