"""Checkpoints: random ones written streamed and deterministic; loading fails loudly, naming the tensor."""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sc2deploy.checkpoint import CheckpointSource, RandomSource, load_model, write_checkpoint
from sc2deploy.config import preset
from sc2deploy.errors import UserError


def test_random_checkpoint_round_trips_and_is_deterministic(tmp_path):
    config = preset("tiny")
    a = write_checkpoint(RandomSource(config, seed=7), tmp_path / "a", "fp32")
    b = write_checkpoint(RandomSource(config, seed=7), tmp_path / "b", "fp32")
    c = write_checkpoint(RandomSource(config, seed=8), tmp_path / "c", "fp32")
    ta, tb, tc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert set(ta) == set(config.tensor_shapes())
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])
    source = CheckpointSource(a)
    assert source.config == config
    assert torch.equal(source.get("lm_head.weight", "fp32"), RandomSource(config, 7).get("lm_head.weight", "fp32"))


def test_transformers_loads_our_checkpoint_and_agrees(tmp_path):
    from transformers import Starcoder2ForCausalLM

    folder = write_checkpoint(RandomSource(preset("tiny"), seed=1), tmp_path / "ck", "fp32")
    hf = Starcoder2ForCausalLM.from_pretrained(folder).eval()
    model = load_model(CheckpointSource(folder))
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = model(ids, torch.ones_like(ids), model.empty_cache(1, 0))
    assert (got - expected).abs().max().item() < 1e-5


def test_sharded_checkpoint_with_index(tmp_path):
    config = preset("tiny")
    folder = write_checkpoint(RandomSource(config, seed=3), tmp_path / "ck", "bf16", shard_bytes=2_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    source = CheckpointSource(folder)
    got = source.get("model.norm.bias", "fp32")
    assert got.dtype == torch.float32
    assert torch.equal(got, RandomSource(config, 3).get("model.norm.bias", "bf16").float())


def test_cast_on_read(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny"), seed=0), tmp_path / "ck", "fp32")
    assert CheckpointSource(folder).get("model.embed_tokens.weight", "fp16").dtype == torch.float16


def _rewrite(folder, mutate):
    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.c_fc.bias"))
    with pytest.raises(UserError, match=r"no tensor model\.layers\.1\.mlp\.c_fc\.bias"):
        CheckpointSource(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    _rewrite(folder, lambda t: t.update({"model.norm.weight": torch.zeros(63)}))
    with pytest.raises(UserError, match=r"model\.norm\.weight .*shape \[63\], expected \[64\]"):
        CheckpointSource(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    _rewrite(folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected tensor model\.extra\.weight"):
        CheckpointSource(folder)


def test_truncated_and_corrupt_files(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        CheckpointSource(folder)
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        CheckpointSource(folder)
    path.unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        CheckpointSource(folder)


def test_pickled_weights_are_refused(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="safetensors only"):
        CheckpointSource(folder)


def test_writer_refuses_non_empty_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        write_checkpoint(RandomSource(preset("tiny")), out, "fp32")

    class Boom(RandomSource):
        def blocks(self, name, dtype="fp32"):
            if name.startswith("model.layers.1"):
                raise KeyboardInterrupt
            yield from super().blocks(name, dtype)

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(Boom(preset("tiny")), tmp_path / "partial", "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_streamed_writer_peak_memory_is_bounded(tmp_path):
    """Writing the 7b preset's largest tensor never materialises it whole (blocks of 4M elements)."""
    source = RandomSource(preset("7b"))
    sizes = {b.numel() for _, b in source.blocks("model.embed_tokens.weight")}
    assert max(sizes) <= 1 << 22


def test_force_replaces_only_an_earlier_checkpoint(tmp_path):
    out = write_checkpoint(RandomSource(preset("tiny"), seed=1), tmp_path / "ck", "fp32")
    write_checkpoint(RandomSource(preset("tiny"), seed=2), out, "fp32", force=True)
    assert torch.equal(CheckpointSource(out).get("model.norm.bias", "fp32"),
                       RandomSource(preset("tiny"), 2).get("model.norm.bias", "fp32"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not an sc2deploy checkpoint"):
        write_checkpoint(RandomSource(preset("tiny")), other, "fp32", force=True)
    assert (other / "mine.txt").read_text() == "x"


def test_rewriting_a_checkpoint_in_another_dtype(tmp_path):
    first = write_checkpoint(RandomSource(preset("tiny"), seed=4), tmp_path / "fp32", "fp32")
    second = write_checkpoint(CheckpointSource(first), tmp_path / "bf16", "bf16")
    for name in ("model.embed_tokens.weight", "model.norm.bias"):
        assert torch.equal(CheckpointSource(second).get(name, "bf16"), CheckpointSource(first).get(name, "bf16"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8])
def test_a_weight_with_an_integer_or_bool_dtype_is_refused(tmp_path, dtype):
    """I32 over float bytes would be cast value by value into nonsense weights; it must be refused, by name."""
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    name = "model.layers.1.self_attn.q_proj.weight"
    reinterpret = {torch.int32: lambda t: t.view(torch.int32), torch.bool: lambda t: t > 0,
                   torch.uint8: lambda t: (t > 0).to(torch.uint8)}[dtype]
    _rewrite(folder, lambda t: t.update({name: reinterpret(t[name])}))
    expected = {torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}[dtype]
    with pytest.raises(UserError, match=rf"tensor {re.escape(name)} .*dtype {expected}; weights must be floating"):
        CheckpointSource(folder)


def test_float_dtypes_are_read(tmp_path):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    _rewrite(folder, lambda t: t.update({"model.norm.bias": t["model.norm.bias"].double()}))
    assert CheckpointSource(folder).get("model.norm.bias", "fp32").dtype == torch.float32


def _raw_safetensors(path, header: object, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header", [
    [1, 2],
    {"model.norm.weight": "F32"},
    {"model.norm.weight": {"dtype": "F32", "shape": [64]}},
    {"model.norm.weight": {"dtype": "F32", "shape": ["64"], "data_offsets": [0, 256]}},
    {"model.norm.weight": {"dtype": 7, "shape": [64], "data_offsets": [0, 256]}},
    {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0]}},
])
def test_malformed_safetensors_headers_are_user_errors(tmp_path, header):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "fp32")
    _raw_safetensors(folder / "model.safetensors", header, bytes(256))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        CheckpointSource(folder)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"model.norm.weight": 3}},
                                   {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}])
def test_malformed_shard_index_is_a_user_error(tmp_path, index):
    folder = write_checkpoint(RandomSource(preset("tiny")), tmp_path / "ck", "bf16", shard_bytes=2_000_000)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model.safetensors.index.json is corrupt"):
        CheckpointSource(folder)
