"""--target trt: the SlidingWindowGQA plugin node, checked by onnx and, rewritten to ONNX Runtime's GQA, run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from sc2deploy.checkpoint import CheckpointSource

PLUGIN_ATTRS = {"plugin_namespace": b"sc2deploy", "plugin_version": b"1", "num_heads": 4, "kv_num_heads": 2,
                "head_size": 16, "local_window_size": 8, "max_position_embeddings": 512}


def plugin_nodes(model):
    return [n for n in model.graph.node if n.op_type == "SlidingWindowGQA"]


def rewrite_plugins_to_gqa(model) -> None:
    """Each SlidingWindowGQA node -> com.microsoft GroupQueryAttention on the same inputs (the ort target's node)."""
    for node in plugin_nodes(model):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q, seqlens_k, total = node.input[0], node.input[5], node.input[6]
        p = node.name
        extra = [
            helper.make_node("Shape", [q], [f"{p}/s64"], start=1, end=2),
            helper.make_node("Cast", [f"{p}/s64"], [f"{p}/s"], to=onnx.TensorProto.INT32),
            helper.make_node("Equal", [f"{p}/s", total], [f"{p}/first"]),
            helper.make_node("Add", [seqlens_k, "one_i32"], [f"{p}/t"]),
            helper.make_node("Where", [f"{p}/first", f"{p}/t", f"{p}/s"], [f"{p}/qsl"]),
        ]
        gqa = helper.make_node(
            "GroupQueryAttention", list(node.input) + [""] * 7 + [f"{p}/qsl"], list(node.output), domain="com.microsoft",
            num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"], scale=attrs["scale"],
            local_window_size=attrs["local_window_size"], do_rotary=1, rotary_interleaved=0, sliding_window_cache=1)
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new in enumerate(extra + [gqa]):
            model.graph.node.insert(index + offset, new)
    model.graph.initializer.append(helper.make_tensor("one_i32", onnx.TensorProto.INT32, [], [1]))
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def test_plugin_graph_passes_the_checker_and_carries_the_plugin_attributes(store):
    artifact = store.artifact(target="trt")
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    nodes = plugin_nodes(model)
    assert len(nodes) == 2 and not [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert {k: attrs[k] for k in PLUGIN_ATTRS} == PLUGIN_ATTRS
    assert attrs["rope_theta"] == pytest.approx(10000.0) and attrs["scale"] == pytest.approx(0.25)
    assert nodes[0].domain == "trt.plugins" and len(nodes[0].input) == 9
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[nodes[0].input[7]].data_type == onnx.TensorProto.FLOAT  # the contract's float32 RoPE tables
    assert "logits_to_keep" not in {i.name for i in model.graph.input}


def test_plugin_graph_rewritten_to_gqa_gives_the_ort_exports_logits(store, helpers, tmp_path):
    import onnxruntime as ort

    folder, _ = store.checkpoint()
    config = CheckpointSource(folder).config
    trt_model = onnx.load(str(store.artifact(target="trt") / "model.onnx"))  # with its external weights
    rewrite_plugins_to_gqa(trt_model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    rewritten = ort.InferenceSession(trt_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ids = helpers.random_ids(config.vocab_size, (2, 3 * config.sliding_window + 5), seed=4)
    got = helpers.run_prompt(rewritten, config, ids, lengths=[ids.shape[1], 13])
    expected = helpers.run_prompt(helpers.ort_session(store.artifact()), config, ids, lengths=[ids.shape[1], 13])
    assert np.abs(got[0] - expected[0]).max() < 1e-6
    assert np.abs(got[1, :13] - expected[1, :13]).max() < 1e-6


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_plugin_exports_pass_the_checker(store, dtype):
    model_path = store.artifact(dtype=dtype, target="trt") / "model.onnx"
    onnx.checker.check_model(str(model_path), full_check=True)
    model = onnx.load(str(model_path), load_external_data=False)
    elem = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}[dtype]
    assert model.graph.output[0].type.tensor_type.elem_type == elem
    assert model.graph.input[2].type.tensor_type.elem_type == elem
