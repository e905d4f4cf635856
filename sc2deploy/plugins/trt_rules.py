"""The TensorRT plugins' rules in plain Python: names, I/O, shape and dtype rules, tactics, hash.

`trt_plugin.py` hands these to `tensorrt.plugin` (register / autotune / aot_impl / impl);
keeping them here lets them be unit tested where TensorRT is not installed. Nothing here
imports tensorrt or triton.

The contract of `sc2deploy.attention` (RoPE, ring-cache write, sliding-window attention) is
two plugins in namespace "sc2deploy", one node each per attention in the trt export, because
an `aot_impl` embeds one kernel and the prefill wants two (the one-launch kernel, which rotates
the new keys inside its key loop, is several times slower; see `triton_kernel`):

* `ROPE` (`sc2deploy::RopeCache`): the contract's nine inputs -> q_rot, k_rot (RoPE'd query
  and new keys) and present_key/present_value (the ring cache); kernel `rope_cache_kernel`.
* `ATTENTION` (`sc2deploy::SlidingWindowGQA`): q_rot, k_rot, value, past_key, past_value,
  seqlens_k, total_sequence_length -> output; kernel `sliding_window_gqa_kernel` unfused.
  It reads the past from past_key/value and the new keys from k_rot, never from present.

Each `aot_impl` embeds its kernel in the engine, so engines run without Python; each `impl`
launches the same kernel from Python (just in time). tensorrt.plugin plugins are always
version "1". Kernel parameter order is TensorRT's AOT calling convention: (input pointers...,
the int32 extra arguments (seq_len, capacity)..., output pointers...).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2deploy.contract import (ATTENTION_PLUGIN, ATTENTION_PLUGIN_INPUTS, PLUGIN_INPUTS, PLUGIN_NAMESPACE, ROPE_OUTPUTS,
                                ROPE_PLUGIN)


# Input kinds: "act" tensors share one floating dtype (fp16, bf16 or fp32); the rest are fixed.
ACT, INT32, FP32 = "act", "int32", "fp32"
FLOAT_DTYPES = ("fp16", "bf16", "fp32")
AUTOTUNE_NAMES = {"fp16": "FP16", "bf16": "BF16", "fp32": "FP32", "int32": "INT32"}

INPUT_KINDS = {"query": ACT, "key": ACT, "value": ACT, "past_key": ACT, "past_value": ACT, "q_rot": ACT, "k_rot": ACT,
               "seqlens_k": INT32, "total_sequence_length": INT32,
               "cos_cache": FP32, "sin_cache": FP32}
INPUT_RANKS = {"query": 3, "key": 3, "value": 3, "past_key": 4, "past_value": 4, "q_rot": 3, "k_rot": 3,
               "seqlens_k": 1, "total_sequence_length": 0, "cos_cache": 2, "sin_cache": 2}
WIDTH_HEADS = {"query": "num_heads", "q_rot": "num_heads", "key": "kv_num_heads", "k_rot": "kv_num_heads",
               "value": "kv_num_heads"}  # (B, S, heads * head_dim) inputs
HEAD_ATTRIBUTES: tuple[tuple[str, type], ...] = (("num_heads", int), ("kv_num_heads", int))
ATTRIBUTES = HEAD_ATTRIBUTES + (("local_window_size", int), ("scale", float))
EXTRA_ARGS = ("seq_len", "capacity")


@dataclass(frozen=True)
class OpSpec:
    """One plugin: its inputs, outputs (each shaped and typed like an input), attributes, kernel."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    like: tuple[int, ...]  # output i has the shape and dtype of input like[i]
    attributes: tuple[tuple[str, type], ...]
    kernel: str  # the one Triton kernel an aot_impl embeds (triton_launch.aot_signature's name)
    tuned: bool  # whether TensorRT times the TACTICS (block shapes) for it
    extra_args: tuple[str, ...] = EXTRA_ARGS  # int32 kernel scalars between input and output pointers

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.name}"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.attributes)


ROPE = OpSpec(ROPE_PLUGIN, PLUGIN_INPUTS, ROPE_OUTPUTS, (0, 1, 3, 4), HEAD_ATTRIBUTES, kernel="rope", tuned=False)
ATTENTION = OpSpec(ATTENTION_PLUGIN, ATTENTION_PLUGIN_INPUTS, ("output",), (0,), ATTRIBUTES, kernel="attention",
                   tuned=True)
SPECS = {spec.name: spec for spec in (ROPE, ATTENTION)}  # in graph order: RopeCache feeds SlidingWindowGQA


class PluginRuleError(ValueError):
    """An input the plugin cannot take; the message names the input and what it must be."""


# ---------------------------------------------------------------- dtype and shape rules (register)
def output_dtypes(spec: OpSpec, input_dtypes: Sequence[str]) -> list[str]:
    """Output dtypes from input dtypes ("fp16", "bf16", "fp32", "int32", ...); raises PluginRuleError.

    Rule: every activation input (query/q_rot, key/k_rot, value, caches) has one floating dtype,
    which the outputs take; seqlens_k and total_sequence_length are int32; the cos/sin caches float32.
    """
    if len(input_dtypes) != len(spec.inputs):
        raise PluginRuleError(f"{spec.name} takes {len(spec.inputs)} inputs ({', '.join(spec.inputs)}), "
                              f"got {len(input_dtypes)}")
    act = input_dtypes[0]
    if act not in FLOAT_DTYPES:
        raise PluginRuleError(f"{spec.name}: {spec.inputs[0]} is {act}; it must be one of {', '.join(FLOAT_DTYPES)}")
    for name, dtype in zip(spec.inputs, input_dtypes):
        kind = INPUT_KINDS[name]
        want = act if kind == ACT else kind
        if dtype != want:
            why = f"like {spec.inputs[0]}" if kind == ACT else "always"
            raise PluginRuleError(f"{spec.name}: input {name} is {dtype}, expected {want} ({why})")
    return [input_dtypes[i] for i in spec.like]


def output_shapes(spec: OpSpec, input_shapes: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """Output shapes: each output has its `like` input's shape (dims may be ints or symbolic)."""
    if len(input_shapes) != len(spec.inputs):
        raise PluginRuleError(f"{spec.name} takes {len(spec.inputs)} inputs, got {len(input_shapes)}")
    return [input_shapes[i] for i in spec.like]


def check_ranks(spec: OpSpec, ranks: Sequence[int]) -> None:
    for name, rank in zip(spec.inputs, ranks):
        if rank != INPUT_RANKS[name]:
            raise PluginRuleError(f"{spec.name}: input {name} has rank {rank}, expected {INPUT_RANKS[name]}")


def check_shapes(spec: OpSpec, shapes: Sequence[Sequence[int | None]], attrs: dict[str, Any]) -> None:
    """Static consistency of known dims (None = dynamic) with the attributes; raises PluginRuleError."""
    check_ranks(spec, [len(s) for s in shapes])
    check_attributes(attrs, head_dim=None)
    by_name = dict(zip(spec.inputs, shapes))
    head_dim = None
    cache = by_name.get("past_key")
    if cache is not None and cache[3] is not None:
        head_dim = cache[3]
        nkv = attrs["kv_num_heads"]
        if cache[1] is not None and cache[1] != nkv:
            raise PluginRuleError(f"{spec.name}: past_key has {cache[1]} heads, kv_num_heads is {nkv}")
    for name, shape in by_name.items():
        if name not in WIDTH_HEADS or shape[2] is None:
            continue
        heads = attrs[WIDTH_HEADS[name]]
        if head_dim is None:
            if shape[2] % heads:
                raise PluginRuleError(f"{spec.name}: {name} width {shape[2]} is not a multiple of {heads} heads")
            head_dim = shape[2] // heads
        if shape[2] != heads * head_dim:
            raise PluginRuleError(f"{spec.name}: {name} width {shape[2]} is not {heads} heads x {head_dim}")
    for name in ("cos_cache", "sin_cache"):
        table = by_name.get(name)
        if table is not None and head_dim is not None and table[1] is not None and table[1] * 2 != head_dim:
            raise PluginRuleError(f"{spec.name}: {name} has {table[1]} columns, expected head_dim/2 = {head_dim // 2}")
    if head_dim is not None:
        check_attributes(attrs, head_dim)


def check_attributes(attrs: dict[str, Any], head_dim: int | None) -> None:
    nq, nkv = attrs.get("num_heads"), attrs.get("kv_num_heads")
    if not isinstance(nq, int) or not isinstance(nkv, int) or nq <= 0 or nkv <= 0 or nq % nkv:
        raise PluginRuleError(f"num_heads={nq} must be a positive multiple of kv_num_heads={nkv}")
    if "scale" in attrs and not float(attrs["scale"]) > 0:
        raise PluginRuleError(f"scale={attrs['scale']} must be positive")
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
        raise PluginRuleError(f"head_dim={head_dim}: the Triton kernel needs a power of two >= 16")


# ---------------------------------------------------------------- autotune: types and tactics
def autotune_types(spec: OpSpec, float_dtypes: Sequence[str] = FLOAT_DTYPES) -> str:
    """The `AutoTuneCombination` type string: activations and outputs share one of `float_dtypes`."""
    floats = "|".join(AUTOTUNE_NAMES[d] for d in float_dtypes)
    fixed = {INT32: "INT32", FP32: "FP32"}
    ins = [floats if INPUT_KINDS[n] == ACT else fixed[INPUT_KINDS[n]] for n in spec.inputs]
    return ", ".join(ins + [floats] * len(spec.outputs))


# Tactics of the attention plugin (ATTENTION.tuned; RopeCache has one launch configuration):
# block shapes, not numerics (every tactic computes the same contract). TensorRT times each per
# optimization profile, so the decode profile can take the decode tiles and the prefill profile
# the prefill tiles. "compact" keeps shared memory small: a launch that works whatever the AOT
# launcher does about dynamic shared memory above 48 KiB.
TACTICS = {1: "prefill", 2: "decode", 3: "compact"}
TACTICS_ENV = "SC2DEPLOY_TRT_TACTICS"  # e.g. "compact": restrict the tactics TensorRT may time


def tactic_ids(environ: dict[str, str] | None = None) -> list[int]:
    """The tactics TensorRT may time: all of TACTICS, or those named in $SC2DEPLOY_TRT_TACTICS."""
    environ = dict(os.environ) if environ is None else environ
    wanted = [w.strip() for w in environ.get(TACTICS_ENV, "").split(",") if w.strip()]
    if not wanted:
        return sorted(TACTICS)
    unknown = [w for w in wanted if w not in TACTICS.values()]
    if unknown:
        raise PluginRuleError(f"${TACTICS_ENV} names unknown tactic(s) {unknown}; choose from "
                              f"{', '.join(TACTICS.values())}")
    return [i for i, name in sorted(TACTICS.items()) if name in wanted]


# ---------------------------------------------------------------- the AOT launch, symbolically
def aot_extra_args(spec: OpSpec, input_shapes: Sequence[Sequence[Any]]) -> list[Any]:
    """The int32 scalars passed between input and output pointers: (seq_len, capacity).

    seq_len = the first input's (query or q_rot) shape[1] and capacity = past_key.shape[2];
    dims may be symbolic (ShapeExpr).
    """
    by_name = dict(zip(spec.inputs, input_shapes))
    values = {"seq_len": input_shapes[0][1], "capacity": by_name["past_key"][2]}
    return [values[name] for name in spec.extra_args]


# ---------------------------------------------------------------- plugin hash
PLUGIN_SOURCES = ("triton_kernel.py", "tiling.py", "triton_launch.py", "trt_kernels.py", "trt_plugin.py",
                  "trt_rules.py")


def plugin_hash(folder: Path | None = None) -> str:
    """sha256 over the plugins' source files (name and bytes, in a fixed order): changes when either plugin does."""
    folder = folder or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in PLUGIN_SOURCES:
        path = folder / name
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()
