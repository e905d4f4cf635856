"""onnxruntime-genai loads an ort artifact through its genai_config.json and decodes greedily like eager."""
from __future__ import annotations

import json

import pytest

from sc2deploy.checkpoint import CheckpointSource
from sc2deploy.runtime.eager import EagerRuntime

og = pytest.importorskip("onnxruntime_genai")


def genai_greedy(artifact, prompt: list[int], n: int) -> list[int]:
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def eager_greedy(runtime: EagerRuntime, prompt: list[int], n: int, eos: int) -> list[int]:
    tokens = [int(runtime.prefill(0, prompt).argmax())]
    while len(tokens) < n and tokens[-1] != eos:
        tokens.append(int(runtime.decode([0], [tokens[-1]])[0].argmax()))
    return tokens


def test_genai_greedy_equals_eager_past_the_window(store, helpers):
    folder, _ = store.checkpoint()
    artifact = store.artifact()
    source = CheckpointSource(folder)
    prompt = helpers.random_ids(source.config.vocab_size, (20,), seed=6).tolist()  # window is 8
    n = 64
    expected = eager_greedy(EagerRuntime(source, capacity=len(prompt) + n), prompt, n, source.config.eos_token_id)
    assert genai_greedy(artifact, prompt, n) == expected


def test_genai_config_describes_the_window_cache(store):
    config = json.loads((store.artifact() / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert decoder["sliding_window"]["window_size"] == 8
    assert decoder["sliding_window"]["slide_key_value_cache"] is False
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["vocab_size"] == 1000 and config["model"]["context_length"] == 512


def test_genai_runs_an_int4_artifact_like_the_dequantized_model(tmp_path, store, helpers):
    from sc2deploy.export import export_artifact
    from sc2deploy.parity.dequantized import DequantizedSource
    from sc2deploy.quantization import QuantScheme

    folder, _ = store.checkpoint()
    source = CheckpointSource(folder)
    scheme = QuantScheme(bits=4, block_size=16, accuracy_level=0, symmetric=False)  # float activations: exact
    artifact = export_artifact(source, tmp_path / "int4", "fp32", quant=scheme)
    prompt = helpers.random_ids(source.config.vocab_size, (20,), seed=7).tolist()
    n = 40
    dequantized = EagerRuntime(DequantizedSource(source, scheme, "fp32"), capacity=len(prompt) + n)
    assert genai_greedy(artifact, prompt, n) == eager_greedy(dequantized, prompt, n, source.config.eos_token_id)
