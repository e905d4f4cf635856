"""sc2deploy info: the numbers of a model size."""
from __future__ import annotations

from sc2deploy.commands.common import add_size, print_json
from sc2deploy.config import Config, preset
from sc2deploy.contract import DTYPE_BYTES
from sc2deploy.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="parameters, weight bytes and KV cache bytes of a model size",
        description="Print a model's configuration and derived sizes: parameter count, weight bytes per dtype, "
                    "KV cache bytes per token, and the cache for a full context with and without the sliding window.")
    add_size(p)
    p.add_argument("--checkpoint", metavar="DIR", help="read config.json from a checkpoint folder instead")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def summary(config: Config) -> dict:
    context = config.max_position_embeddings
    return {
        "config": config.to_hf_dict(),
        "head_dim": config.head_dim,
        "parameters": config.num_parameters,
        "weight_bytes": {d: config.weight_bytes(d) for d in DTYPE_BYTES},
        "kv_bytes_per_token": {d: config.kv_bytes_per_token(d) for d in DTYPE_BYTES},
        "context": context,
        "window": config.sliding_window,
        "cache_bytes_full_context": {
            "with_window": {d: config.cache_positions(context) * config.kv_bytes_per_token(d) for d in DTYPE_BYTES},
            "without_window": {d: context * config.kv_bytes_per_token(d) for d in DTYPE_BYTES},
        },
    }


def run(args) -> int:
    if args.checkpoint:
        config, name = Config.load(args.checkpoint), args.checkpoint
    elif args.size:
        config, name = preset(args.size), args.size
    else:
        raise UserError("give --size SIZE or --checkpoint DIR")
    s = summary(config)
    if args.json:
        print_json({"name": name, **s})
        return 0
    c = config
    print(f"StarCoder2 {name}: {s['parameters'] / 1e9:.3f} B parameters, {c.num_hidden_layers} layers, hidden "
          f"{c.hidden_size}, {c.num_attention_heads} query / {c.num_key_value_heads} KV heads of {c.head_dim}, "
          f"window {c.sliding_window}, context {c.max_position_embeddings}")
    print(f"{'dtype':<6}{'weights':>14}{'KV/token':>12}{'cache, window':>16}{'cache, no window':>18}")
    for d in DTYPE_BYTES:
        print(f"{d:<6}{_mb(s['weight_bytes'][d]):>14}{s['kv_bytes_per_token'][d] / 1024:>9.1f} KiB"
              f"{_mb(s['cache_bytes_full_context']['with_window'][d]):>16}"
              f"{_mb(s['cache_bytes_full_context']['without_window'][d]):>18}")
    print(f"(cache: one sequence of {s['context']} tokens)")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
