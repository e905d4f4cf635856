"""Weight-only block quantization schemes (`sc2deploy export --quant`): what a quantized artifact records.

A scheme says how every linear layer becomes ONNX Runtime's com.microsoft::MatMulNBits and the token
embedding com.microsoft::GatherBlockQuantized: `bits` per weight, `block_size` weights along the input
dimension K sharing one scale (and, unless `symmetric`, one zero point), and the `accuracy_level` at which
MatMulNBits may compute (ORT's meaning: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8, i.e. the activations are
quantized to int8 per block). The numerics and byte layouts are sc2deploy.export.quantize's.

The defaults in SCHEMES were measured against ORT 1.32's CPU kernels (x86-64, 2 threads), relative output
error of one [2048, 768] layer and decode ([1, 1, 768] inputs) time:
- asymmetric: lower error than symmetric in every case measured (int4, block 32: 8.1% against 8.6% for
  Gaussian weights, 8.1% against 9.1% with outlier input channels), at the same speed;
- block 32: int4 errors 8.1% / 9.1% / 10.0% for blocks 32 / 64 / 128 (8.1% / 10.8% / 14.4% with outliers),
  for about 25% more decode time than block 128 and 11% more bytes; int8 likewise (0.9% against 1.6% with
  outliers at level 4), its speed differences below this machine's noise;
- accuracy_level 4: int4 as accurate as level 0 and about 3 times faster; int8 at level 0 has no MLAS
  kernel on x86-64 (ORT dequantizes all of B at every call: 25 times slower than a float32 MatMul).

Light on purpose: no torch or onnx import, so the CLI and the manifest reader can use it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sc2deploy.errors import UserError

BITS = (4, 8)
MIN_BLOCK_SIZE = 16  # MatMulNBits' and GatherBlockQuantized's lower bound
MAX_BLOCK_SIZE = 256
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    block_size: int
    accuracy_level: int
    symmetric: bool

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, BITS)
        _check_int("block_size", self.block_size, _block_sizes())
        _check_int("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"quantization symmetric must be true or false, got {self.symmetric!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def to_manifest(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_manifest(cls, d: object) -> QuantScheme:
        if not isinstance(d, dict):
            raise ValueError(f"quantization must be an object with {_field_names()}, got {type(d).__name__}")
        expected = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - expected):
            raise ValueError(f"quantization has unknown field(s) {', '.join(map(str, unknown))}; "
                             f"expected {_field_names()}")
        if missing := sorted(expected - set(d)):
            raise ValueError(f"quantization lacks field(s) {', '.join(missing)}")
        return cls(**d)

    def check_dimension(self, k: int, what: str) -> None:
        """UserError unless `block_size` divides `k`, the input dimension of the weight `what`."""
        if k % self.block_size == 0:
            return
        fitting = [b for b in _block_sizes() if k % b == 0]
        fix = (f"use a block size that divides {k} ({', '.join(map(str, fitting))})" if fitting
               else f"no block size from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} divides {k}: export it unquantized")
        raise UserError(f"cannot quantize {what} to {self.name}: its input dimension {k} is not a multiple of the "
                        f"block size {self.block_size}; {fix}")


def _block_sizes() -> tuple[int, ...]:
    sizes, size = [], MIN_BLOCK_SIZE
    while size <= MAX_BLOCK_SIZE:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


def _check_int(name: str, value: object, allowed: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"quantization {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _field_names() -> str:
    return ", ".join(f.name for f in fields(QuantScheme))


SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme(bits=8, block_size=32, accuracy_level=4, symmetric=False),
    "int4": QuantScheme(bits=4, block_size=32, accuracy_level=4, symmetric=False),
}
