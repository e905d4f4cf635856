"""The TensorRT runtime's bookkeeping, against the eager model, with a stand-in engine on the CPU.

TensorRT cannot be installed here, so `FakeEngine` plays the engine: it reads its inputs from
the addresses the runtime binds (raw pointers, as TensorRT does), checks every shape against the
optimization profile of its context (the profiles `sc2deploy build` would give TensorRT), runs
the reference model - which is what the engine computes - and writes logits and the present
caches to the bound output addresses. What this checks is everything the runtime does around
the engine: profiles per phase, the ping-pong KV buffers, chunked prefill, batches of unequal
rows, decoding a subset of slots, buffer swaps. What it cannot check is TensorRT itself.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from sc2deploy.build import Artifact, engine_manifest, resolve_settings
from sc2deploy.contract import (ARTIFACT, ATTENTION_MASK, INPUT_IDS, LOGITS, MANIFEST, Manifest, graph_io, past_name,
                                present_name)
from sc2deploy.checkpoint import RandomSource, load_model
from sc2deploy.config import preset
from sc2deploy.errors import UserError
from sc2deploy.runtime.eager import EagerRuntime
from sc2deploy.runtime.tensorrt import TrtRuntime
from sc2deploy.runtime.trt_engine import TrtEngine

SEED = 11
DTYPES = {"FLOAT": torch.float32, "INT64": torch.int64}


class FakeDataType:
    FLOAT, HALF, BF16, INT64, INT32 = "FLOAT", "HALF", "BF16", "INT64", "INT32"


class FakeTrt:
    """The bits of the tensorrt module the runtime touches."""

    __version__ = "fake"
    DataType = FakeDataType

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user-managed"


def tensor_at(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-copy CPU tensor over raw memory, as TensorRT sees a bound address."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buffer = (ctypes.c_byte * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}
        self.calls = 0

    def set_device_memory(self, address: int, size: int) -> None:
        assert size >= 0 and address

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        lo, _, hi = self.engine.profiles[self.profile]["shapes"][name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            self.engine.rejected.append((self.profile, name, tuple(shape)))
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        engine, layers = self.engine, self.engine.config.num_hidden_layers
        ids = tensor_at(self.addresses[INPUT_IDS], self.shapes[INPUT_IDS], torch.int64)
        mask = tensor_at(self.addresses[ATTENTION_MASK], self.shapes[ATTENTION_MASK], torch.int64)
        past, outputs = [], {}
        for layer in range(layers):
            pair = []
            for kind in ("key", "value"):
                name = past_name(layer, kind)
                shape = self.shapes[name]
                pair.append(tensor_at(self.addresses[name], shape, torch.float32).clone())
                out = present_name(layer, kind)
                assert self.addresses[out] != self.addresses[name], "present aliases past: TensorRT forbids it"
                outputs[out] = tensor_at(self.addresses[out], shape, torch.float32)
            past.append(tuple(pair))
        with torch.inference_mode():
            logits, presents = engine.model(ids.clone(), mask.clone(), past)
        tensor_at(self.addresses[LOGITS], tuple(logits.shape), torch.float32).copy_(logits)
        for layer, (k, v) in enumerate(presents):
            outputs[present_name(layer, "key")].copy_(k)
            outputs[present_name(layer, "value")].copy_(v)
        engine.calls.append((self.profile, tuple(ids.shape), tuple(mask.shape)))
        return True


class FakeEngine:
    """A deserialized engine: the reference model behind TensorRT's engine/context API."""

    num_optimization_profiles = 2

    def __init__(self, model, manifest: Manifest):
        self.model, self.config = model, model.config
        self.profiles = manifest.details["profiles"]
        inputs, outputs = graph_io(self.config.num_hidden_layers, "trt")
        self.names = inputs + outputs
        self.calls: list[tuple] = []
        self.rejected: list[tuple] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> str:
        return FakeDataType.INT64 if name in (INPUT_IDS, ATTENTION_MASK) else FakeDataType.FLOAT

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return 4096

    def create_execution_context(self, strategy) -> FakeContext:
        assert strategy == FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED
        return FakeContext(self)


def fake_runtime(tmp_path, max_batch=4, engine_batch=4, max_input_len=16, max_seq_len=256):
    config = preset("tiny")
    settings = resolve_settings(config, "fp32", max_batch=engine_batch, max_input_len=max_input_len,
                                max_seq_len=max_seq_len)
    exported = Manifest(ARTIFACT, config.to_hf_dict(), "fp32", details={"target": "trt",
                                                                      "source": {"kind": "random", "seed": SEED}})
    artifact = Artifact(tmp_path, exported, config, "fp32", tmp_path / "model.onnx")
    manifest = engine_manifest(artifact=artifact, settings=settings, tensorrt_version="fake",
                               gpu={"name": "cpu", "compute_capability": "0.0"}, plugin_hash="x", build_seconds=0.0,
                               engine_bytes=0, engine_sha256="")
    manifest = Manifest.from_json(__import__("json").loads(__import__("json").dumps(manifest.to_json())),
                                  tmp_path / MANIFEST)  # as read back from sc2deploy.json
    engine = FakeEngine(load_model(RandomSource(config, SEED), "fp32"), manifest)
    loaded = TrtEngine(FakeTrt, engine, manifest, tmp_path, torch.device("cpu"))
    runtime = TrtRuntime(loaded, max_batch=max_batch)
    return runtime, engine


@pytest.fixture
def pair(tmp_path):
    runtime, engine = fake_runtime(tmp_path)
    eager = EagerRuntime(RandomSource(preset("tiny"), SEED), dtype="fp32", max_batch=4)
    return runtime, eager, engine


def close(a, b):
    torch.testing.assert_close(a.float(), b.float(), atol=2e-5, rtol=1e-5)


def prompt(n, offset=0):
    return [(7 * i + 3 + offset) % 49152 for i in range(n)]


def test_capacity_and_limits(pair):
    runtime, _, _ = pair
    assert runtime.capacity == 32  # min(--max-seq-len 256, window 32): a ring, not the whole context
    assert (runtime.max_batch, runtime.max_input_len, runtime.max_seq_len) == (4, 16, 256)
    assert runtime.describe()["runtime"] == "trt"


def test_prefill_then_decode_past_the_window(pair):
    runtime, eager, engine = pair
    ids = prompt(12)
    close(runtime.prefill(1, ids), eager.prefill(1, ids))
    token = 5
    for _ in range(40):  # 12 + 40 > window 32: the ring wraps
        got, want = runtime.decode([1], [token]), eager.decode([1], [token])
        close(got, want)
        token = int(want[0].argmax())
    assert runtime.length(1) == eager.length(1) == 52
    assert {p for p, _, _ in engine.calls} == {0, 1} and not engine.rejected
    assert all(ids_shape[1] == 1 for p, ids_shape, _ in engine.calls if p == 1)  # decode profile: one token per row


def test_long_prompt_is_prefilled_in_chunks(pair):
    runtime, eager, engine = pair
    ids = prompt(45)  # > --max-input-len 16 and > window 32
    close(runtime.prefill(0, ids, all_logits=True), eager.prefill(0, ids, all_logits=True))
    assert [ids_shape[1] for _, ids_shape, _ in engine.calls] == [16, 16, 13]
    assert [mask_shape[1] for _, _, mask_shape in engine.calls] == [16, 32, 45]
    close(runtime.decode([0], [9]), eager.decode([0], [9]))


def test_batch_of_unequal_prompts_and_decoding_subsets(pair):
    runtime, eager, engine = pair
    prompts = [prompt(3), prompt(14, 1), prompt(9, 2), prompt(1, 3)]
    for got, want in zip(runtime.prefill_batch(prompts), eager.prefill_batch(prompts)):
        close(got, want)
    assert engine.calls[-1][1] == (4, 14)  # one call, right-padded
    tokens = {0: 11, 1: 12, 2: 13, 3: 14}
    for slots in ([0, 2], [3], [1, 2, 3], [0, 1, 2, 3], [2, 0], [0, 1, 2, 3], [1, 3]):
        got = runtime.decode(slots, [tokens[s] for s in slots])
        want = eager.decode(slots, [tokens[s] for s in slots])
        close(got, want)
        for s, row in zip(slots, want):
            tokens[s] = int(row.argmax())
    assert not engine.rejected
    for s in range(4):
        assert runtime.length(s) == eager.length(s)


def test_new_prompt_in_a_used_slot(pair):
    runtime, eager, _ = pair
    for rt in (runtime, eager):
        rt.prefill(2, prompt(20))
        rt.decode([2], [4])
    close(runtime.prefill(2, prompt(6, 5)), eager.prefill(2, prompt(6, 5)))
    close(runtime.decode([2], [8]), eager.decode([2], [8]))


def test_limits_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="batches of at most 2"):
        fake_runtime(tmp_path, max_batch=3, engine_batch=2)
    runtime, _ = fake_runtime(tmp_path, max_seq_len=24)
    with pytest.raises(UserError, match="--max-seq-len 24"):
        runtime.prefill(0, prompt(25))
    runtime.prefill(0, prompt(24))
    with pytest.raises(UserError, match="--max-seq-len"):
        runtime.decode([0], [1])


def test_constructor_without_tensorrt_says_what_to_install(tmp_path):
    from sc2deploy.plugins.trt_env import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(UserError, match="Dockerfile.gpu"):
        TrtRuntime(tmp_path)
