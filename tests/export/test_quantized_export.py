"""`export --quant`: the graph's weights become MatMulNBits / GatherBlockQuantized, and ONNX Runtime computes
exactly what the eager model computes on the same weights quantized and dequantized (accuracy_level 0)."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch

from sc2deploy.checkpoint import CheckpointSource, load_model
from sc2deploy.cli import main
from sc2deploy.contract import MANIFEST, open_artifact_manifest
from sc2deploy.errors import UserError
from sc2deploy.export import export_artifact
from sc2deploy.parity.dequantized import DequantizedSource
from sc2deploy.quantization import SCHEMES, QuantScheme

EXACT = dict(accuracy_level=0)  # activations stay float: ORT must match the dequantized model to fp32 rounding


def _eager_logits(source, ids: torch.Tensor) -> np.ndarray:
    model = load_model(source, "fp32")
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids), model.empty_cache(ids.shape[0], source.config.sliding_window))
    return logits.numpy()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tied", [False, True])
def test_ort_computes_the_dequantized_model_past_the_window(tmp_path, helpers, bits, tied):
    folder = tmp_path / "ckpt"
    helpers.make_hf_model(folder, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                          tie_word_embeddings=tied)
    source = CheckpointSource(folder)
    scheme = QuantScheme(bits=bits, block_size=16, symmetric=False, **EXACT)
    artifact = export_artifact(source, tmp_path / "art", "fp32", quant=scheme)
    ids = helpers.random_ids(source.config.vocab_size, (2, 3 * source.config.sliding_window + 5), seed=3)
    got = helpers.run_prompt(helpers.ort_session(artifact), source.config, ids)

    expected = _eager_logits(DequantizedSource(source, scheme, "fp32"), ids)
    assert np.abs(got - expected).max() < 1e-4
    # and it is a different model from the unquantized one: the test would see a quantizer that does nothing
    assert np.abs(got - _eager_logits(source, ids)).max() > 1e-3


def test_every_weight_is_quantized_and_the_manifest_records_the_scheme(tmp_path, helpers):
    folder = tmp_path / "ckpt"
    helpers.make_hf_model(folder, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    source = CheckpointSource(folder)
    scheme = SCHEMES["int4"]
    artifact = export_artifact(source, tmp_path / "art", "fp16", quant=scheme)
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    layers = source.config.num_hidden_layers
    assert ops["MatMulNBits"] == 6 * layers + 1  # q, k, v, o, c_fc, c_proj per layer, and the head
    assert ops["GatherBlockQuantized"] == 1
    biased = [n for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6 and n.input[5]]
    assert len(biased) == 6 * layers  # every layer's biases are added by MatMulNBits, not by an Add after it
    initializers = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"} & set(initializers)
    assert not weights, f"float MatMul weights left: {sorted(weights)}"
    assert not any(len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT16 and t.dims[0] * t.dims[1] > 4096
                   for t in initializers.values())
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["graph"]["quantization"] == scheme.to_manifest()
    # a quarter of the fp16 weight bytes, give or take the scales and the unquantized biases and norms
    data = (artifact / "model.onnx.data").stat().st_size
    assert data < 0.45 * source.config.weight_bytes("fp16")


def test_fp16_int4_artifact_runs_through_the_runtime(tmp_path, helpers):
    from sc2deploy.runtime.onnxruntime import OrtRuntime

    folder = tmp_path / "ckpt"
    helpers.make_hf_model(folder, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    source = CheckpointSource(folder)
    scheme = QuantScheme(bits=4, block_size=32, accuracy_level=0, symmetric=True)
    artifact = export_artifact(source, tmp_path / "art", "fp16", quant=scheme)
    runtime = OrtRuntime(artifact)
    prompt = list(range(3, 30))
    logits = runtime.prefill(0, prompt, all_logits=True)
    expected = _eager_logits(DequantizedSource(source, scheme, "fp16"), torch.tensor([prompt]))[0]
    assert np.abs(logits.numpy() - expected).max() < 1e-2  # fp16 activations (parity's fp16 tolerance)


@pytest.mark.parametrize("argv, message", [
    (["--quant", "int4", "--block-size", "48"], "block_size must be one of"),
    (["--quant", "int4", "--block-size", "256"], "is not a multiple of the block size 256"),
    (["--quant", "int4", "--target", "trt"], "is for --target ort"),
    (["--block-size", "32"], "give --quant int8 or int4 too"),
    (["--quant", "int3"], "unknown --quant 'int3'"),
])
def test_bad_quantization_is_one_line_and_leaves_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "art"
    assert main(["export", "--size", "tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_quantized_artifact_is_refused_by_build_and_by_export(tmp_path, capsys):
    artifact = tmp_path / "art"
    assert main(["export", "--size", "tiny", "--quant", "int8", "--out", str(artifact)]) == 0
    with pytest.raises(UserError, match="is an int8-quantized ONNX Runtime artifact"):
        open_artifact_manifest(artifact, "trt")  # what `build` opens it with
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(artifact), "--quant", "int4", "--out", str(tmp_path / "again")]) == 2
    assert "this is an export artifact" in capsys.readouterr().err
