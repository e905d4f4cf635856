"""The TensorRT plugins without TensorRT: their register rules, autotune types, AOT launch plans and calling
conventions (run through Triton's interpreter on CPU), the AOT compilation to PTX, and the tensor views.

Tests marked with importorskip("tensorrt.plugin") need TensorRT and a GPU; they run on a GPU host
(scripts/gpu-check.sh runs this folder with TRITON_INTERPRET=0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from sc2deploy.attention import sliding_window_gqa_reference
from sc2deploy.plugins import triton_launch, trt_kernels
from sc2deploy.plugins import triton_kernel as tk
from sc2deploy.plugins.trt_rules import (ATTENTION, ROPE, SPECS, TACTICS, PluginRuleError, aot_extra_args,
                                         autotune_types, check_shapes, output_dtypes, output_shapes, plugin_hash,
                                         tactic_ids)

DEVICE = "cpu" if tk.INTERPRET else "cuda"
REPO = Path(__file__).resolve().parents[2]
ATTRS = dict(num_heads=4, kv_num_heads=2, local_window_size=8, scale=0.25)
OK = ["fp16", "fp16", "fp16", "fp16", "fp16", "int32", "int32", "fp32", "fp32"]  # RopeCache: the contract's inputs


# ---------------------------------------------------------------- register: dtypes and shapes
@pytest.mark.parametrize("act", ["fp16", "bf16", "fp32"])
def test_outputs_take_the_activation_dtype(act):
    dtypes = [act if d == "fp16" else d for d in OK]
    assert output_dtypes(ROPE, dtypes) == [act] * 4
    assert output_dtypes(ATTENTION, dtypes[:7]) == [act]


@pytest.mark.parametrize("index, dtype, message", [
    (1, "bf16", "input key is bf16, expected fp16 (like query)"),
    (3, "fp32", "input past_key is fp32, expected fp16"),
    (5, "int64", "input seqlens_k is int64, expected int32 (always)"),
    (6, "int64", "total_sequence_length is int64"),
    (7, "fp16", "input cos_cache is fp16, expected fp32 (always)"),
    (0, "int8", "query is int8; it must be one of fp16, bf16, fp32"),
])
def test_dtype_rule_names_the_input(index, dtype, message):
    dtypes = list(OK)
    dtypes[index] = dtype
    with pytest.raises(PluginRuleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        output_dtypes(ROPE, dtypes)


def test_attention_dtype_rule_names_its_inputs():
    with pytest.raises(PluginRuleError, match=r"SlidingWindowGQA: input k_rot is bf16, expected fp16 \(like q_rot\)"):
        output_dtypes(ATTENTION, ["fp16", "bf16"] + OK[2:7])
    with pytest.raises(PluginRuleError, match="SlidingWindowGQA takes 7 inputs"):
        output_dtypes(ATTENTION, OK)


def test_dtype_rule_counts_inputs():
    with pytest.raises(PluginRuleError, match="takes 9 inputs"):
        output_dtypes(ROPE, OK[:7])


def test_output_shapes_mirror_their_inputs():
    shapes = [("B", "S", 512), ("B", "S", 64), ("B", "S", 64), ("B", 2, "C", 32), ("B", 2, "C", 32), ("B",), (),
              (1024, 16), (1024, 16)]
    assert output_shapes(ROPE, shapes) == [shapes[0], shapes[1], shapes[3], shapes[4]]  # q_rot, k_rot, present
    assert output_shapes(ATTENTION, shapes[:7]) == [shapes[0]]  # output like q_rot
    assert [s.plugin_id for s in SPECS.values()] == ["sc2deploy::RopeCache", "sc2deploy::SlidingWindowGQA"]
    assert ROPE.outputs[:2] == ATTENTION.inputs[:2]  # RopeCache feeds the attention q_rot and k_rot
    assert ROPE.inputs[2:7] == ATTENTION.inputs[2:]  # the rest both read from the graph


def shapes_15b(seq=None, batch=None, capacity=4096):
    """RopeCache's input shapes at StarCoder2-15b's sizes; the attention's are the first seven."""
    return [(batch, seq, 48 * 128), (batch, seq, 512), (batch, seq, 512), (batch, 4, capacity, 128),
            (batch, 4, capacity, 128), (batch,), (), (16384, 64), (16384, 64)]


@pytest.mark.parametrize("spec", [ROPE, ATTENTION], ids=lambda s: s.name)
def test_static_shape_checks(spec):
    attrs = dict(num_heads=48, kv_num_heads=4, local_window_size=4096, scale=128 ** -0.5)

    def shapes(changes=None):
        full = shapes_15b()
        for i, shape in (changes or {}).items():
            full[i] = shape
        return full[:len(spec.inputs)]

    check_shapes(spec, shapes(), attrs)
    with pytest.raises(PluginRuleError, match=f"{spec.inputs[0]} width 3072 is not 48 heads x 128"):
        check_shapes(spec, shapes({0: (None, None, 48 * 64)}), attrs)
    with pytest.raises(PluginRuleError, match=f"{spec.inputs[1]} width 256 is not 4 heads x 128"):
        check_shapes(spec, shapes({1: (None, None, 256)}), attrs)
    h96 = {0: (None, None, 48 * 96), 1: (None, None, 4 * 96), 2: (None, None, 4 * 96), 3: (None, 4, 4096, 96),
           4: (None, 4, 4096, 96), 7: (16384, 48), 8: (16384, 48)}
    with pytest.raises(PluginRuleError, match="power of two"):
        check_shapes(spec, shapes(h96), attrs)
    with pytest.raises(PluginRuleError, match="multiple of kv_num_heads"):
        check_shapes(spec, shapes(), dict(attrs, kv_num_heads=5))
    with pytest.raises(PluginRuleError, match="rank"):
        check_shapes(spec, shapes({5: (None, 1)}), attrs)
    if spec is ROPE:
        with pytest.raises(PluginRuleError, match="cos_cache has 32 columns"):
            check_shapes(spec, shapes({7: (16384, 32)}), attrs)


# ---------------------------------------------------------------- autotune
def test_autotune_types_pair_activations_and_fix_the_rest():
    assert autotune_types(ROPE) == ", ".join(["FP16|BF16|FP32"] * 5 + ["INT32", "INT32", "FP32", "FP32"]
                                             + ["FP16|BF16|FP32"] * 4)
    assert autotune_types(ATTENTION) == ", ".join(["FP16|BF16|FP32"] * 5 + ["INT32", "INT32", "FP16|BF16|FP32"])
    assert autotune_types(ROPE, ("bf16",)).startswith("BF16, BF16, BF16, BF16, BF16, INT32")


def test_tactics_and_their_override():
    assert tactic_ids({}) == [1, 2, 3] and set(TACTICS.values()) == {"prefill", "decode", "compact"}
    assert tactic_ids({"SC2DEPLOY_TRT_TACTICS": "compact"}) == [3]
    assert tactic_ids({"SC2DEPLOY_TRT_TACTICS": "decode, prefill"}) == [1, 2]
    with pytest.raises(PluginRuleError, match="unknown tactic"):
        tactic_ids({"SC2DEPLOY_TRT_TACTICS": "fastest"})
    assert ATTENTION.tuned and not ROPE.tuned  # RopeCache has one launch configuration


@pytest.mark.parametrize("tactic", sorted(TACTICS.values()))
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_every_tactic_is_a_valid_kernel_config(tactic, dtype):
    config = trt_kernels.kernel_config(tactic, dtype, 48, 4, 128)
    triton_launch._check_config(48, 4, 128, config)


# ---------------------------------------------------------------- the AOT launch, symbolically
class Sym:
    """A symbolic dim that records the expression: what aot_impl's ShapeExprs go through."""

    def __init__(self, text):
        self.text = text

    def _op(self, op, other):
        if isinstance(other, Sym):
            return Sym(f"({self.text} {op} {other.text})")
        if not isinstance(other, int):
            raise TypeError(f"{op} with {type(other).__name__}")
        return Sym(f"({self.text} {op} {other})")

    def __add__(self, other):
        return self._op("+", other)

    def __mul__(self, other):
        return self._op("*", other)

    def __floordiv__(self, other):
        return self._op("//", other)

    def __sub__(self, other):
        return self._op("-", other)


INPUT_POINTERS = ["q_ptr", "k_ptr", "v_ptr", "past_k_ptr", "past_v_ptr", "seqlens_ptr", "total_ptr"]


def test_launch_plans_are_symbolic_in_batch_sequence_and_capacity():
    attrs = dict(num_heads=48, kv_num_heads=4, local_window_size=4096, scale=128 ** -0.5)
    b, s, c = Sym("B"), Sym("S"), Sym("C")
    rope = trt_kernels.launch_plan(ROPE, shapes_15b(s, b, c), attrs, "bf16")
    assert rope.kernel == "rope_cache_kernel" and rope.extra_args == (s, c)
    gx, gy, gz = rope.grid  # (column tiles + cache-copy tiles, Nq + Nkv heads, B)
    assert isinstance(gx, Sym) and "S" in gx.text and "C" in gx.text and gy == 52 and gz is b
    assert list(rope.signature) == INPUT_POINTERS + ["cos_ptr", "sin_ptr", "seq_len", "capacity", "q_rot_ptr",
                                                      "k_rot_ptr", "present_k_ptr", "present_v_ptr"]
    assert rope.constexprs["COPY_PAST"] is True  # present is not the past: the untouched slots are copied

    attention = trt_kernels.launch_plan(ATTENTION, shapes_15b(s, b, c)[:7], attrs, "bf16", "prefill")
    assert attention.kernel == "sliding_window_gqa_kernel" and attention.extra_args == (s, c)
    gx, gy, gz = attention.grid  # (query tiles, B * Nkv * group tiles, 1): no copy tiles
    assert isinstance(gx, Sym) and "S" in gx.text and "C" not in gx.text and "B" in gy.text and gz == 1
    assert list(attention.signature) == INPUT_POINTERS + ["seq_len", "capacity", "out_ptr"]
    assert attention.signature["q_ptr"] == "*bf16" and attention.signature["seq_len"] == "i32"
    assert attention.constexprs["FUSED"] is False and attention.constexprs["cos_ptr"] is None
    assert attention.constexprs["WINDOW"] == 4096 and attention.constexprs["HEAD_DIM"] == 128
    assert aot_extra_args(ATTENTION, shapes_15b(s, b, c)[:7]) == [s, c]


def test_tactics_pick_the_attention_tiles():
    attrs = dict(num_heads=48, kv_num_heads=4, local_window_size=4096, scale=128 ** -0.5)
    tiles = {t: trt_kernels.launch_plan(ATTENTION, shapes_15b(Sym("S"), Sym("B"))[:7], attrs, "fp16", t).constexprs
             for t in TACTICS.values()}
    assert (tiles["prefill"]["BLOCK_M"], tiles["prefill"]["BLOCK_N"]) == (128, 64)  # the two-kernel path's prefill
    assert (tiles["decode"]["BLOCK_M"], tiles["decode"]["BLOCK_N"]) == (16, 64)
    assert (tiles["compact"]["BLOCK_M"], tiles["compact"]["BLOCK_N"]) == (32, 16)


@pytest.mark.parametrize("spec", [ROPE, ATTENTION], ids=lambda s: s.name)
def test_launch_plan_needs_a_static_head_size(spec):
    shapes = shapes_15b(Sym("S"), Sym("B"))[:len(spec.inputs)]
    shapes[3] = (Sym("B"), 4, Sym("C"), Sym("H"))
    with pytest.raises(PluginRuleError, match="head size"):
        trt_kernels.launch_plan(spec, shapes, dict(ATTRS, num_heads=48, kv_num_heads=4), "fp16", "decode")


# ---------------------------------------------------------------- the AOT calling conventions compute the contract
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CASES = {  # (Nq, Nkv, H, S, W, C, dtype, rows): first prompts, padding, chunks with a past, decode, ring wraps
    "prefill-padded-ring": (4, 2, 16, 12, 8, 8, torch.float32, dict(lengths=[12, 7])),
    "prefill-no-window": (4, 1, 32, 10, 0, 16, torch.float16, dict(lengths=[10, 3])),
    "chunk-with-past": (4, 2, 16, 3, 8, 8, torch.bfloat16, dict(past=[10, 20])),
    "chunk-longer-than-ring": (2, 2, 16, 12, 6, 4, torch.float32, dict(past=[5])),
    "decode-wrapped": (6, 2, 16, 1, 8, 8, torch.float16, dict(past=[40, 3, 17])),
    "decode-linear-cache": (4, 2, 16, 1, 32, 64, torch.bfloat16, dict(past=[9, 30])),
}


def run_plugins(args, tactic, fill=None):
    """RopeCache then SlidingWindowGQA, each launched as TensorRT launches it, into fresh buffers (filled with
    `fill` if given: every element must be written); returns (output, present_key, present_value)."""
    def buffers(spec, inputs):
        new = torch.empty_like if fill is None else (lambda t: torch.full_like(t, fill))
        return [new(inputs[i]) for i in spec.like]

    rope_in = [args[name] for name in ROPE.inputs]
    q_rot, k_rot, present_key, present_value = rope_out = buffers(ROPE, rope_in)
    trt_kernels.launch_like_tensorrt(ROPE, rope_in, rope_out, {n: args[n] for n in ROPE.attribute_names})
    values = dict(args, q_rot=q_rot, k_rot=k_rot)
    attention_in = [values[name] for name in ATTENTION.inputs]
    (output,) = attention_out = buffers(ATTENTION, attention_in)
    trt_kernels.launch_like_tensorrt(ATTENTION, attention_in, attention_out,
                                     {n: args[n] for n in ATTENTION.attribute_names}, tactic)
    return output, present_key, present_value


@pytest.mark.parametrize("tactic", sorted(TACTICS.values()))
@pytest.mark.parametrize("case", sorted(CASES))
def test_tensorrt_calling_conventions_compute_the_contract(case, tactic):
    nq, nkv, h, s, w, c, dtype, rows = CASES[case]
    batch = len(rows.get("lengths") or rows.get("past"))
    args = gpu_check.make_inputs(batch=batch, seq_len=s, num_heads=nq, kv_heads=nkv, head_dim=h, capacity=c, window=w,
                                 dtype=dtype, device=DEVICE, **rows)
    got = run_plugins(args, tactic)
    ref = sliding_window_gqa_reference(**args)
    torch.testing.assert_close(got[0], ref[0], atol=DTYPE_TOL[dtype], rtol=0)
    for present, want in zip(got[1:], ref[1:]):
        if tk.INTERPRET:
            assert torch.equal(present, want)  # the present cache: exactly the reference's ring
        else:
            torch.testing.assert_close(present, want, atol=DTYPE_TOL[dtype], rtol=0)


def test_plugins_write_every_element_of_tensorrts_buffers():
    args = gpu_check.make_inputs(batch=2, seq_len=5, num_heads=4, kv_heads=2, head_dim=16, capacity=8, window=8,
                                 dtype=torch.float16, device=DEVICE, lengths=[5, 2])
    for got, want in zip(run_plugins(args, "decode", fill=float("nan")), sliding_window_gqa_reference(**args)):
        torch.testing.assert_close(got, want, atol=4e-3, rtol=0)  # NaN left anywhere would fail


# ---------------------------------------------------------------- TensorRT tensors as torch views
def test_cuda_array_interface_of_tensorrt_buffers():
    cai = trt_kernels.cuda_array_interface(4096, (2, 3), (3, 1), "bf16")
    assert cai == {"shape": (2, 3), "typestr": "<i2", "data": (4096, False), "strides": (6, 2), "version": 3,
                   "stream": None}
    assert trt_kernels.cuda_array_interface(8, (), (), "int32")["shape"] == ()
    assert trt_kernels.cuda_array_interface(8, (4,), (1,), "fp32")["strides"] == (4,)
    with pytest.raises(PluginRuleError):
        trt_kernels.cuda_array_interface(8, (4,), (1,), "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_as_torch_views_device_memory_bf16_included():
    class FakeTensor:  # the attributes of tensorrt.plugin.Tensor that as_torch reads
        def __init__(self, t):
            self.data_ptr, self.shape, self.strides = t.data_ptr(), tuple(t.shape), t.stride()

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.int32, "int32")):
        t = torch.arange(12, device="cuda").to(dtype).view(3, 4)
        view = trt_kernels.as_torch(FakeTensor(t), name)
        assert view.dtype == dtype and view.data_ptr() == t.data_ptr() and torch.equal(view, t)


# ---------------------------------------------------------------- metadata, hashes
class Meta:
    def __init__(self, **fields):
        self.name, self.num_warps, self.shared = "k", 4, 1024
        self.__dict__.update(fields)


class Compiled:
    def __init__(self, **fields):
        self.metadata = Meta(**fields)
        self.asm = {"ptx": ".version 8.7\n.target sm_90\n.entry k(\n.param .u64 a\n)\n"}


def test_launch_metadata_checks():
    ok = trt_kernels.check_launch_metadata(Compiled(global_scratch_size=0, profile_scratch_size=0, num_ctas=1))
    assert (ok.name, ok.num_warps, ok.shared_mem, ok.ptx_version) == ("k", 4, 1024, 87)
    assert trt_kernels.ptx_entry_params(ok.ptx, "k") == 1
    for bad in (dict(global_scratch_size=256), dict(num_ctas=2), dict(launch_pdl=True)):
        with pytest.raises(RuntimeError, match="AOT plugin"):
            trt_kernels.check_launch_metadata(Compiled(**bad))


def test_plugin_hash_follows_the_sources(tmp_path):
    from sc2deploy.plugins import trt_rules

    assert plugin_hash() == plugin_hash() and len(plugin_hash()) == 64
    for name in trt_rules.PLUGIN_SOURCES:
        (tmp_path / name).write_bytes((REPO / "sc2deploy" / "plugins" / name).read_bytes())
    assert plugin_hash(tmp_path) == plugin_hash()
    with open(tmp_path / "triton_kernel.py", "a") as f:
        f.write("\n# changed\n")
    assert plugin_hash(tmp_path) != plugin_hash()


# ---------------------------------------------------------------- AOT: PTX for sm_90, no GPU needed
AOT_SCRIPT = textwrap.dedent("""
    import json, sys
    from triton.backends.compiler import GPUTarget
    from sc2deploy.plugins import trt_kernels
    from sc2deploy.plugins.trt_rules import ATTENTION, ROPE, TACTICS
    shapes = [(2, 5, 48 * 128), (2, 5, 512), (2, 5, 512), (2, 4, 4096, 128), (2, 4, 4096, 128), (2,), (),
              (16384, 64), (16384, 64)]
    attrs = dict(num_heads=48, kv_num_heads=4, local_window_size=4096, scale=128 ** -0.5)
    out = {}
    for dtype in sys.argv[1].split(","):
        builds = [(ROPE, "prefill")] + [(ATTENTION, tactic) for tactic in TACTICS.values()]
        for spec, tactic in builds:
            k, plan = trt_kernels.compile_for_aot(spec, shapes[:len(spec.inputs)], attrs, dtype, tactic,
                                                  target=GPUTarget("cuda", 90, 32))
            key = f"{dtype}/{spec.name}" + (f"/{tactic}" if spec.tuned else "")
            out[key] = dict(name=k.name, warps=k.num_warps, shared=k.shared_mem, isa=k.ptx_version,
                            params=trt_kernels.ptx_entry_params(k.ptx, k.name), block_x=k.num_warps * 32,
                            signature=len(plan.signature))
    print(json.dumps(out))
""")


def test_aot_kernels_compile_to_ptx_for_hopper(tmp_path):
    """What each aot_impl returns, built here for sm_90 by Triton's own ptxas (no GPU, no TensorRT)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, "bf16,fp16"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result) == 8  # per dtype: RopeCache, and SlidingWindowGQA for each tactic
    # TensorRT passes the input pointers, 2 int32 scalars and the output pointers; Triton may append hidden
    # scratch pointers, which TensorRT pads with null (the metadata check refuses kernels that use them).
    for key, k in result.items():
        if "RopeCache" in key:
            assert k["name"] == "rope_cache_kernel" and k["signature"] == 9 + 2 + 4, key
        else:
            assert k["name"] == "sliding_window_gqa_kernel" and k["signature"] == 7 + 2 + 1, key
        assert k["signature"] <= k["params"] <= k["signature"] + 2, key
        assert k["shared"] <= 227 * 1024, key  # Hopper's limit per block
        assert k["block_x"] in (128, 256), key
    for dtype in ("bf16", "fp16"):  # the launches that need no dynamic-shared-memory opt-in
        assert result[f"{dtype}/RopeCache"]["shared"] <= 48 * 1024
        assert result[f"{dtype}/SlidingWindowGQA/compact"]["shared"] <= 48 * 1024


def test_plugin_functions_take_each_specs_inputs_and_attributes():
    """tensorrt.plugin reads the I/O and attributes from the decorated functions' parameters (trt_plugin.py):
    they must be each OpSpec's, in order. Checked on the source, since tensorrt cannot be imported here."""
    import ast

    tree = ast.parse((REPO / "sc2deploy" / "plugins" / "trt_plugin.py").read_text())
    seen = set()
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        for deco in fn.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
                continue
            kind, spec = deco.func.attr, {"ROPE": ROPE, "ATTENTION": ATTENTION}[deco.args[0].value.id]
            params = [a.arg for a in fn.args.args]
            attributes = [] if kind == "autotune" else list(spec.attribute_names)
            tail = {"register": [], "autotune": ["outputs"], "aot_impl": ["outputs", "tactic"],
                    "impl": ["outputs", "stream"] + (["tactic"] if spec.tuned else [])}[kind]
            assert params == list(spec.inputs) + attributes + tail, (fn.name, params)
            seen.add((spec.name, kind))
    assert seen == {(name, kind) for name in SPECS for kind in ("register", "autotune", "aot_impl", "impl")}


# ---------------------------------------------------------------- with TensorRT (a GPU host)
def test_plugins_register_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin")
    from sc2deploy.plugins import trt_plugin

    assert trt_plugin.register_plugins() == ["sc2deploy::RopeCache", "sc2deploy::SlidingWindowGQA"]
    import tensorrt as trt

    for name in SPECS:
        assert trt.get_plugin_registry().get_creator(name, "1", "sc2deploy") is not None
        assert hasattr(trtp.op.sc2deploy, name)


@pytest.mark.parametrize("aot", [True, False])
def test_plugins_in_a_one_layer_engine_match_the_reference(aot):
    """RopeCache -> SlidingWindowGQA in a network, built and run by TensorRT, against the reference (GPU + TensorRT)."""
    pytest.importorskip("tensorrt.plugin")
    if not torch.cuda.is_available() or tk.INTERPRET:
        pytest.skip("needs a GPU and TRITON_INTERPRET=0")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from sc2deploy.plugins import trt_plugin

    trt_plugin.register_plugins()
    args = gpu_check.make_inputs(batch=2, seq_len=6, num_heads=4, kv_heads=2, head_dim=16, capacity=8, window=8,
                                 dtype=torch.float16, device="cuda", lengths=[6, 4])
    inputs = {name: args[name].contiguous() for name in ROPE.inputs}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    dtypes = {torch.float16: trt.float16, torch.int32: trt.int32, torch.float32: trt.float32}
    tensors = {n: network.add_input(n, dtypes[t.dtype], tuple(t.shape)) for n, t in inputs.items()}
    rope = network.add_plugin(trtp.op.sc2deploy.RopeCache(*tensors.values(),
                                                          **{n: args[n] for n in ROPE.attribute_names}), aot=aot)
    tensors.update(q_rot=rope.get_output(0), k_rot=rope.get_output(1))
    attention = network.add_plugin(trtp.op.sc2deploy.SlidingWindowGQA(
        *[tensors[n] for n in ATTENTION.inputs], **{n: args[n] for n in ATTENTION.attribute_names}), aot=aot)
    marked = {"output": attention.get_output(0), "present_key": rope.get_output(2), "present_value": rope.get_output(3)}
    for name, tensor in marked.items():
        tensor.name = name
        network.mark_output(tensor)
    engine = trt.Runtime(logger).deserialize_cuda_engine(
        builder.build_serialized_network(network, builder.create_builder_config()))
    context = engine.create_execution_context()
    outputs = {"output": torch.empty_like(inputs["query"]), "present_key": torch.empty_like(inputs["past_key"]),
               "present_value": torch.empty_like(inputs["past_value"])}
    for name, t in {**inputs, **outputs}.items():
        context.set_tensor_address(name, t.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    for name, want in zip(outputs, sliding_window_gqa_reference(**args)):
        torch.testing.assert_close(outputs[name], want, atol=4e-3, rtol=0)
