"""Presets carry FACTS §1 exactly; derived numbers are computed once and right."""
from __future__ import annotations

import json

import pytest

from sc2deploy.config import PRESETS, Config, preset
from sc2deploy.errors import UserError

FACTS = {  # hidden, intermediate, layers, heads, kv heads, rope_theta
    "3b": (3072, 12288, 30, 24, 2, 999999.4420358813),
    "7b": (4608, 18432, 32, 36, 4, 1000000.0),
    "15b": (6144, 24576, 40, 48, 4, 100000.0),
}


@pytest.mark.parametrize("size", sorted(FACTS))
def test_release_presets_match_facts(size):
    c = preset(size)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.rope_theta) == FACTS[size]
    assert (c.vocab_size, c.max_position_embeddings, c.sliding_window, c.norm_epsilon) == (49152, 16384, 4096, 1e-5)
    assert c.head_dim == 128 and c.use_bias and c.hidden_act == "gelu_pytorch_tanh"
    assert (c.bos_token_id, c.eos_token_id) == (0, 0)


def test_kv_bytes_per_token_match_facts():
    # FACTS: bf16 KV per token 3b 30 KB, 7b 64 KB, 15b 80 KB (KiB).
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
