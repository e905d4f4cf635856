"""Presets carry the released configs of docs/model.md exactly; derived numbers are computed once and right."""
from __future__ import annotations

import json

import pytest

from sc2deploy.config import PRESETS, Config, preset
from sc2deploy.errors import UserError

RELEASED = {  # hidden, intermediate, layers, heads, kv heads, rope_theta
    "3b": (3072, 12288, 30, 24, 2, 999999.4420358813),
    "7b": (4608, 18432, 32, 36, 4, 1000000.0),
    "15b": (6144, 24576, 40, 48, 4, 100000.0),
}


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_release_presets_match_facts(size):
    c = preset(size)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.rope_theta) == RELEASED[size]
    assert (c.vocab_size, c.max_position_embeddings, c.sliding_window, c.norm_epsilon) == (49152, 16384, 4096, 1e-5)
    assert c.head_dim == 128 and c.use_bias and c.hidden_act == "gelu_pytorch_tanh"
    assert (c.bos_token_id, c.eos_token_id) == (0, 0)


def test_kv_bytes_per_token_match_facts():
    # docs/model.md#sizes: bf16 KV per token 3b 30 KB, 7b 64 KB, 15b 80 KB (KiB).
    assert [preset(s).kv_bytes_per_token("bf16") // 1024 for s in ("3b", "7b", "15b")] == [30, 64, 80]


def test_window_bounds_the_cache():
    c = preset("15b")
    assert c.cache_positions() == 4096
    assert c.cache_positions(100) == 100


def test_parameter_count_matches_torch_module():
    import torch

    from sc2deploy.model import Starcoder2

    for name in ("tiny", "bench"):
        with torch.device("meta"):
            model = Starcoder2(PRESETS[name])
        assert PRESETS[name].num_parameters == sum(p.numel() for p in model.parameters())
    assert 95e6 < PRESETS["bench"].num_parameters < 130e6
    assert preset("15b").weight_bytes("fp32") == 2 * preset("15b").weight_bytes("bf16")


def test_hf_config_round_trip(tmp_path):
    for c in PRESETS.values():
        c.save(tmp_path)
        assert Config.load(tmp_path) == c


def test_transformers_reads_our_config(tmp_path):
    from transformers import Starcoder2Config

    preset("15b").save(tmp_path)
    hf = Starcoder2Config.from_pretrained(tmp_path)
    assert (hf.num_key_value_heads, hf.sliding_window, hf.max_position_embeddings, hf.tie_word_embeddings) == (4, 4096, 16384, False)


def test_transformers_5_nested_rope_theta(tmp_path):
    d = preset("3b").to_hf_dict()
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Config.load(tmp_path).rope_theta == 999999.4420358813


def test_bad_configs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown size"):
        preset("20b")
    with pytest.raises(UserError, match="not a multiple"):
        preset("tiny").replace(num_key_value_heads=3)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Config.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="starcoder2"):
        Config.load(tmp_path)


def test_parameter_count_is_the_sum_of_the_tensor_shapes():
    import math

    for c in PRESETS.values():
        for use_bias in (True, False):
            for tied in (True, False):
                v = c.replace(use_bias=use_bias, tie_word_embeddings=tied, head_dim_override=None if use_bias else 64)
                assert v.num_parameters == sum(math.prod(s) for s in v.tensor_shapes().values())


REAL_MODELS = {  # bounds must admit every real model; these are among the largest released dense ones
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                           sliding_window=None),
    "gemma-2-27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, vocab_size=256000, max_position_embeddings=8192,
                        sliding_window=4096),
    "1m-context": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                       num_key_value_heads=8, vocab_size=152064, max_position_embeddings=1 << 20, sliding_window=None),
}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_bounds_admit_real_models(name, tmp_path):
    d = {**preset("15b").to_hf_dict(), **REAL_MODELS[name]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = Config.load(tmp_path)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (d["hidden_size"], d["num_hidden_layers"], d["vocab_size"])


def test_a_derived_head_dim_in_config_json_is_no_override(tmp_path):
    d = preset("3b").to_hf_dict() | {"head_dim": 128}  # transformers 5 writes it
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Config.load(tmp_path) == preset("3b")
    (tmp_path / "config.json").write_text(json.dumps(d | {"head_dim": 64}))
    assert Config.load(tmp_path).head_dim == 64


def test_hf_defaults_for_absent_or_null_fields(tmp_path):
    d = preset("tiny").to_hf_dict()
    for key in ("num_key_value_heads", "bos_token_id", "eos_token_id"):
        d[key] = None
    d["eos_token_id"] = [0, 5]  # several stop ids: the first is the end of text
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = Config.load(tmp_path)
    assert (c.num_key_value_heads, c.bos_token_id, c.eos_token_id) == (c.num_attention_heads, 0, 0)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ("null", "holds a JSON null, not an object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nested past the parser's recursion limit
    ('{"num_hidden_layers": ' + "9" * 5000 + "}", "not valid JSON"),  # past Python's int digits limit
    (" " * (2 << 20) + "{}", "over the 1 MiB a config.json may have"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_config_json_that_is_not_a_config_object(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=message) as e:
        Config.load(tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400
