"""--target trt: the RopeCache and SlidingWindowGQA plugin nodes, checked by onnx and, rewritten to ONNX Runtime's
GQA, run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from sc2deploy.checkpoint import CheckpointSource
from sc2deploy.plugins.trt_rules import ATTENTION, ROPE

PLUGIN_ATTRS = {"plugin_namespace": b"sc2deploy", "plugin_version": b"1", "num_heads": 4, "kv_num_heads": 2,
                "head_size": 16}


def nodes_of(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_plugins_to_gqa(model) -> None:
    """Each RopeCache -> SlidingWindowGQA pair -> one com.microsoft GroupQueryAttention (the ort target's node)."""
    rope_of = {n.output[0]: n for n in nodes_of(model, ROPE.name)}  # by q_rot
    for node in nodes_of(model, ATTENTION.name):
        rope = rope_of.pop(node.input[0])
        attrs = attributes(node)
        q, seqlens_k, total = rope.input[0], rope.input[5], rope.input[6]
        p = node.name
        extra = [
            helper.make_node("Shape", [q], [f"{p}/s64"], start=1, end=2),
            helper.make_node("Cast", [f"{p}/s64"], [f"{p}/s"], to=onnx.TensorProto.INT32),
            helper.make_node("Equal", [f"{p}/s", total], [f"{p}/first"]),
            helper.make_node("Add", [seqlens_k, "one_i32"], [f"{p}/t"]),
            helper.make_node("Where", [f"{p}/first", f"{p}/t", f"{p}/s"], [f"{p}/qsl"]),
        ]
        gqa = helper.make_node(
            "GroupQueryAttention", list(rope.input) + [""] * 7 + [f"{p}/qsl"], [node.output[0], *rope.output[2:]],
            domain="com.microsoft", num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
            scale=attrs["scale"], local_window_size=attrs["local_window_size"], do_rotary=1, rotary_interleaved=0,
            sliding_window_cache=1)
        index = list(model.graph.node).index(rope)  # every input is ready there; every consumer comes later
        model.graph.node.remove(node)
        model.graph.node.remove(rope)
        for offset, new in enumerate(extra + [gqa]):
            model.graph.node.insert(index + offset, new)
    assert not rope_of, "a RopeCache node feeds no SlidingWindowGQA"
    model.graph.initializer.append(helper.make_tensor("one_i32", onnx.TensorProto.INT32, [], [1]))
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def test_plugin_graph_passes_the_checker_and_carries_the_plugin_attributes(store):
    artifact = store.artifact(target="trt")
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    ropes, attentions = nodes_of(model, ROPE.name), nodes_of(model, ATTENTION.name)
    assert len(ropes) == len(attentions) == 2 and not nodes_of(model, "GroupQueryAttention")
    for rope, attention in zip(ropes, attentions):
        for node, spec in ((rope, ROPE), (attention, ATTENTION)):
            attrs = attributes(node)
            assert {k: attrs[k] for k in PLUGIN_ATTRS} == PLUGIN_ATTRS and set(spec.attribute_names) <= set(attrs)
            assert node.domain == "trt.plugins"
            assert (len(node.input), len(node.output)) == (len(spec.inputs), len(spec.outputs))
        # RopeCache: the contract's inputs; its q_rot and k_rot feed the attention, which reads value and the past
        assert list(attention.input) == [*rope.output[:2], *rope.input[2:7]]
        assert attributes(rope)["rope_theta"] == pytest.approx(10000.0)
        assert attributes(rope)["max_position_embeddings"] == 512
        assert attributes(attention)["scale"] == pytest.approx(0.25)
        assert attributes(attention)["local_window_size"] == 8
    graph_outputs = [o.name for o in model.graph.output]
    assert [o for n in ropes for o in n.output[2:]] == graph_outputs[1:]  # present.N.key/.value
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[ropes[0].input[7]].data_type == onnx.TensorProto.FLOAT  # the contract's float32 RoPE tables
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
