"""Weight-only block quantization (sc2deploy.export.quantize) against ONNX Runtime itself.

- The bytes equal ORT's own quantizer (quantize_matmul_4bits/_8bits, MLAS MlasQuantizeBlockwise) exactly,
  rounding ties included: there is no tolerance, because the numerics are replicated operation by operation
  (float32 reciprocal then product then sum, C's roundf, the sign of an all-zero block's scale).
- MatMulNBits on our bytes equals A @ dequantize_matmul(q).T within rigorous bounds: float32 accumulation
  (K * 2^-24 * |A| @ |W'|^T) at accuracy_level 0; plus, at accuracy_level 4, the int8 quantization of A per
  block of block_size (|error| <= max|A_block| / 254 per element); plus half an ulp for fp16 outputs.
- GatherBlockQuantized returns dequantize_gather's rows rounded to the output dtype, bit for bit.
- Layouts that are wrong in a plausible way break those bounds by orders of magnitude.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from sc2deploy.errors import UserError
from sc2deploy.export.quantize import (QuantizedMatMul, dequantize_gather, dequantize_matmul, iter_quantized_rows,
                                       matmul_attributes, quantize_gather, quantize_matmul, quantize_matmul_rows,
                                       unpack_levels)
from sc2deploy.quantization import SCHEMES, QuantScheme

DTYPES = {"fp32": (torch.float32, np.float32), "fp16": (torch.float16, np.float16)}


def scheme(bits: int, symmetric: bool, block_size: int = 32, accuracy_level: int = 0) -> QuantScheme:
    return QuantScheme(bits=bits, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric)


def awkward_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows at several magnitudes, plus rows of rounding ties, outliers, zero blocks, negative blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 10.0 ** torch.empty(n, 1).uniform_(-3, 1, generator=g)
    w[0::5] = torch.round(w[0::5] * 4) / 4  # quarters: w / s + zp often lands exactly on x.5
    w[1::5, ::7] *= 50
    w[2::5, :16] = 0.0
    w[2::5, 1:16:2] = -0.0  # zeros of both signs
    w[3::5] = -w[3::5].abs()
    return w


# --- the scheme ---------------------------------------------------------------------------------------------

def test_scheme_manifest_round_trip_and_names():
    for name, s in SCHEMES.items():
        assert s.name == name
        assert QuantScheme.from_manifest(s.to_manifest()) == s
    assert scheme(4, True, 64, 4).to_manifest() == {"bits": 4, "block_size": 64, "accuracy_level": 4, "symmetric": True}


def test_node_attributes():
    q = quantize_matmul(torch.randn(48, 64), scheme(4, False, 16, 0), torch.float32)
    assert q.attributes() == {"K": 64, "N": 48, "bits": 4, "block_size": 16}  # level 0 left out, as ORT does
    assert matmul_attributes(scheme(8, True, 32, 4), 64, 48) == {"K": 64, "N": 48, "bits": 8, "block_size": 32,
                                                                 "accuracy_level": 4}
    g = quantize_gather(torch.randn(48, 64), scheme(8, True, 64), torch.float16)
    assert g.attributes() == {"bits": 8, "block_size": 64, "gather_axis": 0, "quantize_axis": 1}


@pytest.mark.parametrize("bad, message", [
    ({"bits": 3}, "bits must be one of 4, 8"),
    ({"bits": True}, "bits must be one of"),
    ({"block_size": 48}, "block_size must be one of 16, 32, 64, 128, 256"),
    ({"block_size": 512}, "block_size must be one of"),
    ({"accuracy_level": 5}, "accuracy_level must be one of 0, 1, 2, 3, 4"),
    ({"symmetric": 1}, "symmetric must be true or false"),
    ({"group": 1}, "unknown field(s) group"),
])
def test_bad_manifest_fields_are_value_errors(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantScheme.from_manifest({**SCHEMES["int4"].to_manifest(), **bad})


def test_incomplete_or_non_object_manifests_are_value_errors():
    with pytest.raises(ValueError, match="lacks field.*block_size"):
        QuantScheme.from_manifest({"bits": 4, "accuracy_level": 0, "symmetric": False})
    with pytest.raises(ValueError, match="must be an object"):
        QuantScheme.from_manifest([4, 32, 0, False])


def test_a_block_size_that_does_not_divide_k_is_a_one_line_user_error():
    with pytest.raises(UserError) as caught:
        quantize_matmul(torch.randn(4, 48), scheme(4, False, 32), torch.float32, name="layers.0.mlp.c_fc")
    message = str(caught.value)
    assert "\n" not in message
    assert "layers.0.mlp.c_fc" in message and "48" in message and "block size 32" in message
    assert "use a block size that divides 48 (16)" in message
    with pytest.raises(UserError, match="no block size from 16 to 256 divides 100: export it unquantized"):
        SCHEMES["int8"].check_dimension(100, "lm_head")
    SCHEMES["int8"].check_dimension(3 * SCHEMES["int8"].block_size, "lm_head")


def test_non_finite_weights_are_refused():
    w = torch.randn(6, 64)
    w[4, 3] = float("nan")
    with pytest.raises(ValueError, match=r"lm_head \(rows 0:6\) has a non-finite value"):
        quantize_matmul(w, scheme(8, False), torch.float32, name="lm_head")


# --- the bytes: ORT's own quantizer --------------------------------------------------------------------------

def ort_quantizer(weight: np.ndarray, s: QuantScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_matmul_{4,8}bits(packed, W [K, N], scales, zero_points, block_size, N, K, symmetric)."""
    state = pytest.importorskip("onnxruntime.capi._pybind_state")
    n, k = weight.shape
    blocks = k // s.block_size
    packed = np.zeros((n, blocks, s.block_size * s.bits // 8), np.uint8)
    scales = np.zeros((n, blocks), weight.dtype)
    zero_points = np.zeros((n, (blocks * s.bits + 7) // 8), np.uint8)
    quantizer = state.quantize_matmul_4bits if s.bits == 4 else state.quantize_matmul_8bits
    quantizer(packed, np.ascontiguousarray(weight.T), scales, zero_points, s.block_size, n, k, s.symmetric)
    return packed, scales, zero_points


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_bytes_equal_onnxruntime_quantizer(bits, symmetric, dtype):
    torch_dtype, np_dtype = DTYPES[dtype]
    shapes = [(1, 16, 16), (7, 96, 32), (33, 384, 128), (10, 512, 256), (25, 192, 64), (5, 48, 16)]  # odd k_blocks too
    for seed, (n, k, block_size) in enumerate(shapes):
        s = scheme(bits, symmetric, block_size)
        weight = awkward_weight(n, k, seed).to(torch_dtype)
        packed, scales, zero_points = ort_quantizer(weight.numpy(), s)
        q = quantize_matmul(weight, s, torch_dtype)
        where = f"{n}x{k} block {block_size}"
        assert q.packed.dtype == torch.uint8 and np.array_equal(q.packed.numpy(), packed), where
        assert q.scales.dtype == torch_dtype and q.scales.numpy().tobytes() == scales.tobytes(), where
        if symmetric:
            assert q.zero_points is None
        else:
            assert q.zero_points is not None and np.array_equal(q.zero_points.numpy(), zero_points), where


def test_rounding_ties_go_away_from_zero_as_in_onnxruntime():
    """w / s + zp exactly on a half: C's roundf (ORT) and torch.round (to even) disagree; the bytes follow ORT."""
    symmetric_block = torch.tensor([-2.0, 0.125, -0.375, 0.625, 1.125] + [0.0] * 11)  # s = 0.25: 8.5, 6.5, 10.5, 12.5
    asymmetric_block = torch.tensor([-2.5, 12.5, 0.5, -1.5, 4.5] + [0.0] * 11)  # s = 1, zero point 2.5 -> 3
    for symmetric, block in [(True, symmetric_block), (False, asymmetric_block)]:
        s = scheme(4, symmetric, 16)
        weight = block.reshape(1, 16)
        packed, _, zero_points = ort_quantizer(weight.numpy(), s)
        q = quantize_matmul(weight, s, torch.float32)
        assert np.array_equal(q.packed.numpy(), packed)
        levels = unpack_levels(q.packed.reshape(1, -1), 4)[0, :5].tolist()
        if symmetric:
            assert levels == [0, 9, 7, 11, 13]  # to even would give 8, 6, 10, 12
        else:
            assert zero_points[0, 0] & 0x0F == 3  # 2.5 -> 3, not 2
            assert np.array_equal(q.zero_points.numpy(), zero_points)
            assert levels == [1, 15, 4, 2, 8]  # -2.5 + 3 = 0.5 -> 1, 0.5 + 3 -> 4, -1.5 + 3 -> 2, 4.5 + 3 -> 8


def test_levels_come_from_the_reciprocal_times_the_weight_as_in_onnxruntime():
    """MLAS multiplies by the float32 1/s; dividing by s rounds differently for these (found by search)."""
    cases = [(1.543625, 1.0805374, 11), (1.7296555, 0.05765518, 0)]  # w / s: 10.499999 -> 10, 0.5 -> 1
    for high, w, level in cases:
        weight = torch.tensor([[0.0] * 14 + [high, w]])  # asymmetric, zero point 0, s = high / 15
        s = scheme(4, False, 16)
        packed, _, _ = ort_quantizer(weight.numpy(), s)
        q = quantize_matmul(weight, s, torch.float32)
        assert np.array_equal(q.packed.numpy(), packed)
        assert unpack_levels(q.packed.reshape(1, -1), 4)[0, -1] == level


# --- MatMulNBits and GatherBlockQuantized in ONNX Runtime ----------------------------------------------------

def run_single_node(node_kwargs: dict, feeds: dict[str, np.ndarray], initializers: dict[str, np.ndarray],
                    output_dtype: type, log_severity: int = 2) -> np.ndarray:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper

    node = helper.make_node(domain="com.microsoft", outputs=["Y"], **node_kwargs)
    graph = helper.make_graph(
        [node], "single_node",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), None) for name, a in feeds.items()],
        [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(np.dtype(output_dtype)), None)],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = log_severity
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    run_options.log_severity_level = log_severity
    return session.run(None, feeds, run_options)[0]


def run_matmul_nbits(q: QuantizedMatMul, a: np.ndarray, bias: np.ndarray | None = None,
                     log_severity: int = 2) -> np.ndarray:
    """B, scales, zero_points (and bias) as initializers, as in an export: ORT prepacks them."""
    initializers = {"B": q.packed.numpy(), "scales": q.scales.numpy()}
    inputs = ["A", "B", "scales", ""]
    if q.zero_points is not None:
        initializers["zero_points"] = q.zero_points.numpy()
        inputs[3] = "zero_points"
    if bias is not None:
        initializers["bias"] = bias
        inputs += ["", "bias"]  # g_idx (deprecated) omitted
    node = {"op_type": "MatMulNBits", "inputs": inputs, **q.attributes()}
    return run_single_node(node, {"A": a}, initializers, a.dtype.type, log_severity)


def matmul_error_over_bound(y: np.ndarray, a: np.ndarray, q: QuantizedMatMul) -> float:
    """max |y - A @ W'^T| / (its rigorous bound): <= 1 when ORT computed with exactly our weights W'."""
    a64 = a.astype(np.float64).reshape(-1, q.K)
    w64 = dequantize_matmul(q).double().numpy()
    reference = a64 @ w64.T
    bound = q.K * 2.0**-24 * (np.abs(a64) @ np.abs(w64).T)
    if q.scheme.accuracy_level == 4:
        block = q.scheme.block_size
        a_step = np.abs(a64).reshape(a64.shape[0], -1, block).max(axis=-1) / 254 * (1 + 1e-6)
        bound += a_step @ np.abs(w64).reshape(q.N, -1, block).sum(axis=-1).T
    if a.dtype == np.float16:
        bound += 2.0**-11 * (np.abs(reference) + bound) + 2.0**-24
    error = np.abs(y.astype(np.float64).reshape(reference.shape) - reference)
    return float((error / (bound + 1e-30)).max())


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_computes_with_the_dequantized_weight(bits, symmetric, dtype, accuracy_level):
    torch_dtype, np_dtype = DTYPES[dtype]
    n, k = 80, 256
    q = quantize_matmul(awkward_weight(n, k, 1).to(torch_dtype), scheme(bits, symmetric, 32, accuracy_level), torch_dtype)
    assert (q.N, q.K) == (n, k) and tuple(q.packed.shape) == (n, k // 32, 32 * bits // 8)
    a = np.random.default_rng(2).standard_normal((2, 5, k)).astype(np_dtype)
    y = run_matmul_nbits(q, a)
    assert y.shape == (2, 5, n) and y.dtype == np_dtype
    assert matmul_error_over_bound(y, a, q) <= 1.0


def test_matmul_nbits_block_sizes_and_bias():
    a = np.random.default_rng(3).standard_normal((1, 3, 512)).astype(np.float32)
    bias = np.linspace(-1, 1, 24).astype(np.float32)
    for block_size in (16, 64, 128, 256):
        q = quantize_matmul(awkward_weight(24, 512, block_size), scheme(4, False, block_size), torch.float32)
        assert matmul_error_over_bound(run_matmul_nbits(q, a, bias) - bias, a, q) <= 1.0


def test_accuracy_level_4_is_measurably_looser_but_within_its_bound():
    """Level 4 quantizes A to int8: its error is far above level 0's, and still inside the int8 bound."""
    q0 = quantize_matmul(torch.randn(64, 256) * 0.02, scheme(4, False, 32, 0), torch.float32)
    q4 = replace(q0, scheme=replace(q0.scheme, accuracy_level=4))
    a = np.random.default_rng(4).standard_normal((1, 8, 256)).astype(np.float32)
    y0, y4 = run_matmul_nbits(q0, a), run_matmul_nbits(q4, a)
    relative = np.linalg.norm(y4 - y0) / np.linalg.norm(y0)
    assert 1e-4 < relative < 2e-2
    assert matmul_error_over_bound(y4, a, q4) <= 1.0 < matmul_error_over_bound(y4, a, q0)


FALLBACK = "Falling back to using unpacked compute mode"  # ORT's INFO log: B dequantized to float at every call


def test_default_schemes_run_on_an_mlas_kernel_not_the_slow_fallback(capfd):
    """int8 at accuracy_level 0 has no x86-64 MLAS kernel: ORT dequantizes all of B at every call (25 times
    slower than a float32 MatMul at decode). The defaults must not land there, in fp32 or fp16 models."""
    weight = torch.randn(64, 128)
    a = np.ones((1, 1, 128), np.float32)
    run_matmul_nbits(quantize_matmul(weight, scheme(8, False, 32, 0), torch.float32), a, log_severity=0)
    assert FALLBACK in capfd.readouterr().err  # the log line this test relies on is there
    for s in SCHEMES.values():
        for torch_dtype, np_dtype in DTYPES.values():
            run_matmul_nbits(quantize_matmul(weight.to(torch_dtype), s, torch_dtype), a.astype(np_dtype), log_severity=0)
            assert FALLBACK not in capfd.readouterr().err, (s, torch_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_returns_the_dequantized_rows(bits, symmetric, dtype):
    torch_dtype, np_dtype = DTYPES[dtype]
    vocab, hidden = 50, 96  # 3 blocks a row: an odd count of packed 4-bit zero points
    g = quantize_gather(awkward_weight(vocab, hidden, 5).to(torch_dtype), scheme(bits, symmetric, 32), torch_dtype)
    assert tuple(g.data.shape) == (vocab, hidden * bits // 8) and g.data.dtype == torch.uint8
    ids = np.array([[0, 7, 7, vocab - 1], [3, 2, 1, 0]], np.int64)
    y = gather(g, ids, np_dtype)
    expected = dequantize_gather(g)[torch.from_numpy(ids)].to(torch_dtype).numpy()
    assert y.shape == (2, 4, hidden) and y.tobytes() == expected.tobytes()


def gather(g, ids: np.ndarray, output_dtype: type) -> np.ndarray:
    initializers = {"data": g.data.numpy(), "scales": g.scales.numpy()}
    inputs = ["data", "ids", "scales"]
    if g.zero_points is not None:
        initializers["zero_points"] = g.zero_points.numpy()
        inputs.append("zero_points")
    node = {"op_type": "GatherBlockQuantized", "inputs": inputs, **g.attributes()}
    return run_single_node(node, {"ids": ids}, initializers, output_dtype)


def test_gather_shares_the_matmul_bytes():
    """A tied lm_head and embedding quantize to the same bytes: GatherBlockQuantized's data is B reshaped."""
    w = awkward_weight(40, 128, 6)
    for s in (SCHEMES["int4"], SCHEMES["int8"]):
        q, g = quantize_matmul(w, s, torch.float32), quantize_gather(w, s, torch.float32)
        assert g.data.numpy().tobytes() == q.packed.numpy().tobytes()
        assert torch.equal(dequantize_gather(g), dequantize_matmul(q))


# --- round trip ---------------------------------------------------------------------------------------------

def grid_error_bound(q: QuantizedMatMul) -> torch.Tensor:
    """Per element, how far dequantize(quantize(W)) may be from W, in units of |stored scale|.

    Inside the block's grid of 2^bits levels, half a step. Past it (clamped levels): asymmetric loses at most
    half a step at either end (the zero point's rounding); symmetric maps the block's largest magnitude m
    exactly to level -2^(bits-1) and may lose a whole step on the other side, where its grid stops at
    (2^(bits-1) - 1) steps < |m|. A float16 scale, rounded from the float32 one by up to 2^-11, stretches
    the grid by up to 2^bits * 2^-11 steps at its ends.
    """
    clamp_loss = 1.0 if q.scheme.symmetric else 0.5
    rounding = 2.0 ** (q.scheme.bits - 11) if q.scales.dtype == torch.float16 else 0.0
    return torch.full((q.N, q.K // q.scheme.block_size), clamp_loss + rounding)


def zero_point_levels(q: QuantizedMatMul) -> torch.Tensor:
    blocks = q.K // q.scheme.block_size
    if q.zero_points is None:
        return torch.full((q.N, blocks), 2.0 ** (q.scheme.bits - 1))
    return unpack_levels(q.zero_points, q.scheme.bits)[:, :blocks].float()


def assert_round_trip(weight: torch.Tensor, q: QuantizedMatMul) -> float:
    """Checks the error bounds; returns the fraction of weights within half a step (not clamped)."""
    block = q.scheme.block_size
    w = weight.to(torch.float32).reshape(q.N, -1, block)
    error = (dequantize_matmul(q).reshape(w.shape) - w).abs()
    scale = q.scales.to(torch.float32)
    step = scale.abs().unsqueeze(-1)
    eps = 1e-6 * step + 2.0**-24 * 2**q.scheme.bits  # float32 rounding; float16 subnormal scales
    assert (error <= grid_error_bound(q).unsqueeze(-1) * step + eps).all()
    # The nearest level of the block's grid (either one on a tie).
    levels = torch.arange(2**q.scheme.bits, dtype=torch.float32)
    grid = (levels - zero_point_levels(q).unsqueeze(-1)) * scale.unsqueeze(-1)
    nearest = (w.unsqueeze(-1) - grid.unsqueeze(-2)).abs().amin(dim=-1)
    assert (error <= nearest + eps).all()
    return float((error <= 0.5 * step + eps).float().mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_is_within_half_a_step_but_at_the_grid_ends(bits, symmetric, dtype):
    torch_dtype, _ = DTYPES[dtype]
    weight = awkward_weight(60, 256, 7).to(torch_dtype)
    q = quantize_matmul(weight, scheme(bits, symmetric, 32), torch_dtype)
    assert assert_round_trip(weight, q) > 0.99  # clamping at a grid's end is the rare exception


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_edge_blocks(bits, symmetric):
    blocks = {
        "zeros": torch.zeros(16),
        "constant": torch.full((16,), 0.3),
        "negative constant": torch.full((16,), -7.0),
        "one huge outlier": torch.cat([torch.linspace(-0.01, 0.01, 15), torch.tensor([1000.0])]),
        "negative only": -torch.linspace(0.5, 3.0, 16),
        "opposite extremes": torch.cat([torch.tensor([-1.0]), torch.full((14,), 0.2), torch.tensor([0.999])]),
    }
    weight = torch.stack(list(blocks.values()))
    q = quantize_matmul(weight, scheme(bits, symmetric, 16), torch.float32)
    assert_round_trip(weight, q)
    back = dict(zip(blocks, dequantize_matmul(q)))
    assert torch.equal(back["zeros"], torch.zeros(16)) and q.scales[0].item() == 0
    if symmetric:  # the block's largest magnitude is a level: exact
        assert torch.equal(back["constant"], blocks["constant"])
        assert torch.equal(back["negative constant"], blocks["negative constant"])
        assert back["negative only"][-1] == -3.0
        assert back["one huge outlier"][-1] == 1000.0
        assert back["opposite extremes"][0] == -1.0
        # 0.999 lies past the grid's top level, 7/8 (4 bits) or 127/128 (8 bits): symmetric loses more than s/2
        assert back["opposite extremes"][-1] == (7 / 8 if bits == 4 else 127 / 128)
    else:
        assert q.zero_points is not None and unpack_levels(q.zero_points, bits)[0, 0] == 0  # all-zero block
        assert torch.allclose(back["constant"], blocks["constant"], rtol=1e-6)
        assert torch.allclose(back["negative constant"], blocks["negative constant"], rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_weights_near_the_fp16_limit(bits, symmetric):
    """Scales are computed in float32 and stay finite; the round trip holds in float32. Asymmetric grids can end
    above 65504 (half a step past the block's max, and the float16 scale rounds up): GatherBlockQuantized then
    returns inf in float16, and dequantize_gather(...).half() says so too, bit for bit."""
    weight = torch.stack([
        torch.full((16,), 65504.0),
        torch.linspace(-65504, 65504, 16),
        torch.cat([torch.full((15,), -65504.0), torch.tensor([60000.0])]),
        torch.linspace(0, 65504, 16),
    ]).to(torch.float16)
    q = quantize_matmul(weight, scheme(bits, symmetric, 16), torch.float16)
    assert torch.isfinite(q.scales).all()
    assert_round_trip(weight, q)
    if symmetric:
        assert torch.isfinite(dequantize_matmul(q).half()).all()
    g = quantize_gather(weight, scheme(bits, symmetric, 16), torch.float16)
    y = gather(g, np.arange(4, dtype=np.int64), np.float16)
    assert y.tobytes() == dequantize_gather(g).half().numpy().tobytes()


# --- layouts ORT would reject by its numbers -----------------------------------------------------------------

def _roll_blocks(q):
    return replace(q, packed=q.packed.roll(1, dims=1))


def _transpose_blocks(q):
    return replace(q, packed=q.packed.transpose(0, 1).contiguous().reshape(q.packed.shape))


def _swap_nibbles(q):
    return replace(q, packed=(q.packed >> 4) | (q.packed << 4))


def _roll_scales(q):
    return replace(q, scales=q.scales.roll(1, dims=1))


def _transpose_scales(q):
    return replace(q, scales=q.scales.t().contiguous().reshape(q.scales.shape))


def _unsigned_scales(q):
    return replace(q, scales=q.scales.abs())


def _swap_zero_point_nibbles(q):
    return replace(q, zero_points=(q.zero_points >> 4) | (q.zero_points << 4))


def _wrong_k_order(q):
    """Blocks packed from W^T's layout: the bytes of W [K, N] instead of [N, K]."""
    return replace(q, packed=q.packed.reshape(q.N, q.K // 2).t().contiguous().reshape(q.packed.shape))


@pytest.mark.parametrize("corrupt, symmetric", [
    (_roll_blocks, False), (_transpose_blocks, False), (_swap_nibbles, True), (_roll_scales, False),
    (_transpose_scales, True), (_unsigned_scales, True), (_swap_zero_point_nibbles, False), (_wrong_k_order, True),
])
def test_a_wrong_layout_breaks_the_bound(corrupt: Callable[[QuantizedMatMul], QuantizedMatMul], symmetric):
    g = torch.Generator().manual_seed(8)
    q = quantize_matmul(torch.randn(64, 128, generator=g), scheme(4, symmetric, 32), torch.float32)
    a = np.random.default_rng(9).standard_normal((1, 4, 128)).astype(np.float32)
    assert matmul_error_over_bound(run_matmul_nbits(q, a), a, q) <= 1.0
    wrong = corrupt(q)
    assert matmul_error_over_bound(run_matmul_nbits(wrong, a), a, q) > 100


# --- chunks ------------------------------------------------------------------------------------------------

def test_chunks_concatenate_to_the_whole_tensor():
    weight = awkward_weight(45, 256, 10).half()
    for s in (SCHEMES["int4"], SCHEMES["int8"], scheme(4, True, 64)):
        whole = quantize_matmul(weight, s, torch.float16)
        chunk_bytes = 7 * 256 * 4
        parts = list(iter_quantized_rows(weight, s, torch.float16, chunk_bytes=chunk_bytes))
        assert [start for start, _ in parts] == list(range(0, 45, 7))
        assert all(part.N <= 7 for _, part in parts)
        assert b"".join(p.packed.numpy().tobytes() for _, p in parts) == whole.packed.numpy().tobytes()
        assert b"".join(p.scales.numpy().tobytes() for _, p in parts) == whole.scales.numpy().tobytes()
        if not s.symmetric:
            assert b"".join(p.zero_points.numpy().tobytes() for _, p in parts) == whole.zero_points.numpy().tobytes()
        middle = quantize_matmul_rows(weight, s, torch.float16, slice(10, 17))
        assert torch.equal(middle.packed, whole.packed[10:17]) and torch.equal(middle.scales, whole.scales[10:17])


def test_quantizing_leaves_the_weight_untouched():
    weight = awkward_weight(10, 64, 11)
    before = weight.clone()
    quantize_matmul(weight, SCHEMES["int4"], torch.float32)
    assert torch.equal(weight, before)
