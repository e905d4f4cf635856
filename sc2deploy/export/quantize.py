"""Block quantization of weights into the byte layouts of ONNX Runtime's com.microsoft::MatMulNBits and
com.microsoft::GatherBlockQuantized, with exactly the numerics of ORT's own quantizer (MLAS
MlasQuantizeBlockwise, which `onnxruntime.capi._pybind_state.quantize_matmul_4bits/_8bits` call): the tests
compare the bytes.

A weight W [N, K] (nn.Linear's [out_features, in_features], the checkpoint layout; the embedding's
[vocab, hidden]) is cut into blocks of `block_size` consecutive weights of a row. Per block, in float32:

  symmetric:  scale = -m / 2^(bits-1), m the block's value of largest magnitude (the negative one on a tie),
              zero point 2^(bits-1) (8 or 128), not stored: both operators default to it.
              The scale is negative when m > 0: m itself maps to level 0, i.e. to -2^(bits-1) * scale.
  asymmetric: lo = min(block min, 0), hi = max(block max, 0), scale = (hi - lo) / (2^bits - 1),
              zero point = roundf(-lo / scale) (0 when scale is 0), computed from the float32 scale.
  level q = clamp(roundf(w * (1 / s) + zero_point), 0, 2^bits - 1), where s is the scale as stored
              (rounded to the scale dtype: float16 for fp16 models) and roundf rounds halves away from 0.
  ORT computes w' = (q - zero_point) * s in float32 (dequantize_matmul).

Layouts (all row-major, row n = output feature / token id):
  MatMulNBits  B            uint8 [N, K/block, block*bits/8]: levels of consecutive k, 2 per byte for 4 bits,
                                  the even k in the low nibble
               scales       scale dtype [N, K/block]
               zero_points  uint8 [N, ceil(K/block * bits/8)], packed like B; for 4 bits and an odd number
                                  of blocks each row's last high nibble is 8, as ORT's quantizer writes it
  GatherBlockQuantized data uint8 [vocab, hidden*bits/8] (the same bytes as B), scales and zero_points as
                             above, attributes bits, block_size, gather_axis 0, quantize_axis 1 (the last).

Memory: rows are quantized a chunk of about CHUNK_BYTES of float32 at a time, so a whole-tensor call holds the
input, the outputs and a few chunk-sized temporaries.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sc2deploy.quantization import QuantScheme

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 32 << 20  # float32 bytes of input quantized at a time


@dataclass(frozen=True)
class QuantizedMatMul:
    """The inputs B, scales and zero_points (None: symmetric, omit the input) of one MatMulNBits node."""

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    scheme: QuantScheme

    @property
    def N(self) -> int:
        return int(self.packed.shape[0])

    @property
    def K(self) -> int:
        return int(self.packed.shape[1]) * self.scheme.block_size

    def attributes(self) -> dict[str, int]:
        return matmul_attributes(self.scheme, self.K, self.N)


@dataclass(frozen=True)
class QuantizedGather:
    """The inputs data, scales and zero_points (None: symmetric, omit the input) of one GatherBlockQuantized."""

    data: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    scheme: QuantScheme

    def attributes(self) -> dict[str, int]:
        return gather_attributes(self.scheme)


def matmul_attributes(scheme: QuantScheme, k: int, n: int) -> dict[str, int]:
    """MatMulNBits' attributes. accuracy_level 0 is left out, as ORT's own quantizer does (it is the default,
    and some execution providers reject the attribute)."""
    attributes = {"K": k, "N": n, "bits": scheme.bits, "block_size": scheme.block_size}
    if scheme.accuracy_level:
        attributes["accuracy_level"] = scheme.accuracy_level
    return attributes


def gather_attributes(scheme: QuantScheme) -> dict[str, int]:
    return {"bits": scheme.bits, "block_size": scheme.block_size, "gather_axis": 0, "quantize_axis": 1}


def quantize_matmul(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                    name: str = "a weight") -> QuantizedMatMul:
    """Quantize an nn.Linear weight [N, K] for MatMulNBits; `name` is for error messages."""
    import torch

    n, k = _check_weight(weight, scheme, scale_dtype, name)
    blocks = k // scheme.block_size
    packed = torch.empty((n, blocks, scheme.block_size * scheme.bits // 8), dtype=torch.uint8)
    scales = torch.empty((n, blocks), dtype=scale_dtype)
    zero_points = None if scheme.symmetric else torch.empty((n, _packed_zero_point_bytes(blocks, scheme.bits)),
                                                              dtype=torch.uint8)
    for start, part in iter_quantized_rows(weight, scheme, scale_dtype, name=name):
        rows = slice(start, start + part.N)
        packed[rows] = part.packed
        scales[rows] = part.scales
        if zero_points is not None and part.zero_points is not None:
            zero_points[rows] = part.zero_points
    return QuantizedMatMul(packed, scales, zero_points, scheme)


def iter_quantized_rows(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                        chunk_bytes: int = CHUNK_BYTES, name: str = "a weight") -> Iterator[tuple[int, QuantizedMatMul]]:
    """(first row, quantized rows) for consecutive row ranges of about `chunk_bytes` of float32 each. Each output
    tensor is row-major, so the chunks' bytes, concatenated in order, are the whole tensor's."""
    n, k = _check_weight(weight, scheme, scale_dtype, name)
    rows_per_chunk = max(1, chunk_bytes // (4 * k))
    for start in range(0, n, rows_per_chunk):
        yield start, quantize_matmul_rows(weight, scheme, scale_dtype, slice(start, min(n, start + rows_per_chunk)),
                                          name=name)


def quantize_matmul_rows(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, rows: slice,
                         name: str = "a weight") -> QuantizedMatMul:
    """Rows `rows` of quantize_matmul(weight, ...), computed from those rows alone."""
    import torch

    _check_weight(weight, scheme, scale_dtype, name)
    chunk = weight[rows].to(torch.float32)
    blocks = chunk.reshape(chunk.shape[0], -1, scheme.block_size)
    scales, zero_points = _block_scales(blocks, scheme, scale_dtype, f"{name} (rows {rows.start}:{rows.stop})")
    levels = _quantize_levels(blocks, scales.to(torch.float32), _zero_point_values(zero_points, scheme), scheme)
    packed = _pack(levels.reshape(chunk.shape[0], -1), scheme.bits).reshape(chunk.shape[0], blocks.shape[1], -1)
    packed_zero_points = None if zero_points is None else _pack_zero_points(zero_points, scheme.bits)
    return QuantizedMatMul(packed, scales, packed_zero_points, scheme)


def quantize_gather(embedding: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                    name: str = "the token embedding") -> QuantizedGather:
    """Quantize an embedding [vocab, hidden] for GatherBlockQuantized (uint8 data, quantized along hidden)."""
    q = quantize_matmul(embedding, scheme, scale_dtype, name=name)
    return _as_gather(q)


def dequantize_matmul(q: QuantizedMatMul) -> torch.Tensor:
    """The float32 weight [N, K] that MatMulNBits multiplies by: (level - zero point) * scale."""
    return _dequantize(unpack_levels(q.packed.reshape(q.N, -1), q.scheme.bits), q.scales, q.zero_points, q.scheme)


def dequantize_gather(q: QuantizedGather) -> torch.Tensor:
    """The float32 rows [vocab, hidden] GatherBlockQuantized returns (before rounding to the scale dtype)."""
    return _dequantize(unpack_levels(q.data, q.scheme.bits), q.scales, q.zero_points, q.scheme)


def unpack_levels(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, bytes] -> the levels uint8 [rows, bytes * 8 / bits] they pack."""
    import torch

    if bits == 8:
        return packed
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _as_gather(q: QuantizedMatMul) -> QuantizedGather:
    return QuantizedGather(q.packed.reshape(q.N, -1), q.scales, q.zero_points, q.scheme)


def _check_weight(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype, name: str) -> tuple[int, int]:
    import torch

    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scales must be float32 or float16 (the model's dtype), got {scale_dtype}")
    n, k = weight.shape
    scheme.check_dimension(k, name)
    return n, k


def _block_scales(blocks: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype,
                  where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per block: the scale in `scale_dtype`, and (asymmetric) the zero point, uint8 unpacked."""
    import torch

    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)  # NaN if the block has one
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(f"{where} has a non-finite value; it cannot be quantized")
    if scheme.symmetric:
        extreme = torch.where(high.abs() > low.abs(), high, low)
        # An all-zero block: MLAS's min and max are its first zero, whose sign the scale's -0.0 or 0.0 shows.
        extreme = torch.where(extreme == 0, blocks[..., 0], extreme)
        return (-extreme / 2 ** (scheme.bits - 1)).to(scale_dtype), None
    low.clamp_(max=0)
    high.clamp_(min=0)
    scale = ((high - low) / (2 ** scheme.bits - 1)).abs_()  # abs: 0.0, never -0.0, as in MLAS
    zero_point_float = torch.where(scale != 0, -(low / scale), low).clamp_(0, 2 ** scheme.bits - 1)
    return scale.to(scale_dtype), _round_half_up_nonnegative(zero_point_float).to(torch.uint8)


def _zero_point_values(zero_points: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor | float:
    import torch

    if zero_points is None:
        return float(2 ** (scheme.bits - 1))
    return zero_points.to(torch.float32)


def _quantize_levels(blocks: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | float,
                     scheme: QuantScheme) -> torch.Tensor:
    """uint8 levels of `blocks` [rows, blocks, block] given float32 scales and zero points [rows, blocks]."""
    import torch

    reciprocal = torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))
    # Two roundings, a product then a sum, as MLAS computes w * (1 / s) + zp (no fused multiply-add).
    scaled = blocks * reciprocal.unsqueeze(-1)
    scaled += zero_points.unsqueeze(-1) if isinstance(zero_points, torch.Tensor) else zero_points
    # Clamping first changes nothing (the bounds are whole numbers) and leaves only halves >= 0 to round up.
    scaled.clamp_(0, 2 ** scheme.bits - 1)
    return _round_half_up_nonnegative(scaled).to(torch.uint8)


def _round_half_up_nonnegative(x: torch.Tensor) -> torch.Tensor:
    """C's roundf for x >= 0, consuming x: torch.round rounds halves to even, so add 1 where it went down by 0.5."""
    import torch

    rounded = torch.round(x)
    rounded_down_a_half = x.sub_(rounded) == 0.5  # x - round(x) is exact
    return rounded.add_(rounded_down_a_half)


def _pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 levels [rows, count] -> [rows, count * bits / 8], two 4-bit levels a byte, the first in the low nibble."""
    if bits == 8:
        return levels.contiguous()
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def _pack_zero_points(zero_points: torch.Tensor, bits: int) -> torch.Tensor:
    import torch

    if bits == 4 and zero_points.shape[1] % 2:
        filler = torch.full((zero_points.shape[0], 1), 8, dtype=torch.uint8)
        zero_points = torch.cat([zero_points, filler], dim=1)
    return _pack(zero_points, bits)


def _packed_zero_point_bytes(blocks: int, bits: int) -> int:
    return (blocks * bits + 7) // 8


def _dequantize(levels: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                scheme: QuantScheme) -> torch.Tensor:
    import torch

    rows, count = levels.shape
    blocks = count // scheme.block_size
    if zero_points is None:
        zero = torch.full((rows, blocks), float(2 ** (scheme.bits - 1)))
    else:
        zero = unpack_levels(zero_points, scheme.bits)[:, :blocks].to(torch.float32)
    shifted = levels.reshape(rows, blocks, scheme.block_size).to(torch.float32) - zero.unsqueeze(-1)
    return (shifted * scales.to(torch.float32).unsqueeze(-1)).reshape(rows, count)
